"""User-facing errors and the CLI wrapper that prints them as one line."""

import sys
from typing import Callable


class UserError(Exception):
  """A problem with the user's input: printed as one line, exit status 2, no traceback."""


def run_cli(main: Callable[[list[str]], None]) -> None:
  """Runs an absl `main` so that `UserError`s end the process with one clear line."""
  from absl import app, flags, logging

  def wrapped(argv):
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every file it writes at INFO
      logging.set_verbosity(logging.WARNING)
    try:
      main(argv)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(2)
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr, flush=True)
      sys.exit(130)

  app.run(wrapped)
