"""A run's Orbax checkpoints: save, restore, and fall back past damaged ones.

    <run>/ckpt/<step>/          items "params", "opt_state" and "meta"
    <run>/ckpt/<step>.damaged/  a damaged checkpoint, set aside (never deleted)

The "meta" item (JSON) records the step, the train split's sha256 and a CRC-32 of every
saved array ("checksums"); a restore recomputes them, so flipped bytes make a step damaged
rather than a model of NaNs. Checkpoints saved before checksums were recorded still load.

Training saves with `manager`; everything else reads with `reader`. A reader picks the
newest step it can restore, retrying when training's retention removes one meanwhile.
"""

import fcntl
import gc
import inspect
import logging
import os
import pathlib
import re
import stat
import sys
import warnings
import zlib
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from minigpt_jax.errors import UserError, first_line

DAMAGED = ".damaged"  # ckpt/<step> renamed ckpt/<step>.damaged: no longer a step to Orbax


class _Gone(UserError):
  """The checkpoint was removed (by training's retention) while it was being read."""


class _Damaged(UserError):
  """The checkpoint's files cannot be read back as they were saved."""


class _Unrestorable(UserError):
  """Orbax could not restore a checkpoint; `reason` is the bottom of its error chain."""

  def __init__(self, message: str, reason: str):
    super().__init__(message)
    self.reason = reason


def manager(run_dir: pathlib.Path, keep: int = 3) -> ocp.CheckpointManager:
  """The manager training saves with: it keeps the last `keep` checkpoints. Call it only
  while holding the run's lock: it removes what killed saves left half-written."""
  _quiet_orbax_metadata_warnings()
  _quiet_failed_save_noise()
  set_aside_non_folders(run_dir)
  # Orbax removes the temporary folders of saves a crash or a kill interrupted.
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(pathlib.Path(run_dir).absolute() / "ckpt", options=options)


def set_aside_non_folders(run_dir: pathlib.Path) -> None:
  """Sets aside a ckpt/<step> that is not a folder of its own (a plain file, a symlink):
  Orbax lists no step at a file or a broken link, so a save of that step would delete it
  silently or fail on it with tracebacks; through a link to a folder, training would
  restore, prune and delete someone else's files. Training's alone."""
  ckpt = pathlib.Path(run_dir) / "ckpt"
  if jax.process_index() != 0 or not ckpt.is_dir():
    return
  for p in sorted(ckpt.iterdir()):
    if not p.name.isdigit() or (p.is_dir() and not p.is_symlink()):
      continue
    try:
      os.stat(p)
      what = "is a symlink" if p.is_symlink() else "is not a folder"
    except OSError as e:  # ELOOP, ENOENT for a symlink to nothing
      what = f"is a symlink that cannot be followed ({e.strerror or e})"
    _set_aside(run_dir, int(p.name), f"checkpoint step {p.name} in {ckpt} {what}",
               holding_lock=True)


_quieted = False


def _quiet_orbax_metadata_warnings() -> None:
  """Drops Orbax's "Metadata file does not exist" lines, repeated at every listing and
  restore of a step without its _CHECKPOINT_METADATA (an empty, unreadable or part-deleted
  step folder, named so even when the cause is a permission): `_check_step_folder` says
  once, with the true cause, what is wrong with a step tried."""
  global _quieted
  if _quieted:
    return
  _quieted = True
  said = ("Metadata file does not exist", "Failed to read Metadata file")
  logging.getLogger("absl").addFilter(
      lambda r: "/orbax/" not in r.pathname or not str(r.msg).startswith(said))


def _quiet_failed_save_noise() -> None:
  """Drops what a failed background save prints (a full disk, say): each of Orbax's save
  threads logs its error with a traceback, and TensorStore's writes still in flight print
  "Event loop is closed" tracebacks once Orbax has closed their loop, hundreds of lines in
  all, as the reads a failed restore abandons do. The save's error reaches training, which
  names it in one line (`train_loop`)."""
  global _save_noise_quieted
  if _save_noise_quieted:
    return
  _save_noise_quieted = True
  _silence_abandoned_reads()
  said = ("raised an exception", "Failed to run", "Save Finalize thread")
  logging.getLogger("absl").addFilter(lambda r: "/orbax/" not in r.pathname or not (
      r.levelno >= logging.ERROR and any(s in r.getMessage() for s in said)))
  default_hook = sys.excepthook

  def hook(kind, e, tb):  # TensorStore's callback threads print through sys.excepthook
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
      default_hook(kind, e, tb)

  sys.excepthook = hook


_save_noise_quieted = False


