"""User-facing errors and the CLI wrapper that prints them as one line."""

import sys
from typing import Callable


class UserError(Exception):
  """A problem with the user's input: printed as one line, exit status 2, no traceback."""


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def _one_line(e: BaseException) -> str:
  text = str(e).strip()
  if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # KeyError-style repr
    text = text[1:-1].replace("\\n", " ").replace("\\'", "'")
  return " ".join(text.split()) or type(e).__name__


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with config-override mistakes (unknown keys, bad values) as one line."""
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(_one_line(e))
  except (SyntaxError, ImportError) as e:  # a config file that does not compile or import
    _fail(f"cannot load the config file: {type(e).__name__}: {_one_line(e)}")
  except (AttributeError, KeyError, ValueError, TypeError, OSError) as e:
    # ml_collections raises these for --config.a.b typos, bad values, missing files.
    _fail(f"bad flag: {_one_line(e)}")


def run_cli(main: Callable[[list[str]], None]) -> None:
  """Runs an absl `main` so that `UserError`s end the process with one clear line."""
  from absl import app, flags, logging

  def wrapped(argv):
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every file it writes at INFO
      logging.set_verbosity(logging.WARNING)
    try:
      main(argv)
    except UserError as e:
      _fail(str(e))
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr, flush=True)
      sys.exit(130)

  app.run(wrapped, flags_parser=_parse_flags)
