"""What every command shares: flag parsing and running `main` so that mistakes end the
process with one `error:` line and exit status 2 instead of a traceback."""

import os
import pathlib
import select
import signal
import sys
from typing import Callable

from absl import app, flags, logging

from minigpt_jax.config import SEED_RANGE, check_seed  # noqa: F401 (the commands' --seed)
from minigpt_jax.errors import Stopped, UserError, first_line, sent_again_after_gc_callback

# What a command whose reader went away (`... | head`) exits with: the status of a process
# that SIGPIPE ended, without the signal, which would cut off a checkpoint being written.
CLOSED_PIPE_STATUS = 128 + signal.SIGPIPE


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


def _silence_closed_outputs() -> bool:
  """Points stdout and stderr, where their reader has gone (a closed pipe or socket), at
  /dev/null, so that the interpreter's last flush does not fail again (as the Python docs
  advise, "Note on SIGPIPE"). Returns whether either had."""
  closed = False
  for stream in (sys.stdout, sys.stderr):
    try:
      fd = stream.fileno()
      poll = select.poll()
      poll.register(fd, select.POLLOUT)
      gone = any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no file descriptor (replaced), no poll
      continue
    if gone:
      devnull = os.open(os.devnull, os.O_WRONLY)
      os.dup2(devnull, fd)
      os.close(devnull)
      closed = True
  return closed


def _end_quietly_on_closed_output(status) -> None:
  """Flushes stdout, whose reader may have gone meanwhile, then exits with `status`, or
  CLOSED_PIPE_STATUS for a command that had succeeded but could not print all it had."""
  try:
    sys.stdout.flush()
  except BrokenPipeError:
    if not _silence_closed_outputs():
      raise
    if not status:
      status = CLOSED_PIPE_STATUS
  sys.exit(status)


def _interrupt(signum, frame) -> None:
  """Ctrl-C's handler: KeyboardInterrupt, as Python's own, except in a garbage collector
  callback (JAX has one), where Python would print it and drop it: there the signal comes
  again a moment later, once the callback is over."""
  if not sent_again_after_gc_callback(signum, frame):
    raise KeyboardInterrupt


def _exit_abruptly(message: str = "interrupted", status: int = 130) -> None:
  """Ends an interrupted command (Ctrl-C; SIGTERM before training) once `finally` blocks
  and context managers have run, without the interpreter's teardown: XLA may still be
  compiling what the interrupt abandoned on its own threads, and JAX's clean-up at exit
  would free the client under them (a segfault)."""
  print(message, file=sys.stderr)
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):  # a closed pipe: nothing more can be said there
      pass
  os._exit(status)


def run(main: Callable[[list[str]], None], positional: str = "") -> None:
  """Runs a command's `main(args)`, where `args` are the words left after the flags (as
  many as `positional` names); `UserError`s, Ctrl-C and expected stops (`errors.Stopped`,
  e.g. preemption) end it with one line. A closed stdout (`... | head`) ends it quietly
  with CLOSED_PIPE_STATUS (141), once `finally` blocks and context managers have run (a
  checkpoint being saved is finished, the run's lock released), as they do for Ctrl-C."""

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
      _exit_abruptly()
    except Stopped as e:
      if e.abrupt:
        _exit_abruptly(str(e), e.exit_status)
      print(str(e), file=sys.stderr, flush=True)
      sys.exit(e.exit_status)

  if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored (nohup, &)
    signal.signal(signal.SIGINT, _interrupt)
  try:
    from minigpt_jax import hardware  # imports JAX: after Ctrl-C is handled
    hardware.keep_freed_host_memory()  # before JAX's first computation starts its threads
    app.run(wrapped, flags_parser=_parse_flags)  # ends in SystemExit
  except KeyboardInterrupt:  # while importing, or parsing the flags
    _exit_abruptly()
  except BrokenPipeError:  # printing (the command's output, or --help) to a closed pipe
    if not _silence_closed_outputs():
      raise  # another pipe than stdout's or stderr's: a bug, with its traceback
    sys.exit(CLOSED_PIPE_STATUS)
  except SystemExit as e:  # what is still buffered fails here, not in the interpreter's flush
    _end_quietly_on_closed_output(e.code)