def reader(run_dir: pathlib.Path) -> ocp.CheckpointManager:
  """A manager that only reads (not Orbax's read_only option, which warns on every use);
  use it in a `with` block, which closes it."""
  _quiet_orbax_metadata_warnings()
  options = ocp.CheckpointManagerOptions(create=False)
  for _ in range(5):
    try:
      return ocp.CheckpointManager(pathlib.Path(run_dir).absolute() / "ckpt", options=options)
    except FileNotFoundError:  # a step deleted (retention) while Orbax was listing it: again
      continue
  raise UserError(f"cannot list the checkpoints of {run_dir}: they keep being removed")


def list_steps(run_dir: pathlib.Path) -> list[int]:
  with reader(run_dir) as mngr:
    return sorted(mngr.all_steps())


def save(mngr: ocp.CheckpointManager, step: int, params, opt_state, meta: dict) -> None:
  """Saves step `step`, with `meta` and the checksums of `params` and `opt_state` (taken
  now, before the save goes on in the background) as its "meta" item."""
  meta = {**meta, "checksums": {"params": checksums(params), "opt_state": checksums(opt_state)}}
  mngr.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
      meta=ocp.args.JsonSave(meta)), force=True)


def _leaf_name(path) -> str:
  """"opt_state"-style paths as "0/mu/block_0/ffn/up/kernel": the same whether the tree is
  the live one (tuples, named tuples) or Orbax's reading of it without a target (dicts)."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                  for k in path)


def checksums(tree) -> dict[str, int]:
  """The CRC-32 of each array's bytes in `tree`, by leaf name. An array split across
  processes is gathered whole first (every process must call this)."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  whole = [multihost_utils.process_allgather(x, tiled=True)
           if isinstance(x, jax.Array) and not x.is_fully_addressable else x for _, x in leaves]
  return {_leaf_name(path): zlib.crc32(np.ascontiguousarray(x).reshape(-1).view(np.uint8))
          for (path, _), x in zip(leaves, jax.device_get(whole))}


def _check_integrity(got: dict, where: str) -> None:
  """Raises _Damaged unless the arrays of `got` (restored items, with "meta") have the
  checksums recorded when they were saved. A checkpoint without them passes."""
  meta = got["meta"]
  if not isinstance(meta, dict):
    raise _Damaged(f"{where} (its metadata is not a JSON object)")
  if "checksums" not in meta:  # saved before checksums were recorded
    return
  recorded = meta["checksums"]
  for item, tree in got.items():
    if item == "meta":
      continue
    want = recorded.get(item) if isinstance(recorded, dict) else None
    if not isinstance(want, dict):
      raise _Damaged(f"{where} (its metadata records no checksums of {item})")
    have = checksums(tree)
    bad = [name for name, crc in have.items() if want.get(name) != crc]
    if bad:
      raise _Damaged(f"{where} ({item}/{bad[0]}: not the bytes that were saved (checksum); "
                     f"{len(bad)} of {len(have)} arrays differ)")


_CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"  # Orbax's record of a step's save
_warned_no_record = set()


def _check_step_folder(step_dir: pathlib.Path, where: str) -> bool:
  """Raises _Damaged, with the cause, for a step folder Orbax could not read (unreadable,
  empty), and _Gone for one removed. Returns whether it holds Orbax's record of the save."""
  try:
    names = os.listdir(step_dir)
  except FileNotFoundError:
    raise _Gone(f"checkpoint {step_dir} was removed while it was being read")
  except OSError as e:
    raise _Damaged(f"{where} (it cannot be read: {e.strerror or e})")
  if not names:
    raise _Damaged(f"{where} (its folder is empty)")
  return _CHECKPOINT_METADATA in names


def _read_without_record(step_dir: pathlib.Path) -> None:
  """Says once that a step without Orbax's record of the save was read all the same."""
  if step_dir not in _warned_no_record:
    _warned_no_record.add(step_dir)
    logging.warning("checkpoint %s has no %s (Orbax's record of the save); its items read "
                    "back as saved, so it is used", step_dir, _CHECKPOINT_METADATA)


def _damaged_where(directory, step: int) -> str:
  return f"cannot restore checkpoint step {step} in {directory}: it is damaged"


def restore(mngr: ocp.CheckpointManager, step: int, abstract: dict) -> dict:
  """Restores the items named in `abstract` ({"params": tree, ...} of ShapeDtypeStructs
  carrying the target shardings, so a run saved on one mesh loads onto another), and the
  "meta" item; raises _Damaged if the arrays are not the bytes that were saved."""
  where, step_dir = _damaged_where(mngr.directory, step), pathlib.Path(mngr.directory) / str(step)
  recorded = _check_step_folder(step_dir, where)
  args = {k: ocp.args.StandardRestore(v) for k, v in abstract.items()}
  got = _restore(mngr, step, ocp.args.Composite(**args, meta=ocp.args.JsonRestore()))
  _check_integrity(got, where)
  if not recorded:
    _read_without_record(step_dir)
  return got


