"""Character tokenizer over printable ASCII, newline and tab, plus <pad> and <eos>."""

import collections
import dataclasses

import numpy as np

from minigpt_jax.errors import UserError

PAD, EOS = "<pad>", "<eos>"
PAD_ID, EOS_ID = 0, 1
# Ids 0 and 1 are the specials; characters follow in a fixed, documented order.
CHARS = "\t\n" + "".join(chr(c) for c in range(32, 127))
_MISSING = 255  # marks bytes outside the vocabulary in the lookup table
_LUT = np.full(256, _MISSING, np.uint8)  # byte -> id
_LUT[[ord(c) for c in CHARS]] = np.arange(2, len(CHARS) + 2)
_ITOS = np.array(["", ""] + list(CHARS), dtype=object)  # id -> text; `decode` spells out <eos>


class TokenizerError(UserError, ValueError):
  """Text holds characters the vocabulary cannot encode."""


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
  """Maps text to ids and back: `decode(encode(s)) == s` for every encodable `s`.

  Ids: 0 `<pad>`, 1 `<eos>`, then tab, newline and printable ASCII (99 in all).
  """

  @property
  def vocab_size(self) -> int:
    return len(CHARS) + 2

  def encode(self, text: str, errors: str = "strict") -> np.ndarray:
    """Encodes `text` to uint8 ids [len(text)]. `errors` as in Python's codecs: "strict"
    raises `TokenizerError` naming the characters and their positions, "replace" maps them
    to "?", "ignore" drops them (the ids are then fewer)."""
    # surrogatepass: undecodable bytes in argv arrive as lone surrogates; they are
    # reported as characters outside the vocabulary like any other.
    codepoints = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
    ids = _LUT[np.minimum(codepoints, 255)]  # _LUT[255] is _MISSING
    bad = np.flatnonzero(ids == _MISSING)
    if bad.size == 0:
      return ids
    if errors == "strict":
      shown = ", ".join(f"{text[i]!r} at {i}" for i in bad[:5])
      more = f" and {bad.size - 5} more" if bad.size > 5 else ""
      raise TokenizerError(
          f"{bad.size} character(s) outside the vocabulary (printable ASCII, "
          f"newline, tab): {shown}{more}")
    if errors == "replace":
      ids = ids.copy()
      ids[bad] = _LUT[ord("?")]
      return ids
    if errors == "ignore":
      return np.delete(ids, bad)
    raise ValueError(f"unknown errors policy {errors!r}: use strict, replace or ignore")

  def decode(self, ids, stop_at_eos: bool = False) -> str:
    """Decodes ids to text; `<pad>` decodes to nothing and `<eos>` to "<eos>"."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if stop_at_eos:
      hits = np.flatnonzero(ids == EOS_ID)
      if hits.size:
        ids = ids[: hits[0]]
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f"ids out of range [0, {self.vocab_size}): {ids.min()}..{ids.max()}")
    pieces = _ITOS[ids]
    pieces[ids == EOS_ID] = EOS
    return "".join(pieces)

  def encode_bytes(self, raw: bytes) -> tuple[np.ndarray, int]:
    """Encodes ASCII bytes for the corpus builder, dropping what is not in the vocabulary.
    Returns (ids, number of bytes dropped)."""
    ids = _LUT[np.frombuffer(raw, np.uint8)]
    keep = ids != _MISSING
    return ids[keep], int(ids.size - keep.sum())

  def to_dict(self) -> dict:
    return {"kind": "char", "chars": CHARS, "specials": [PAD, EOS]}

  @classmethod
  def from_dict(cls, d: dict) -> "CharTokenizer":
    """The tokenizer `d` (a run's tokenizer.json) describes: it must be this code's, id for
    id, since the checkpoint's embeddings are indexed by those ids."""
    chars = d.get("chars")
    for field, want in (("kind", "char"), ("specials", [PAD, EOS])):
      if d.get(field) != want:
        raise UserError(f"unsupported tokenizer description: field {field!r} is "
                        f"{_shown(d, field)}, not {want!r}")
    if not isinstance(chars, str):
      raise UserError(f"unsupported tokenizer description: field 'chars' must be a string, "
                      f"got {_shown(d, 'chars')}")
    if chars != CHARS:
      raise UserError(f"unsupported tokenizer description: its vocabulary is not this code's "
                      f"({_difference(chars)}); ids would decode to the wrong characters")
    return cls()


def _shown(d: dict, field: str) -> str:
  """`d[field]` for a one-line error: its repr, cut short, or "missing"."""
  if field not in d:
    return "missing"
  text = repr(d[field])
  return text if len(text) <= 40 else f"{text[:37]}..."


def _difference(chars: str) -> str:
  """What sets `chars` apart from CHARS, for a one-line error."""
  shown = lambda cs: " ".join(repr(c) for c in sorted(cs)[:5]) + (" ..." if len(cs) > 5 else "")
  control = {c for c in chars if not c.isprintable() and c not in "\t\n"}
  if control:
    return f"control characters {shown(control)}"
  extra, missing = set(chars) - set(CHARS), set(CHARS) - set(chars)
  repeated = {c for c, n in collections.Counter(chars).items() if n > 1}
  parts = [f"{what} {shown(cs)}" for what, cs in
           (("extra", extra), ("missing", missing), ("repeated", repeated)) if cs]
  if parts:
    return ", ".join(parts)
  i = next(i for i, (a, b) in enumerate(zip(chars, CHARS)) if a != b)
  return f"the same characters in another order: id {i + 2} is {chars[i]!r}, not {CHARS[i]!r}"
