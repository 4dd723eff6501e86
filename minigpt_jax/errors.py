"""User-facing errors: printed as one line by the CLIs (`cli.run`), never as a traceback."""

import contextlib
import gc
import json
import os
import re
import threading


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def cause(e: BaseException, limit: int = 300) -> str:
  """What went wrong in `e`, in short: the OS error behind it if it names one (an OSError's
  text, or the code TensorStore's messages carry: os_error_code='28' is "No space left on
  device"), else its first line."""
  if isinstance(e, OSError) and e.strerror:
    return e.strerror
  if m := _OS_ERROR_CODE.search(str(e)):
    return os.strerror(int(m[1]))
  return first_line(e, limit)


class UserError(Exception):
  """A problem with the user's input: printed as one line, exit status 2, no traceback."""


class Stopped(Exception):
  """An expected stop that is not a mistake (e.g. preemption): the CLIs print its message as
  one line and exit with `exit_status`."""

  exit_status = 1
  # True: it may have cut short work still running on JAX's threads (a compile), so the
  # process ends without the interpreter's teardown (see cli.run).
  abrupt = False


class WriteFailed(Exception):
  """A file of a run could not be written at `step` (a full disk, say): training stops, and
  `train` names the last complete checkpoint."""

  def __init__(self, what, step: int, error: OSError):
    super().__init__(f"cannot write {what} at step {step}: {cause(error)}")

  @staticmethod
  @contextlib.contextmanager
  def naming(what, step: int):
    """Turns an OSError in the block into a WriteFailed naming `what` and `step`."""
    try:
      yield
    except OSError as e:
      raise WriteFailed(what, step, e) from e


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
    if not is_out_of_memory(e):
      raise
    raise UserError(f"out of memory ({first_line(e, 120)}); lower {setting}") from None


def is_out_of_memory(e: BaseException) -> bool:
  """Whether `e` is XLA running out of memory: RESOURCE_EXHAUSTED on accelerators; XLA:CPU
  reports a failed host allocation as INTERNAL ("Out of memory allocating ...")."""
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or (text.startswith("INTERNAL") and
                                          "out of memory" in text.lower())


def sent_again_after_gc_callback(signum: int, frame) -> bool:
  """For a signal handler that raises: whether `frame` (the handler's) runs inside a garbage
  collector callback (JAX has one), where Python would print the exception and drop it. If
  so, the signal `signum` is sent again a moment later, once the callback is over, and the
  handler must return without raising."""
  if not in_gc_callback(frame):
    return False
  threading.Timer(0.01, os.kill, (os.getpid(), signum)).start()
  return True


def in_gc_callback(frame) -> bool:
  """Whether `frame` (a signal handler's) runs inside a garbage collector callback (JAX
  has one), where Python prints an exception raised there and drops it."""
  callbacks = {getattr(c, "__code__", None) for c in gc.callbacks}
  while frame is not None:
    if frame.f_code in callbacks:
      return True
    frame = frame.f_back
  return False


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