def _restore(mngr: ocp.CheckpointManager, step: int, args: ocp.args.Composite) -> dict:
  _silence_abandoned_reads()  # before: the abandoned reads may print while Orbax still raises
  try:
    return dict(mngr.restore(step, args=args))
  except Exception as e:  # Orbax raises many types for a damaged checkpoint
    reason = _root_cause(e)
  gc.collect()  # the abandoned reads end now, not at some later point
  raise _Unrestorable(f"cannot restore checkpoint step {step} in {mngr.directory}: {reason}",
                      reason)


def _root_cause(e: BaseException) -> str:
  """One line for the exception at the bottom of `e`'s chain (Orbax's wrappers above it
  add a cut-off TensorStore spec dump)."""
  while True:
    below = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    if below is None:
      break
    e = below
  kind = "" if type(e) in (Exception, ValueError) else f"{type(e).__name__}: "
  return kind + first_line(e, limit=600)


_silenced = False


def _silence_abandoned_reads() -> None:
  """Drops, for the rest of the process, what the reads abandoned by a failed restore print
  (installed before the first restore; the hooks pass everything else on).

  When one array fails to read, Orbax returns at once and closes its event loop, leaving
  the other arrays' reads pending: they end later, from TensorStore's threads or when
  collected, with hundreds of lines of "Event loop is closed", "Exception ignored in
  <coroutine>", "coroutine ... was never awaited" and "Task exception was never retrieved"
  that say nothing new; they may start while Orbax is still raising. Later, not just
  during the restore: hence for the rest of the process.
  """
  global _silenced
  if _silenced:
    return
  _silenced = True
  default_hook = sys.unraisablehook

  def hook(unraisable):
    e, obj = unraisable.exc_value, unraisable.object
    from_orbax = inspect.iscoroutine(obj) and "/orbax/" in obj.cr_code.co_filename
    closed_loop = isinstance(e, RuntimeError) and str(e) == "Event loop is closed"
    if not (from_orbax or closed_loop):
      default_hook(unraisable)

  sys.unraisablehook = hook
  # A pending read collected before it ever started: Python warns rather than reports it.
  warnings.filterwarnings("ignore", r"coroutine '.*' was never awaited", RuntimeWarning)
  # asyncio's "<Task|Future|_GatheringFuture> exception was never retrieved" and kin.
  dropped = re.compile(r"\w+ exception was never retrieved|Task was destroyed but it is pending")
  logging.getLogger("asyncio").addFilter(lambda r: not dropped.match(r.getMessage()))


def _read_whole(run_dir: pathlib.Path, step: int, items: tuple[str, ...]) -> dict:
  """Reads the array `items` and "meta" of checkpoint `step` whole into host memory, in the
  layout they were saved with (no target: any mesh); raises _Damaged if they cannot be read
  back as they were saved."""
  step_dir = pathlib.Path(run_dir).absolute() / "ckpt" / str(step)
  where = _damaged_where(step_dir.parent, step)
  recorded = _check_step_folder(step_dir, where)
  args = {}
  for k in (*items, "meta"):
    if k == "meta":
      args[k] = ocp.args.JsonRestore()
      continue
    handler = ocp.PyTreeCheckpointHandler()
    try:
      tree = handler.metadata(step_dir / k).tree
    except Exception as e:  # a missing or unreadable _METADATA
      raise _Damaged(f"{where} ({k}: {_root_cause(e)})")
    finally:
      handler.close()
    host = ocp.RestoreArgs(restore_type=np.ndarray)
    args[k] = ocp.args.PyTreeRestore(restore_args=jax.tree.map(lambda _: host, tree))
  try:
    with reader(run_dir) as mngr:
      got = _restore(mngr, step, ocp.args.Composite(**args))
  except _Unrestorable as e:
    raise _Damaged(f"{where} ({e.reason})")
  _check_integrity(got, where)
  if not recorded:
    _read_without_record(step_dir)
  return got


def _restore_step(run_dir: pathlib.Path, step: int, abstract: dict) -> dict:
  """`restore` of one step, telling why it failed: _Gone (removed meanwhile), _Damaged
  (unreadable as saved), else UserError (e.g. shapes other than config.json's)."""
  try:
    with reader(run_dir) as mngr:
      return restore(mngr, step, abstract)
  except (_Gone, _Damaged):
    raise
  except UserError as e:
    failure = e
  if step not in list_steps(run_dir):
    raise _Gone(f"checkpoint step {step} of {run_dir} was removed while it was being read")
  _read_whole(run_dir, step, tuple(abstract))  # raises _Damaged if the files are at fault
  raise failure


