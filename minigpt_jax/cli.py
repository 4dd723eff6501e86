"""What every command shares: flag parsing and running `main` so that mistakes end the
process with one `error:` line and exit status 2 instead of a traceback."""

import os
import pathlib
import sys
from typing import Callable

from absl import app, flags, logging

from minigpt_jax import hardware
from minigpt_jax.errors import Stopped, UserError, first_line


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def check_output_path(path, flag: str) -> pathlib.Path:
  """`path`, once a file can be written there: checked before the work, not after it.

  Refuses a folder, a folder path through a file, and a folder that cannot be written (a
  read-only filesystem; no permission). Missing folders are fine: the commands make them.
  """
  p = pathlib.Path(path).expanduser()
  refuse = lambda why: UserError(f"cannot write {path}: {why}; give another {flag} PATH")
  if p.is_dir():
    raise refuse("it is a folder")
  folder = p.absolute().parent
  while not folder.exists():
    folder = folder.parent
  if not folder.is_dir():
    raise refuse(f"{folder} is not a folder")
  if not os.access(folder, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
    raise refuse(f"{folder} is not writable (read-only, or no permission)")
  return p


SEED_RANGE = range(2**32)  # JAX takes a seed modulo 2**32: others would repeat these


def check_seed(seed: int, flag: str = "--seed") -> int:
  if seed not in SEED_RANGE:
    raise UserError(f"{flag} must be in [0, {SEED_RANGE.stop - 1}], got {seed}")
  return seed


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with config-override mistakes (unknown keys, bad values) as one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(" ".join(str(e).split()))
  except (SyntaxError, ImportError) as e:  # a config file that does not compile or import
    fail(f"cannot load the config file: {type(e).__name__}: {' '.join(str(e).split())}")
  except (AttributeError, KeyError, ValueError, TypeError, OSError) as e:
    # ml_collections raises these for --config.a.b typos, bad values, missing files.
    fail(f"bad flag: {first_line(e)}")


def load_config(holder):
  """The value of a `config_flags` flag (ml_collections defers a failed load to first use)."""
  from minigpt_jax import config as config_lib
  try:
    config = holder.value
    if config is not None:
      config.keys()  # a failed load raises here
  except OSError as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    raise UserError(f"cannot load the config file: {lines[-1] if lines else e}")
  if config is None:
    raise UserError("--config is required, e.g. --config configs/small.py")
  config_lib.validate(config)
  return config


def run(main: Callable[[list[str]], None], positional: str = "") -> None:
  """Runs a command's `main(args)`, where `args` are the words left after the flags (as
  many as `positional` names); `UserError`s, Ctrl-C and expected stops (`errors.Stopped`,
  e.g. preemption) end it with one line."""

  def wrapped(argv):
    if len(argv) - 1 != len(positional.split()):
      command = f"python -m minigpt_jax.{pathlib.Path(argv[0]).stem}"
      fail(f"usage: {command} [flags] {positional}" if positional else
           f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every file it writes at INFO
      logging.set_verbosity(logging.WARNING)
    try:
      main(argv[1:])
    except UserError as e:
      fail(str(e))
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr, flush=True)
      sys.exit(130)
    except Stopped as e:
      print(str(e), file=sys.stderr, flush=True)
      sys.exit(e.exit_status)

  hardware.keep_freed_host_memory()  # before JAX's first computation starts its threads
  app.run(wrapped, flags_parser=_parse_flags)
