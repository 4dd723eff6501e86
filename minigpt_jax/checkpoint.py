"""Run directories: Orbax checkpoints plus the config and tokenizer needed to sample.

    checkpoints/<run>/config.json      the full config the run was started with
    checkpoints/<run>/tokenizer.json
    checkpoints/<run>/metrics.jsonl    appended by training
    checkpoints/<run>/ckpt/<step>/     Orbax: items "params" and "opt_state", "meta"
    checkpoints/<run>/.lock            held (flock) by the training process writing the run
"""

import fcntl
import json
import logging
import os
import pathlib
from typing import Optional

import jax
import ml_collections
import orbax.checkpoint as ocp

from minigpt_jax.errors import UserError
from minigpt_jax.model import ModelConfig, init_params
from minigpt_jax.tokenizer import CharTokenizer


def manager(run_dir: pathlib.Path, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  """A manager for training (keeps the last `keep`) or, with `read_only`, for loading only."""
  if read_only:  # not Orbax's read_only option, which warns on every use; this one never saves
    options = ocp.CheckpointManagerOptions(create=False)
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(pathlib.Path(run_dir).absolute() / "ckpt", options=options)


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
  try:  # name the holder for whoever finds the lock taken
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    f.flush()
  except OSError:
    f.close()
    raise
  return f


def remove_if_only_lock(run_dir: pathlib.Path) -> None:
  """Removes `run_dir` if it holds nothing but its lock (call it while holding the lock)."""
  try:
    if [p.name for p in run_dir.iterdir()] == [".lock"]:
      (run_dir / ".lock").unlink()
      run_dir.rmdir()
  except OSError:  # gone already, or written to meanwhile: leave it
    pass


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
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"cannot restore checkpoint step {step} in {mngr.directory}: {first[:300]}")


def trained_on(run_dir: pathlib.Path, step: Optional[int] = None) -> Optional[tuple[int, str]]:
  """(step, sha256 of the train split it was trained on) for checkpoint `step` (default: the
  latest); None for a run without checkpoints. Orbax synchronises all processes when it
  opens checkpoints: in a multi-process run, every process must call this."""
  if not (pathlib.Path(run_dir) / "ckpt").is_dir():
    return None
  mngr = manager(run_dir, read_only=True)
  try:
    step = mngr.latest_step() if step is None else step
    if step is None:
      return None
    return step, restore(mngr, step, {"meta": None})["meta"].get("corpus_sha256", "")
  finally:
    mngr.close()


def read_run_config(run_dir: pathlib.Path) -> ml_collections.ConfigDict:
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


def locate(path: str, step: Optional[int] = None) -> tuple[pathlib.Path, int]:
  """Accepts a run directory, its ckpt/ folder or one ckpt/<step>/ folder.

  Returns (run directory, step): `step` if given, else the one named by the
  path, else the latest.
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
  mngr = manager(run_dir, read_only=True)
  steps = mngr.all_steps()
  if not steps:
    raise UserError(f"{run_dir} holds no checkpoints yet")
  chosen = step if step is not None else named if named is not None else mngr.latest_step()
  if chosen is None or chosen not in steps:
    raise UserError(f"no checkpoint for step {chosen} in {run_dir} (have {sorted(steps)})")
  return run_dir, chosen


def load_for_inference(path: str, step: Optional[int] = None, compute_dtype: Optional[str] = None):
  """Loads parameters onto the default device for sampling or evaluation.

  Returns (params, ModelConfig, CharTokenizer, run config, step, run directory). The compute
  dtype is resolved for this machine ("auto") unless given; so is the attention kernel, always
  (a run trained with cuDNN attention on a GPU still loads on a CPU).
  """
  run_dir, step = locate(path, step)
  config = read_run_config(run_dir)
  tok = read_tokenizer(run_dir)
  model_cfg = ml_collections.ConfigDict(dict(config.model, attention_impl="auto"))
  if compute_dtype:
    model_cfg.compute_dtype = compute_dtype
  cfg = ModelConfig.from_config(model_cfg, tok.vocab_size)
  abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  params = restore(manager(run_dir, read_only=True), step, {"params": abstract})["params"]
  return params, cfg, tok, config, step, run_dir


def most_recent_run(workdir: str = "checkpoints") -> str:
  """The run under `workdir` whose checkpoints changed last: the default for the sampler."""
  runs = [p.parent for p in pathlib.Path(workdir).glob("*/ckpt")
          if any(c.name.isdigit() for c in p.iterdir())]
  if not runs:
    raise UserError(f"no --checkpoint given and no trained run in {workdir}/; train one with "
                    "python -m minigpt_jax.train --config configs/small.py")
  return str(max(runs, key=lambda r: (r / "ckpt").stat().st_mtime))
