"""A run directory: what training writes and sampling, evaluation and resuming read, and
the run while it is trained (`open_training`: its lock, corpus, state and saves).

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
import math
import os
import pathlib
import stat
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from minigpt_jax import checkpoints, data, hardware, preemption, report, sharding, train_step
from minigpt_jax.config import base_config, model_problem
from minigpt_jax.errors import UserError, WriteFailed, cause, out_of_memory_names, parse_json
from minigpt_jax.model import ModelConfig, flops_per_token, init_params, param_count
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
# (`config.model_problem` checks that one), with what each must be.
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
  or whose model section is (a field missing, a context_len of 10**12)."""
  for name, (valid, what) in _READ_FIELDS.items():
    section, field = name.split(".")
    if field not in config[section]:
      raise UserError(f"{path} is damaged: it has no {name}")
    if not valid(config[section][field]):
      raise UserError(f"{path} is damaged: {name} must be {what}, got "
                      f"{config[section][field]!r}")
  if problem := model_problem(config.model):
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


# --- a run while it is trained ---------------------------------------------------------------
# `train_loop.train` enters `open_training(...)` and calls the `Training` it yields: what
# protects the run (its lock, SIGTERM, the corpus it was trained on, fine-tune sources,
# damaged steps, failed saves) is here, out of the loop's way.

@contextlib.contextmanager
def open_training(config, cfg: ModelConfig, say):
  """The run `config.workdir/config.run_name`, opened for training: locked, its corpus
  prepared (the one its checkpoints were trained on, for a resume), its state fresh,
  fine-tuned from `config.init_from` or resumed, its checkpoint manager and reporter open.
  Yields a `Training`; on leaving, the last save is finished, never left half-done."""
  run_dir = pathlib.Path(config.workdir) / config.run_name
  with training_lock(run_dir), preemption.stop_on_sigterm(config.train.log_every) as stop:
    start, source, splits, train_sha256 = prepare_corpus(config, run_dir, say)
    mesh = check_fits(config, cfg, splits)
    state, tx, state_sh, start = init_or_restore(config, cfg, mesh, run_dir, start, say, source,
                                                 train_sha256)
    with contextlib.ExitStack() as stack:  # what it enters is left bottom up, on errors too
      mngr = stack.enter_context(checkpoints.manager(run_dir, keep=config.train.keep))
      # A failed write of a run file (a full disk): one line, naming the last checkpoint.
      stack.enter_context(failed_writes_named(mngr))
      reporter = stack.enter_context(report.TrainReporter(
          run_dir, jax.process_index() == 0, start or 0, config.train.steps,
          config.train.batch_size * cfg.context_len,
          mfu_fn=lambda tok_s: hardware.mfu(flops_per_token(cfg), tok_s)))
      end = min(config.train.steps, config.train.stop_at_step or config.train.steps)
      run = Training(config, run_dir, mesh, splits, state, tx, state_sh, start or 0, end,
                     reporter, mngr, train_sha256, stop)
      stack.callback(run.finish_saves)
      stack.enter_context(out_of_memory_names("train.batch_size"))  # XLA allocates at 1st call
      yield run


