"""A run directory: what training writes and sampling, evaluation and resuming read.

    checkpoints/<run>/config.json      the full config the run was started with
    checkpoints/<run>/tokenizer.json
    checkpoints/<run>/metrics.jsonl    appended by training (and TensorBoard events beside it)
    checkpoints/<run>/samples/         the samples printed at each eval
    checkpoints/<run>/eval_step<N>.json  written by `evaluate`
    checkpoints/<run>/ckpt/            Orbax checkpoints, and damaged ones set aside (`checkpoints`)
    checkpoints/<run>/.lock            held (flock) by the process training the run

Training writes only files and folders of its own there: none of them, nor the run folder
itself, may be a symlink (a planted one would make training write into its target), and
its files are regular files (a FIFO in their place would block training forever).
"""

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import pathlib
import stat
from typing import Optional

import jax
import ml_collections
from flax import traverse_util

from minigpt_jax import checkpoints, hardware, sharding
from minigpt_jax.config import base_config, model_size_problem
from minigpt_jax.errors import UserError, parse_json
from minigpt_jax.model import ModelConfig, init_params
from minigpt_jax.tokenizer import CharTokenizer

# Config fields a resumed run may change; any other difference is refused.
RESUMABLE_CHANGES = ("workdir", "run_name", "data.dir", "data.rebuild", "train.steps",
                     "train.stop_at_step", "train.log_every", "train.eval_every",
                     "train.eval_batches", "train.ckpt_every", "train.keep",
                     "train.debug_recompiles", "sample", "mesh")


# --- the run's own files --------------------------------------------------------------------

def _flat(config: ml_collections.ConfigDict) -> dict:
  flat = traverse_util.flatten_dict(config.to_dict(), sep=".")
  return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in flat.items()}


