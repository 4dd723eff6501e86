import numpy as np
import pytest
from hypothesis import given, strategies as st

from minigpt_jax.errors import UserError
from minigpt_jax.tokenizer import CHARS, EOS_ID, PAD_ID, CharTokenizer, TokenizerError

tok = CharTokenizer()
encodable = st.text(alphabet=st.sampled_from(CHARS), max_size=300)


@given(encodable)
def test_round_trip(text):
  ids = tok.encode(text)
  assert ids.shape == (len(text),)
  assert tok.decode(ids) == text


def test_vocab_layout():
  assert tok.vocab_size == 99  # 95 printable + \n + \t + <pad> + <eos>
  assert PAD_ID == 0 and EOS_ID == 1
  ids = tok.encode("\t\n ~")
  assert len(set(ids.tolist())) == 4 and ids.min() >= 2 and ids.max() == tok.vocab_size - 1


def test_out_of_vocab_names_characters_and_positions():
  with pytest.raises(TokenizerError) as e:
    tok.encode("x = 'é'\x07")
  msg = str(e.value)
  assert "'é' at 5" in msg and "'\\x07' at 7" in msg and "2 character(s)" in msg


def test_out_of_vocab_policies():
  assert tok.decode(tok.encode("aé\rb", errors="replace")) == "a??b"
  assert tok.decode(tok.encode("aé\rb", errors="ignore")) == "ab"


def test_decode_specials_and_eos_stop():
  ids = np.concatenate([tok.encode("ab"), [EOS_ID], tok.encode("cd"), [PAD_ID]])
  assert tok.decode(ids) == "ab<eos>cd"
  assert tok.decode(ids, stop_at_eos=True) == "ab"


def test_undecodable_command_line_bytes_are_named_not_a_crash():
  """Python hands bytes that are not UTF-8 in argv over as lone surrogates."""
  with pytest.raises(TokenizerError, match=r"'\\udcff' at 2"):
    tok.encode(b"ab\xff".decode("utf-8", "surrogateescape"))


def test_serialisation_round_trip():
  assert CharTokenizer.from_dict(tok.to_dict()) == tok


@pytest.mark.parametrize("damage", [{"chars": None}, {"chars": "ab\u00e9"}, {"chars": "aab"},
                                    {"kind": "bpe"}])
def test_a_damaged_description_is_refused(damage):
  with pytest.raises(UserError, match="unsupported tokenizer description"):
    CharTokenizer.from_dict({**tok.to_dict(), **damage})


@pytest.mark.parametrize("damage,message", [
    ({"kind": "bpe"}, "field 'kind' is 'bpe', not 'char'"),
    ({"kind": None}, "field 'kind' is None, not 'char'"),
    ({"chars": 7}, "field 'chars' must be a string, got 7"),
    ({"chars": list("ab")}, "field 'chars' must be a string, got ['a', 'b']"),
    ({"specials": ["<eos>", "<pad>"]}, "field 'specials' is ['<eos>', '<pad>'], not ['<pad>', '<eos>']"),
])
def test_a_damaged_description_names_the_field_not_the_whole_dict(damage, message):
  with pytest.raises(UserError) as e:
    CharTokenizer.from_dict({**tok.to_dict(), **damage})
  assert str(e.value) == f"unsupported tokenizer description: {message}"


def test_a_missing_field_is_named_missing():
  d = tok.to_dict()
  del d["chars"]
  with pytest.raises(UserError, match="field 'chars' must be a string, got missing"):
    CharTokenizer.from_dict(d)