def _being_trained(run_dir: pathlib.Path) -> bool:
  """Whether a training process holds the run's lock (probed with a shared lock)."""
  try:  # non-blocking: a FIFO planted as .lock must not hang a reader
    fd = os.open(run_dir / ".lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
  except OSError:
    return False
  try:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
      return True  # not a lock training made: touch nothing
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False
  except OSError:  # held, or no locks on this filesystem: assume the worst
    return True
  finally:
    os.close(fd)


def _set_aside(run_dir: pathlib.Path, step: int, why: str, holding_lock: bool) -> None:
  """Renames damaged ckpt/<step> to ckpt/<step>.damaged (kept, no longer a step), so that
  no one tries it again and a later save of that step does not collide with it."""
  src = pathlib.Path(run_dir) / "ckpt" / str(step)
  if jax.process_index() != 0:  # process 0 moves it (and says so) for all
    return
  if not holding_lock and _being_trained(run_dir):  # its retention must find it in place
    logging.warning("%s (the damaged one is left in place: the run may be being trained)", why)
    return
  dst, n = src.with_name(f"{step}{DAMAGED}"), 1
  while dst.exists() or dst.is_symlink():
    dst, n = src.with_name(f"{step}{DAMAGED}-{n}"), n + 1
  try:
    os.rename(src, dst)
  except OSError as e:
    logging.warning("%s (it cannot be set aside: %s)", why, e.strerror or e)
    return
  logging.warning("%s; the damaged one is set aside as %s", why, dst)


def _newest(run_dir: pathlib.Path, attempt, holding_lock: bool):
  """(step, attempt(step)) for the newest step `attempt` succeeds on, skipping steps that
  vanish (_Gone) or are damaged (_Damaged: set aside once an intact one is found, left in
  place and named in the UserError raised if none is); None for a run without checkpoints."""
  tried, damaged = set(), []
  while steps := [s for s in list_steps(run_dir) if s not in tried]:
    step = steps[-1]
    tried.add(step)
    try:
      result = attempt(step)
    except _Gone:
      continue
    except _Damaged as e:
      damaged.append((step, str(e)))
      continue
    for bad, why in damaged:
      _set_aside(run_dir, bad, f"{why}; taking step {step} instead", holding_lock)
    return step, result
  if damaged:
    raise UserError(f"{damaged[0][1]}; no intact checkpoint to fall back on (tried steps "
                    f"{sorted(tried)})")
  return None


def restore_newest(run_dir: pathlib.Path, abstract: dict, step: Optional[int] = None,
                   holding_lock: bool = False) -> tuple[int, dict]:
  """(step, items) of checkpoint `step` (as `restore`), or by default of the newest intact
  one: damaged ones are skipped with a warning (and set aside, unless a training holds the
  run), and so are ones training's retention removes meanwhile. It never deletes anything;
  unless `holding_lock` (training resuming), it renames a damaged step only while no
  training holds the run."""
  if step is not None:
    return step, _restore_step(run_dir, step, abstract)
  if holding_lock:  # before the listing: a step linked from elsewhere is not this run's
    set_aside_non_folders(run_dir)
  found = _newest(run_dir, lambda s: _restore_step(run_dir, s, abstract), holding_lock)
  if found is None:
    raise UserError(f"{run_dir} holds no checkpoints yet")
  return found


def trained_on(run_dir: pathlib.Path, step: Optional[int] = None) -> Optional[tuple[int, str]]:
  """(step, sha256 of the train split it was trained on) for checkpoint `step`; None for a
  run without checkpoints. By default the newest step whose "meta" item reads, for training
  to resume from: it sets aside newer ones whose does not, so call it only holding the run's
  lock. Only the "meta" item is read: the resume's restore checks the arrays against its
  checksums (and falls back past damaged ones to steps of the same run, trained on the same
  corpus). Orbax synchronises all processes when it opens checkpoints: every process must
  call this."""
  run_dir = pathlib.Path(run_dir)
  if not (run_dir / "ckpt").is_dir():
    return None
  if step is None:
    found = _newest(run_dir, lambda s: _read_whole(run_dir, s, ()), holding_lock=True)
    if found is None:
      return None
    step, got = found
  else:
    if step not in list_steps(run_dir):  # removed by training's retention since it was picked
      raise _Gone(f"checkpoint step {step} of {run_dir} was removed while it was being read")
    got = _read_whole(run_dir, step, ())
  return step, got["meta"].get("corpus_sha256", "")