def check_resumable(run_dir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """Refuses to resume `run_dir` with a config that differs outside RESUMABLE_CHANGES. A
  field the run's config.json lacks (added to the config since) counts as its default."""
  old, new = {**_flat(base_config()), **_flat(read_config(run_dir))}, _flat(config)
  free = lambda k: any(k == f or k.startswith(f + ".") for f in RESUMABLE_CHANGES)
  diffs = [k for k in sorted(set(old) | set(new)) if not free(k) and old.get(k) != new.get(k)]
  if diffs:
    shown = "; ".join(f"{k}: run has {old.get(k)!r}, config has {new.get(k)!r}" for k in diffs[:3])
    raise UserError(f"{run_dir} holds a run with another config ({shown}); resume it with its "
                    "own config or pick another --config.run_name")


# What training writes in a run folder, besides TensorBoard's event files (new names each time).
WRITTEN_FILES = (".lock", "config.json", "tokenizer.json", "metrics.jsonl")
WRITTEN_FOLDERS = ("samples", "ckpt")


def _symlink_refused(path: pathlib.Path) -> UserError:
  return UserError(f"{path} is a symlink; training writes only files and folders of its own "
                   "in a run folder (remove the link, or pick another --config.run_name)")


def _special_refused(path: pathlib.Path) -> UserError:
  return UserError(f"{path} is not a regular file (a FIFO, socket or device); training writes "
                   "only files of its own in a run folder (remove it, or pick another "
                   "--config.run_name)")


def check_own_paths(run_dir: pathlib.Path) -> None:
  """Refuses a run folder that is a symlink, or that holds a symlink where training writes,
  or a FIFO, socket or device in place of one of its files."""
  for path in (run_dir, *(run_dir / n for n in WRITTEN_FILES + WRITTEN_FOLDERS)):
    try:
      mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
      continue
    if stat.S_ISLNK(mode):
      raise _symlink_refused(path)
    if path.name in WRITTEN_FILES and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
      raise _special_refused(path)  # a folder is reported by what reads or writes it


def open_own(path: pathlib.Path, flags: int, mode: str):
  """`open` for a file training writes in a run folder: refuses a symlink (a planted one
  would make training overwrite its target) and a FIFO, socket or device (opening a FIFO
  waits for a reader forever)."""
  try:
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise _symlink_refused(path)
    if e.errno == errno.ENXIO:  # a FIFO nobody reads
      raise _special_refused(path)
    raise
  if not stat.S_ISREG(os.fstat(fd).st_mode):
    os.close(fd)
    raise _special_refused(path)
  os.set_blocking(fd, True)
  return os.fdopen(fd, mode)


def own_folder(path: pathlib.Path) -> pathlib.Path:
  """The folder `path` of a run, made if missing; a symlink in its place is refused."""
  path.mkdir(exist_ok=True)
  if path.is_symlink():
    raise _symlink_refused(path)
  return path


def read_text(path: pathlib.Path, errors: Optional[str] = None) -> str:
  """The text of a run's file; a FIFO, socket or device is refused (reading a FIFO waits for
  a writer forever). OSError as `Path.read_text` raises it (missing, a folder, no access)."""
  try:
    special = not (stat.S_ISREG(m := os.stat(path).st_mode) or stat.S_ISDIR(m))
  except OSError:
    special = False  # reported by the read
  if special:
    raise UserError(f"{path} is not a regular file (a FIFO, socket or device)")
  return pathlib.Path(path).read_text(errors=errors)


def write_run_files(run_dir: pathlib.Path, config, tok: CharTokenizer) -> None:
  """config.json (with data.dir made absolute, so evaluate finds the corpus) and tokenizer.json."""
  saved = config.copy_and_resolve_references()
  saved.data.dir = str(pathlib.Path(config.data.dir).absolute())
  texts = {"config.json": saved.to_json(indent=1), "tokenizer.json": json.dumps(tok.to_dict())}
  check_own_paths(run_dir)  # refused before either is written
  for name, text in texts.items():
    try:
      with open_own(run_dir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "w") as f:
        f.write(text)
    except OSError as e:
      raise UserError(f"cannot write {run_dir / name}: {e.strerror or e}")


def read_config(run_dir: pathlib.Path) -> ml_collections.ConfigDict:
  path = pathlib.Path(run_dir) / "config.json"
  try:
    d = parse_json(read_text(path))
  except FileNotFoundError:
    raise UserError(f"{run_dir} is not a run directory (no config.json)")
  except OSError as e:  # a folder, no permission
    raise UserError(f"{path} is unreadable: {e.strerror or e}")
  except ValueError as e:  # not JSON, nested too deep, not UTF-8
    raise UserError(f"{path} is unreadable: {e}")
  if not isinstance(d, dict):
    raise UserError(f"{path} is unreadable: not a JSON object")
  config = ml_collections.ConfigDict(d)
  missing = [k for k in ("data", "model", "train")
             if not isinstance(config.get(k), ml_collections.ConfigDict)]
  if missing:
    raise UserError(f"{path} is damaged: no {', '.join(missing)} section")
  return config


# What sampling and evaluation read from a run's config.json besides the model section
# (ModelConfig checks that one), with what each must be.
_READ_FIELDS = {
    "train.batch_size": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "data.dir": (lambda v: isinstance(v, str) and v != "", "a folder path"),
    "data.name": (lambda v: isinstance(v, str) and v != "", "a folder name"),
    "data.max_file_chars": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
}


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def check_readable(config: ml_collections.ConfigDict, path: pathlib.Path) -> None:
  """Refuses a config.json (at `path`) whose fields that readers use are missing or wrong,
  or whose model is too large to run at all (a context_len of 10**12)."""
  for name, (valid, what) in _READ_FIELDS.items():
    section, field = name.split(".")
    if field not in config[section]:
      raise UserError(f"{path} is damaged: it has no {name}")
    if not valid(config[section][field]):
      raise UserError(f"{path} is damaged: {name} must be {what}, got "
                      f"{config[section][field]!r}")
  if problem := model_size_problem(config.model):
    raise UserError(f"{path} is damaged: {problem}")


def read_tokenizer(run_dir: pathlib.Path) -> CharTokenizer:
  path = pathlib.Path(run_dir) / "tokenizer.json"
  try:
    d = parse_json(read_text(path))
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read the tokenizer of {run_dir}: {e}")
  if not isinstance(d, dict):
    raise UserError(f"{path} is damaged: not a tokenizer description")
  try:
    return CharTokenizer.from_dict(d)
  except UserError as e:
    raise UserError(f"{path}: {e}") from None


# --- one training at a time -----------------------------------------------------------------

def lock_run_dir(run_dir: pathlib.Path):
  """Takes the run's lock, so that two trainings never write one run; returns the open lock
  file (closing it, or the process ending, releases the lock). Raises UserError if another
  process holds it or the folder cannot be made. Where the filesystem has no locks, warns
  and goes on unlocked."""
  path = run_dir / ".lock"
  for _ in range(3):  # again if a failed run removed the folder meanwhile
    check_own_paths(run_dir)
    try:
      run_dir.mkdir(parents=True, exist_ok=True)
      f = open_own(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, "a+")  # as open(path, "a+")
    except FileNotFoundError:
      continue
    except OSError as e:
      if run_dir.is_dir():  # it is there: it cannot be written (a read-only filesystem, say)
        raise UserError(f"cannot write in the run folder {run_dir}: {e.strerror or e} "
                        "(read-only, or no permission)")
      raise UserError(f"cannot create the run folder {run_dir}: {e.strerror or e}")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      f.close()
      raise UserError(f"{run_dir} is being trained by {holder}; wait for it to finish or pick "
                      "another --config.run_name")
    except OSError as e:  # e.g. a network filesystem without flock
      logging.warning("cannot lock %s (%s); training it unlocked", path, e)
      return f
    try:  # the lock counts only if it is on the file that is there now (not one removed)
      current = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
      current = False
    if current:
      break
    f.close()
  else:
    raise UserError(f"cannot lock {path}: the folder keeps being removed")
  try:  # name the holder for whoever finds the lock taken
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    f.flush()
  except OSError as e:  # a full disk
    f.close()
    raise UserError(f"cannot write {path}: {e.strerror or e}; nothing was trained")
  return f


def remove_if_only_lock(run_dir: pathlib.Path) -> None:
  """Removes `run_dir` if it holds nothing but its lock (call it while holding the lock)."""
  try:
    if [p.name for p in run_dir.iterdir()] == [".lock"]:
      (run_dir / ".lock").unlink()
      run_dir.rmdir()
  except OSError:  # gone already, or written to meanwhile: leave it
    pass


@contextlib.contextmanager
def training_lock(run_dir: pathlib.Path):
  """Holds the run's lock (process 0 takes it; every process fails alike if it cannot)
  for the block. A new run that fails before writing anything removes its folder."""
  lock = error = None
  made_dir = False
  if jax.process_index() == 0:
    made_dir = not run_dir.exists()
    try:
      lock = lock_run_dir(run_dir)
    except Exception as e:  # raised below on every process
      error = e
  try:
    sharding.raise_if_lead_failed(error, f"locking {run_dir}")
    yield
  except BaseException:
    if lock is not None and made_dir:
      remove_if_only_lock(run_dir)
    raise
  finally:  # on errors too: a failed run must not keep its run locked
    if lock is not None:
      lock.close()


# --- finding and loading a run --------------------------------------------------------------

def locate(path: str, step: Optional[int] = None) -> tuple[pathlib.Path, int]:
  """Accepts a run directory, its ckpt/ folder or one ckpt/<step>/ folder.

  Returns (run directory, step): `step` if given, else the one named by the path, else the
  latest.
  """
  run_dir, chosen = _locate(path, step)
  return run_dir, chosen if chosen is not None else checkpoints.list_steps(run_dir)[-1]


def _locate(path: str, step: Optional[int]) -> tuple[pathlib.Path, Optional[int]]:
  """`locate`, with None for a step neither given nor named by the path."""
  p = pathlib.Path(path)
  if not p.exists():
    raise UserError(f"checkpoint path {path} does not exist")
  if p.name.isdigit() and p.parent.name == "ckpt":
    run_dir, named = p.parent.parent, int(p.name)
  elif p.name == "ckpt":
    run_dir, named = p.parent, None
  else:
    run_dir, named = p, None
  if not (run_dir / "ckpt").is_dir():
    raise UserError(f"{path} holds no checkpoints (expected {run_dir / 'ckpt'}/<step>/)")
  steps = checkpoints.list_steps(run_dir)
  if not steps:
    raise UserError(f"{run_dir} holds no checkpoints yet")
  chosen = step if step is not None else named
  if chosen is not None and chosen not in steps:
    raise UserError(f"no checkpoint for step {chosen} in {run_dir} (have {steps})")
  return run_dir, chosen


@dataclasses.dataclass(frozen=True)
class LoadedRun:
  """A checkpoint's parameters on one device, with what is needed to use them."""

  params: dict
  model_cfg: ModelConfig  # resolved for this machine
  tokenizer: CharTokenizer
  config: ml_collections.ConfigDict  # the run's config.json
  step: int
  run_dir: pathlib.Path
  corpus_sha256: str = ""  # of the train split the step was trained on (its "meta" item)


def load_for_inference(path: str, step: Optional[int] = None,
                       compute_dtype: Optional[str] = None) -> LoadedRun:
  """Loads a checkpoint's parameters onto the default device for sampling or evaluation.

  The step is `step`, else the one `path` names, else the newest intact one (see
  `restore_newest`). The compute dtype is resolved for this machine ("auto") unless given;
  so is the attention kernel, always (a run trained with cuDNN attention on a GPU still
  loads on a CPU).
  """
  run_dir, step = _locate(path, step)
  config = read_config(run_dir)
  check_readable(config, run_dir / "config.json")
  tok = read_tokenizer(run_dir)
  section = dict(config.model, attention_impl="auto")
  if compute_dtype:
    section["compute_dtype"] = compute_dtype
  cfg = hardware.resolve(ModelConfig.from_section(section, tok.vocab_size))
  abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = sharding.with_shardings(abstract, jax.tree.map(lambda _: device, abstract))
  step, got = checkpoints.restore_newest(run_dir, {"params": abstract}, step)  # newest intact by default
  return LoadedRun(got["params"], cfg, tok, config, step, run_dir,
                   str(got["meta"].get("corpus_sha256", "")))


def most_recent(workdir: str = "checkpoints") -> str:
  """The run under `workdir` whose checkpoints changed last: the default for the sampler."""
  runs = [p.parent for p in pathlib.Path(workdir).glob("*/ckpt")
          if any(c.name.isdigit() for c in p.iterdir())]
  if not runs:
    raise UserError(f"no --checkpoint given and no trained run in {workdir}/; train one with "
                    "python -m minigpt_jax.train --config configs/small.py")
  return str(max(runs, key=lambda r: (r / "ckpt").stat().st_mtime))