@dataclasses.dataclass
class Training:
  """What the training loop needs of its run: where it starts and ends, the corpus splits
  and the state, and calls to log, save and stop."""

  config: ml_collections.ConfigDict
  run_dir: pathlib.Path
  mesh: jax.sharding.Mesh
  splits: dict  # "train", "val": uint8 token arrays on the host
  initial_state: object  # train_step.TrainState on the mesh; the first step donates it
  tx: object  # the optimizer
  state_sh: object  # the state's shardings
  start: int  # the step the state is at
  end: int  # the step training stops at
  reporter: "report.TrainReporter"
  mngr: object  # the run's Orbax CheckpointManager
  train_sha256: str
  stop: preemption.StopFlag
  saving: Optional[int] = None  # the step of the save that may still be running

  def log(self, step: int, metrics) -> None:
    """Reports a step's metrics; a non-finite loss or update stops training (UserError)."""
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = next((k for k in ("loss", "update_norm") if not math.isfinite(metrics[k])), None)
    if bad:
      what = "loss" if bad == "loss" else "parameter update"
      last = self.mngr.latest_step()
      saved = ("no checkpoint was written" if last is None else
               f"the last checkpoint (step {last}) is intact; use a new --run_name to change "
               "train.lr")
      raise UserError(f"{what} is {metrics[bad]} at step {step}; stopped, {saved}. "
                      "Lower train.lr or check the data")
    self.reporter.train(step, metrics)

  def save(self, step: int, state) -> None:
    """Starts saving `state` as checkpoint `step` (in the background)."""
    self.finish_saves()  # Orbax waits for it anyway; an error must name that save's step
    self.saving = step
    try:
      checkpoints.save(self.mngr, step, state.params, state.opt_state,
                       {"step": step, "corpus_sha256": self.train_sha256})
    except Exception as e:  # Orbax raises OSErrors and its own types alike
      raise UserError(f"cannot save checkpoint step {step} in {self.mngr.directory}: "
                      f"{cause(e)}; training stopped ({kept(self.mngr)})") from e

  def check_saves(self) -> None:
    """Raises if the last (background) save has failed; never waits for one still running."""
    if self.saving is not None and not self.mngr.is_saving_in_progress():
      self.finish_saves()

  def finish_saves(self) -> None:
    """Waits for the last save; a failed one is a UserError naming its step and the cause."""
    step, self.saving = self.saving, None
    try:
      self.mngr.wait_until_finished()
    except Exception as e:  # Orbax has forgotten the failed step by now
      raise UserError(f"saving checkpoint step {step} in {self.mngr.directory} failed: "
                      f"{cause(e)}; training stopped ({kept(self.mngr)})") from e

  def begin_loop(self) -> None:
    """From now on SIGTERM stops training at a step boundary, with a checkpoint."""
    self.stop.loop_started = True

  def should_stop(self, step: int) -> bool:
    """Whether SIGTERM asked training to stop (the loop then calls `preempt`)."""
    return self.stop.should_stop(step)

  def preempt(self, step: int, state, pending) -> None:
    """Logs what is pending, saves step `step` (unless it was just saved) and raises Preempted."""
    if pending is not None:
      self.log(*pending)
    if self.mngr.latest_step() != step:
      self.save(step, state)
    self.finish_saves()
    raise preemption.Preempted(step)

  def finished_message(self, step: int) -> str:
    return finished_message(self.config, self.run_dir, self.start, step)


def prepare_corpus(config, run_dir: pathlib.Path, say):
  """The step to resume from (None: a new run), the checkpoint a new run fine-tunes
  (`finetune_source`; None: none), the corpus splits and the train split's sha256.

  Checkpoints record the train split they were trained on: a resume must load that corpus,
  and preparing the corpus (a rebuild, or one deleted) must not write another in its place.
  A resumed fine-tune run restores its own checkpoints: its source is not read again.
  """
  start, trained_sha256 = checkpoints.trained_on(run_dir) or (None, None)
  source = None
  if start is not None:  # a changed setting is named before any corpus work
    check_resumable(run_dir, config)
  elif config.init_from:  # and so is a model that cannot load
    source = finetune_source(config)
  splits, manifest = data.load_corpus_everywhere(config.data, CharTokenizer(), say,
                                                 keep_train_sha256=trained_sha256)
  sha256 = manifest["splits"]["train"]["sha256"]
  if start is not None and trained_sha256 != sha256:
    raise UserError(f"the train corpus differs from the one step {start} of {run_dir} was "
                    "trained on; resume with that corpus, or start a new --run_name")
  return start, source, splits, sha256


# The model fields a fine-tune must share with its source: they fix the parameters' shapes
# and what they mean (n_heads splits the same kernels into heads). The compute dtype and the
# attention kernel may change: parameters are float32 either way.
SAME_AS_SOURCE = ("context_len", "d_model", "n_layers", "n_heads", "d_ff", "vocab_pad_multiple",
                  "tie_embeddings")


def finetune_source(config) -> tuple[pathlib.Path, int]:
  """(run directory, step) of the checkpoint `config.init_from` names, at
  `config.init_from_step` (0: the latest), once its model and tokenizer are known to be
  `config`'s. Only reads the source run."""
  try:
    src_dir, step = locate(config.init_from, config.init_from_step or None)
    read_tokenizer(src_dir)  # refuses any but this code's
    saved = read_config(src_dir).model
  except UserError as e:
    raise UserError(f"cannot fine-tune from {config.init_from}: {e}") from None
  saved = {"tie_embeddings": False, **saved}  # a source saved before the field existed
  for name in SAME_AS_SOURCE:
    if saved.get(name) != config.model[name]:
      raise UserError(f"cannot fine-tune from {src_dir} step {step}: model.{name} is "
                      f"{config.model[name]!r} here but {saved.get(name)!r} in its config.json; "
                      f"a fine-tune keeps the model (drop --config.model.{name})")
  return src_dir, step


