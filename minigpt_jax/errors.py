"""User-facing errors: printed as one line by the CLIs (`cli.run`), never as a traceback."""

import contextlib
import json


class UserError(Exception):
  """A problem with the user's input: printed as one line, exit status 2, no traceback."""


class Stopped(Exception):
  """An expected stop that is not a mistake (e.g. preemption): the CLIs print its message as
  one line and exit with `exit_status`."""

  exit_status = 1


def first_line(e: BaseException, limit: int = 300) -> str:
  """The first non-empty line of an exception's message (its type name if it has none)."""
  text = str(e).strip()
  if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # KeyError-style repr
    text = text[1:-1].replace("\\n", "\n").replace("\\'", "'")
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  return (lines[0] if lines else type(e).__name__)[:limit]


@contextlib.contextmanager
def out_of_memory_names(setting: str):
  """Turns running out of memory in the block (XLA's RESOURCE_EXHAUSTED, MemoryError) into a
  UserError that names the `setting` to lower."""
  try:
    yield
  except UserError:
    raise
  except MemoryError:
    raise UserError(f"out of memory; lower {setting}") from None
  except Exception as e:  # XLA raises JaxRuntimeError (not a MemoryError) with this status
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise UserError(f"out of memory ({first_line(e, 120)}); lower {setting}") from None


MAX_JSON_DEPTH = 32  # far past any file of the project's own (a config nests 3 deep)


def parse_json(text: str):
  """`json.loads`, where nesting deeper than MAX_JSON_DEPTH (which overflows Python's stack
  in the parser, or in code that walks the result) is a ValueError like any other bad JSON."""
  try:
    value = json.loads(text)
  except RecursionError:
    raise ValueError(f"JSON nested more than {MAX_JSON_DEPTH} deep") from None
  level = [value]  # the containers at one depth, walked without recursion
  for _ in range(MAX_JSON_DEPTH):
    level = [v for c in level if isinstance(c, (dict, list))
             for v in (c.values() if isinstance(c, dict) else c)]
    if not any(isinstance(v, (dict, list)) for v in level):
      return value
  raise ValueError(f"JSON nested more than {MAX_JSON_DEPTH} deep")
