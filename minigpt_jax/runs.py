"""A run directory: what training writes and sampling, evaluation and resuming read.

    checkpoints/<run>/config.json      the full config the run was started with
    checkpoints/<run>/tokenizer.json
    checkpoints/<run>/metrics.jsonl    appended by training
    checkpoints/<run>/ckpt/<step>/     Orbax: items "params", "opt_state" and "meta"
    checkpoints/<run>/.lock            held (flock) by the process training the run
"""

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import pathlib
from typing import Optional

import jax
import ml_collections
import orbax.checkpoint as ocp

from minigpt_jax import hardware, sharding
from minigpt_jax.errors import UserError, first_line
from minigpt_jax.model import ModelConfig, init_params
from minigpt_jax.tokenizer import CharTokenizer

# Config fields a resumed run may change; any other difference is refused.
RESUMABLE_CHANGES = ("workdir", "run_name", "data.dir", "data.rebuild", "train.steps",
                     "train.stop_at_step", "train.log_every", "train.eval_every",
                     "train.eval_batches", "train.ckpt_every", "train.keep",
                     "train.debug_recompiles", "sample", "mesh")


# --- checkpoints ----------------------------------------------------------------------------

def manager(run_dir: pathlib.Path, keep: int = 3) -> ocp.CheckpointManager:
  """The manager training saves with: it keeps the last `keep` checkpoints."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(pathlib.Path(run_dir).absolute() / "ckpt", options=options)


@contextlib.contextmanager
def reader(run_dir: pathlib.Path):
  """A manager that only reads (not Orbax's read_only option, which warns on every use),
  closed on leaving the block."""
  options = ocp.CheckpointManagerOptions(create=False)
  mngr = ocp.CheckpointManager(pathlib.Path(run_dir).absolute() / "ckpt", options=options)
  try:
    yield mngr
  finally:
    mngr.close()


def save(mngr: ocp.CheckpointManager, step: int, params, opt_state, meta: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
      meta=ocp.args.JsonSave(meta)), force=True)


def restore(mngr: ocp.CheckpointManager, step: int, abstract: dict) -> dict:
  """Restores the items named in `abstract` ({"params": tree, ...} of ShapeDtypeStructs
  carrying the target shardings, so a run saved on one mesh loads onto another; "meta": None
  for the JSON metadata)."""
  args = {k: ocp.args.JsonRestore() if k == "meta" else ocp.args.StandardRestore(v)
          for k, v in abstract.items()}
  try:
    return dict(mngr.restore(step, args=ocp.args.Composite(**args)))
  except Exception as e:  # Orbax raises many types for a damaged checkpoint
    raise UserError(f"cannot restore checkpoint step {step} in {mngr.directory}: {first_line(e)}")


def trained_on(run_dir: pathlib.Path, step: Optional[int] = None) -> Optional[tuple[int, str]]:
  """(step, sha256 of the train split it was trained on) for checkpoint `step` (default: the
  latest); None for a run without checkpoints. Orbax synchronises all processes when it
  opens checkpoints: in a multi-process run, every process must call this."""
  if not (pathlib.Path(run_dir) / "ckpt").is_dir():
    return None
  with reader(run_dir) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None:
      return None
    return step, restore(mngr, step, {"meta": None})["meta"].get("corpus_sha256", "")


# --- the run's own files --------------------------------------------------------------------

def _flat(config: ml_collections.ConfigDict) -> dict:
  out = {}
  def walk(d, prefix):
    for k, v in d.items():
      if isinstance(v, dict):
        walk(v, f"{prefix}{k}.")
      else:
        out[f"{prefix}{k}"] = list(v) if isinstance(v, (list, tuple)) else v
  walk(config.to_dict(), "")
  return out


def check_resumable(run_dir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """Refuses to resume `run_dir` with a config that differs outside RESUMABLE_CHANGES."""
  old, new = _flat(read_config(run_dir)), _flat(config)
  free = lambda k: any(k == f or k.startswith(f + ".") for f in RESUMABLE_CHANGES)
  diffs = [k for k in sorted(set(old) | set(new)) if not free(k) and old.get(k) != new.get(k)]
  if diffs:
    shown = "; ".join(f"{k}: run has {old.get(k)!r}, config has {new.get(k)!r}" for k in diffs[:3])
    raise UserError(f"{run_dir} holds a run with another config ({shown}); resume it with its "
                    "own config or pick another --config.run_name")


def write_run_files(run_dir: pathlib.Path, config, tok: CharTokenizer) -> None:
  """config.json (with data.dir made absolute, so evaluate finds the corpus) and tokenizer.json."""
  saved = config.copy_and_resolve_references()
  saved.data.dir = str(pathlib.Path(config.data.dir).absolute())
  (run_dir / "config.json").write_text(saved.to_json(indent=1))
  (run_dir / "tokenizer.json").write_text(json.dumps(tok.to_dict()))


def read_config(run_dir: pathlib.Path) -> ml_collections.ConfigDict:
  path = pathlib.Path(run_dir) / "config.json"
  try:
    d = json.loads(path.read_text())
  except FileNotFoundError:
    raise UserError(f"{run_dir} is not a run directory (no config.json)")
  except ValueError as e:
    raise UserError(f"{path} is unreadable: {e}")
  if not isinstance(d, dict):
    raise UserError(f"{path} is unreadable: not a JSON object")
  config = ml_collections.ConfigDict(d)
  missing = [k for k in ("data", "model", "train")
             if not isinstance(config.get(k), ml_collections.ConfigDict)]
  if missing:
    raise UserError(f"{path} is damaged: no {', '.join(missing)} section")
  return config


def read_tokenizer(run_dir: pathlib.Path) -> CharTokenizer:
  path = pathlib.Path(run_dir) / "tokenizer.json"
  try:
    d = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read the tokenizer of {run_dir}: {e}")
  if not isinstance(d, dict):
    raise UserError(f"{path} is damaged: not a tokenizer description")
  return CharTokenizer.from_dict(d)


# --- one training at a time -----------------------------------------------------------------

def lock_run_dir(run_dir: pathlib.Path):
  """Takes the run's lock, so that two trainings never write one run; returns the open lock
  file (closing it, or the process ending, releases the lock). Raises UserError if another
  process holds it or the folder cannot be made. Where the filesystem has no locks, warns
  and goes on unlocked."""
  path = run_dir / ".lock"
  for _ in range(3):  # again if a failed run removed the folder meanwhile
    try:
      run_dir.mkdir(parents=True, exist_ok=True)
      f = open(path, "a+")
    except FileNotFoundError:
      continue
    except OSError as e:
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
  f.truncate(0)  # name the holder for whoever finds the lock taken
  f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
  f.flush()
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
  with reader(run_dir) as mngr:
    steps = mngr.all_steps()
  if not steps:
    raise UserError(f"{run_dir} holds no checkpoints yet")
  chosen = step if step is not None else named if named is not None else max(steps)
  if chosen not in steps:
    raise UserError(f"no checkpoint for step {chosen} in {run_dir} (have {sorted(steps)})")
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


def load_for_inference(path: str, step: Optional[int] = None,
                       compute_dtype: Optional[str] = None) -> LoadedRun:
  """Loads a checkpoint's parameters onto the default device for sampling or evaluation.

  The compute dtype is resolved for this machine ("auto") unless given; so is the attention
  kernel, always (a run trained with cuDNN attention on a GPU still loads on a CPU).
  """
  run_dir, step = locate(path, step)
  config = read_config(run_dir)
  tok = read_tokenizer(run_dir)
  section = dict(config.model, attention_impl="auto")
  if compute_dtype:
    section["compute_dtype"] = compute_dtype
  cfg = hardware.resolve(ModelConfig.from_section(section, tok.vocab_size))
  abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = sharding.with_shardings(abstract, jax.tree.map(lambda _: device, abstract))
  with reader(run_dir) as mngr:
    params = restore(mngr, step, {"params": abstract})["params"]
  return LoadedRun(params, cfg, tok, config, step, run_dir)


def most_recent(workdir: str = "checkpoints") -> str:
  """The run under `workdir` whose checkpoints changed last: the default for the sampler."""
  runs = [p.parent for p in pathlib.Path(workdir).glob("*/ckpt")
          if any(c.name.isdigit() for c in p.iterdir())]
  if not runs:
    raise UserError(f"no --checkpoint given and no trained run in {workdir}/; train one with "
                    "python -m minigpt_jax.train --config configs/small.py")
  return str(max(runs, key=lambda r: (r / "ckpt").stat().st_mtime))