def check_fits(config, cfg: ModelConfig, splits: dict):
  """The mesh, once the splits are known to hold a window and the batch to divide over it."""
  for s in data.SPLITS:
    if splits[s].size <= cfg.context_len + 1:
      more = ("raise data.val_fraction (now {}) to hold out more files" if s == "val" else
              "lower data.val_fraction (now {})").format(config.data.val_fraction)
      raise UserError(f"the {s} split has {splits[s].size} chars, but a window of "
                      f"model.context_len {cfg.context_len} needs at least "
                      f"{cfg.context_len + 2}: add sources, {more}, or lower model.context_len")
  mesh = sharding.make_mesh(config.mesh)
  if config.train.batch_size % mesh.size:
    raise UserError(f"train.batch_size {config.train.batch_size} is not divisible by the "
                    f"{mesh.size} devices of the mesh")
  return mesh


def init_or_restore(config, cfg: ModelConfig, mesh, run_dir: pathlib.Path, start, say,
                    source=None, train_sha256=None):
  """A new run's state (and its config.json and tokenizer.json): fresh, or with the
  parameters of checkpoint `source` (run directory, step) to fine-tune and a fresh optimizer
  state (its schedule starts over too); or, resuming (`start` not None), the state of the
  newest intact checkpoint, laid out on `mesh`: `start`, or an older one if `start`'s
  arrays are damaged (it is set aside), trained on `train_sha256` all the same. Returns
  (state, optimizer, state shardings, the step restored: None for a new run)."""
  run_dir.mkdir(parents=True, exist_ok=True)
  sharding.sync_processes("run dir checked")  # before the lead writes config.json
  tx, abstract, state_sh = train_step.state_layout(config, cfg, mesh)
  target = sharding.with_shardings(abstract, state_sh)  # what Orbax restores onto
  if start is None:
    if jax.process_index() == 0:
      write_run_files(run_dir, config, CharTokenizer())
    state = train_step.fresh_state(config, cfg, tx, state_sh)
    if source is not None:  # make_optimizer's fresh state: zero moments whatever the params
      with checkpoints.reader(source[0]) as mngr:
        params = checkpoints.restore(mngr, source[1], {"params": target.params})["params"]
      state = state.replace(params=params)
      say(f"fine-tuning from {source[0]} step {source[1]}: its parameters, a fresh optimizer")
  else:  # the one read of the arrays, checked against their checksums (`trained_on` read
    # only the newest intact "meta" item, the same in every step of a run)
    start, got = checkpoints.restore_newest(
        run_dir, {"params": target.params, "opt_state": target.opt_state}, holding_lock=True)
    if got["meta"].get("corpus_sha256", "") != train_sha256:
      raise UserError(f"the train corpus differs from the one step {start} of {run_dir} (the "
                      "newest intact step) was trained on; resume with that corpus, or start a "
                      "new --run_name")
    state = train_step.TrainState(jax.device_put(jnp.asarray(start, jnp.int32), state_sh.step),
                                  got["params"], got["opt_state"])
    say(f"resuming {run_dir} from step {start}")
  say(f"model: {param_count(abstract.params):,} parameters, "
      f"{flops_per_token(cfg) / 1e6:.1f} MFLOP/token, compute {cfg.compute_dtype}, "
      f"attention {cfg.attention_impl}; devices: {jax.device_count()} x "
      f"{jax.devices()[0].device_kind}, mesh {dict(mesh.shape)}")
  return state, tx, state_sh, start


def kept(mngr) -> str:
  """The last complete checkpoint of the run `mngr` saves, in words."""
  last = mngr.latest_step()
  return "no checkpoint is complete" if last is None else f"step {last} is the last complete one"


@contextlib.contextmanager
def failed_writes_named(mngr):
  """Turns a WriteFailed of the block (metrics, samples, event files) into a UserError
  that names the last complete checkpoint of `mngr`."""
  try:
    yield
  except WriteFailed as e:
    raise UserError(f"{e}; training stopped ({kept(mngr)})") from e


def finished_message(config, run_dir: pathlib.Path, start: int, step: int) -> str:
  if step > start:
    return f"done: step {step}, checkpoints in {run_dir / 'ckpt'}"
  if config.train.stop_at_step and config.train.stop_at_step <= start:
    return (f"{run_dir} is already at step {start}, past train.stop_at_step "
            f"{config.train.stop_at_step}; raise it (or set it to 0) to train further")
  return f"{run_dir} is already at step {start}; raise --config.train.steps to train further"
