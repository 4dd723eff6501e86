"""The config: one validation before any work, and one documented sampling default."""

import importlib

import pytest

from configs import tiny
from minigpt_jax import config as config_lib
from minigpt_jax import scoring
from minigpt_jax.errors import UserError


@pytest.mark.parametrize("field,value,message", [
    ("data.max_chars", -1, "data.max_chars must be an integer >= 0"),  # became "no cap" silently
    ("data.max_file_chars", -5, "data.max_file_chars must be an integer >= 0"),
    ("model.vocab_pad_multiple", 0, "model.vocab_pad_multiple must be a positive integer"),
    ("model.d_ff", 0, "model.d_ff must be a positive integer"),
    ("model.context_len", 10**12, r"model.context_len must be at most 2147483647 \(2\*\*31 - 1\)"),
    ("data.name", "../elsewhere", "data.name must be a plain folder name"),
    ("run_name", ".hidden", "run_name must be a plain folder name"),
])
def test_validate_refuses(field, value, message):
  c = tiny.get_config()
  section, name = field.rsplit(".", 1) if "." in field else (None, field)
  setattr(c[section] if section else c, name, value)
  with pytest.raises(UserError, match=message):
    config_lib.validate(c)


def _refusal(c):
  """What validate says against config `c`; None if it accepts it."""
  try:
    config_lib.validate(c)
  except UserError as e:
    return str(e)
  return None


@pytest.mark.parametrize("name", ["tiny", "small", "full", "finetune"])
def test_every_shipped_config_is_valid(name):
  """No rule refuses a config the project ships (configs/)."""
  c = importlib.import_module(f"configs.{name}").get_config()
  assert _refusal(c) is None


@pytest.mark.parametrize("field,value", [
    ("data.max_chars", 0),  # 0 = no cap
    ("data.max_file_chars", 0),
    ("model.vocab_pad_multiple", 1),
    ("model.d_ff", 1),
    ("model.context_len", 2**31 - 1),
    ("data.name", "else.where"),
    ("run_name", "hidden."),
])
def test_validate_accepts_the_values_next_to_those_it_refuses(field, value):
  """Each rule above refuses what it says and no more: its edge case passes."""
  c = tiny.get_config()
  section, name = field.rsplit(".", 1) if "." in field else (None, field)
  setattr(c[section] if section else c, name, value)
  assert _refusal(c) is None


def test_one_sampling_default_for_training_sample_and_evaluate():
  """`sample`'s flags, the samples printed during training and evaluate's syntax check all
  draw with the config's sample section (they disagreed: top_p 1.0 against 0.95)."""
  from minigpt_jax import sample  # defines the sample command's flags in this process
  want = config_lib.base_config().sample
  assert (want.temperature, want.top_k, want.top_p) == (0.8, 0, 0.95)  # what README documents
  assert (sample._TEMP.default, sample._TOP_K.default, sample._TOP_P.default) == (
      want.temperature, want.top_k, want.top_p)
  drawn = scoring.default_sampling()
  assert (drawn.temperature, drawn.top_k, drawn.top_p) == (want.temperature, want.top_k, want.top_p)
