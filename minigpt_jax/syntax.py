"""Syntactic validity of generated Python: keep the longest prefix that is a whole program.

A sample is a prompt plus the model's continuation of it ("def " + "f(x):\\n..."),
so callers pass `prompt + continuation`: the continuation alone rarely parses.
Samples are checked with `ast.parse` of the running interpreter, the same Python
whose standard library the corpus is usually built from. `ast.parse` only parses:
`return` or `break` at top level, which the compiler would refuse, count as valid.
"""

import ast
import re

# A top-level statement can only start on a line whose first character is not
# whitespace or "#": blank, indented and comment lines may belong to the body of
# the statement before them, so cutting there could split that statement.
_STATEMENT_START = re.compile(r"^[^\s#]", re.MULTILINE)


def _parses(text: str) -> tuple[bool, int | None]:
  """(parses?, line of the error or None). Odd input raises more than SyntaxError."""
  try:
    ast.parse(text)
    return True, None
  except SyntaxError as e:
    return False, e.lineno
  except (ValueError, RecursionError, MemoryError):  # null bytes; absurdly deep nesting
    return False, None


def cut_to_complete(text: str, truncated: bool = False) -> str:
  """The longest prefix of `text` that ends at a top-level statement boundary and parses.

  Candidate cuts are the starts of lines that begin with neither whitespace nor
  "#", tried from the end backwards, plus the end of the text itself unless
  `truncated`. Each failed parse reports the line of its error; no valid program
  can keep that line (the parser got no further than it), so later candidates
  are skipped: a handful of parses per sample, not one per line.

  Args:
    text: prompt plus continuation.
    truncated: the text was cut off (say at max_new_tokens) rather than ending at
      end of file, so its last statement may be unfinished even if it parses
      ("x = 1" from "x = 12"): the end of the text is then not a cut point.
  Returns:
    The kept prefix; "" if no prefix holding at least one statement parses.
  """
  cuts = [m.start() for m in _STATEMENT_START.finditer(text)]
  if not truncated:
    cuts.append(len(text))
  limit = len(text)  # no valid prefix extends past this offset
  for cut in reversed(cuts):
    if cut > limit or cut == 0:
      continue
    ok, err_line = _parses(text[:cut])
    if ok:
      return text[:cut] if _has_statement(text[:cut]) else ""
    if err_line is not None:
      limit = min(limit, _line_offset(text, err_line))
  return ""


def _line_offset(text: str, line: int) -> int:
  """Offset of the start of 1-based `line` (len(text) past the last line)."""
  pos = 0
  for _ in range(line - 1):
    pos = text.find("\n", pos) + 1
    if pos == 0:
      return len(text)
  return pos


def _has_statement(code: str) -> bool:
  return bool(ast.parse(code).body)


def validity(samples: list[str], truncated: list[bool] | None = None) -> dict:
  """How much of each sample is a valid program.

  Args:
    samples: texts, each including the prompt it continues (see the module doc).
    truncated: per sample, as in `cut_to_complete` (default: none truncated).
  Returns:
    {"n": samples, "valid": samples whose kept prefix is non-empty,
     "rate": valid / n, "mean_kept_chars": mean kept prefix length,
     "mean_kept_fraction": mean of kept length / sample length (0 for an empty
     sample), "kept_chars": per-sample kept lengths}.
  """
  truncated = truncated if truncated is not None else [False] * len(samples)
  if len(truncated) != len(samples):
    raise ValueError(f"{len(samples)} samples but {len(truncated)} truncated flags")
  kept = [len(cut_to_complete(s, t)) for s, t in zip(samples, truncated)]
  n = len(samples)
  valid = sum(k > 0 for k in kept)
  return {
      "n": n,
      "valid": valid,
      "rate": valid / n if n else 0.0,
      "mean_kept_chars": sum(kept) / n if n else 0.0,
      "mean_kept_fraction": sum(k / len(s) for k, s in zip(kept, samples) if s) / n if n else 0.0,
      "kept_chars": kept,
  }
