"""The run directory under damage: broken or vanishing checkpoints, planted symlinks,
malformed metadata, FIFOs and the leftovers of a crashed save."""

import errno
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import threading

import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import REPO, ok, one_line_error, run_command, run_module, tiny_config_in
from minigpt_jax import checkpoints, runs, scoring, tokenizer, train_loop
from minigpt_jax.errors import UserError
from minigpt_jax.tokenizer import CharTokenizer

# What abandoned asynchronous Orbax/TensorStore reads print when nobody drains them.
NOISE = ("Traceback", "Task exception", "Future exception", "Exception ignored",
         "Event loop is closed", "<bound method", "was never awaited")


def quiet(*_):
  pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_dir):
  """A tiny run with checkpoints at steps 10 and 20 (trained once; tests copy it)."""
  root = tmp_path_factory.mktemp("trained")
  c = tiny_config_in(root, corpus_dir)
  c.train.steps, c.train.ckpt_every, c.sample.num_samples = 20, 10, 0
  train_loop.train(c, log=quiet)
  return root, c


@pytest.fixture
def run(trained, tmp_path):
  """(config, run directory): a private copy of `trained`'s run (its corpus is shared)."""
  root, c = trained
  c = c.copy_and_resolve_references()
  c.workdir = str(tmp_path / "runs")
  run_dir = tmp_path / "runs" / c.run_name
  shutil.copytree(root / "runs" / c.run_name, run_dir)
  return c, run_dir


def damage(run_dir: pathlib.Path, step: int) -> None:
  """As the hostile tester did: truncate the parameter data files of checkpoint `step`."""
  files = list((run_dir / "ckpt" / str(step) / "params" / "ocdbt.process_0" / "d").iterdir())
  assert files
  for f in files:
    os.truncate(f, f.stat().st_size // 2)


def steps_of(run_dir: pathlib.Path) -> list[int]:
  with checkpoints.reader(run_dir) as mngr:
    return mngr.all_steps()


def assert_quiet(stderr: str) -> None:
  for noise in NOISE:
    assert noise not in stderr, stderr[-3000:]


# --- damaged checkpoints --------------------------------------------------------------------

def test_a_resume_skips_a_damaged_checkpoint_and_sets_it_aside(run):
  c, run_dir = run
  damage(run_dir, 20)
  summary = train_loop.train(c, log=quiet)
  assert summary.first_step == 10 and summary.last_step == 20
  assert (run_dir / "ckpt" / "20.damaged" / "params").is_dir()  # moved, not deleted
  assert steps_of(run_dir) == [10, 20]  # the new step 20 did not collide with it


def test_sampling_falls_back_past_a_damaged_checkpoint_with_a_clean_stderr(run):
  _, run_dir = run
  damage(run_dir, 20)
  proc = ok(run_module("minigpt_jax.sample", "--checkpoint", str(run_dir),
                       "--max_new_tokens", "4"))
  assert "[step 10," in proc.stdout + proc.stderr  # the sampler's closing line
  assert "step 20" in proc.stderr and "damaged" in proc.stderr  # the warning
  assert_quiet(proc.stderr)
  assert (run_dir / "ckpt" / "20.damaged").is_dir() and steps_of(run_dir) == [10]


def test_an_explicitly_chosen_damaged_step_fails_with_one_clean_line(run):
  _, run_dir = run
  damage(run_dir, 20)
  proc = run_module("minigpt_jax.sample", "--checkpoint", str(run_dir / "ckpt" / "20"))
  one_line_error(proc, "step 20", "damaged")
  assert_quiet(proc.stderr)
  assert steps_of(run_dir) == [10, 20]  # asked for by name: reported, left where it is


_LOAD_REPEATEDLY = """
import sys
from minigpt_jax import runs
from minigpt_jax.errors import UserError
for _ in range(8):  # each failed load abandons reads; their noise is random in timing
  try:
    runs.load_for_inference(sys.argv[1], step=20)
  except UserError as e:
    print("caught:", e, file=sys.stderr)
"""


def test_failed_restores_leave_no_asyncio_noise_behind(run):
  _, run_dir = run
  damage(run_dir, 20)
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", _LOAD_REPEATEDLY, str(run_dir)], env=env,
                        capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 8 and all(l.startswith("caught:") for l in lines), proc.stderr[-3000:]
  assert_quiet(proc.stderr)


def test_evaluate_falls_back_past_a_damaged_checkpoint(run):
  _, run_dir = run
  damage(run_dir, 20)
  # The command names its report after the step it evaluated, not the damaged newest one.
  proc = ok(run_command("minigpt_jax.evaluate", f"--checkpoint={run_dir}", "--num_samples=0"))
  assert "eval_step10.json" in proc.stdout
  assert sorted(p.name for p in run_dir.glob("eval_step*.json")) == ["eval_step10.json"]
  assert json.loads((run_dir / "eval_step10.json").read_text())["step"] == 10


def test_with_every_checkpoint_damaged_a_resume_names_the_newest_and_moves_none(run):
  """Nothing to fall back on: nothing is moved (the run cannot be resumed, so no save can
  collide with them), and the resume never starts afresh over the run."""
  c, run_dir = run
  damage(run_dir, 10)
  damage(run_dir, 20)
  for _ in range(2):
    with pytest.raises(UserError, match="step 20 .*damaged.*no intact checkpoint"):
      train_loop.train(c, log=quiet)
  assert steps_of(run_dir) == [10, 20]
  assert not list((run_dir / "ckpt").glob("*.damaged*"))


def test_a_shape_mismatch_is_not_mistaken_for_damage(run):
  """An edited config.json makes every restore fail; no checkpoint may be moved for that."""
  _, run_dir = run
  saved = json.loads((run_dir / "config.json").read_text())
  saved["model"]["d_ff"] = 128
  (run_dir / "config.json").write_text(json.dumps(saved))
  with pytest.raises(UserError, match="step 20") as e:
    runs.load_for_inference(str(run_dir))
  assert "damaged" not in str(e.value) and "checksum" not in str(e.value)
  assert steps_of(run_dir) == [10, 20]


# --- reading while training deletes old checkpoints -----------------------------------------

def test_a_checkpoint_removed_between_listing_and_restoring_is_skipped(run, monkeypatch):
  _, run_dir = run
  real_restore = ocp.CheckpointManager.restore

  def retention_strikes(self, step, *args, **kwargs):
    if step == 20:  # the trainer's retention removes it just now
      shutil.rmtree(run_dir / "ckpt" / "20", ignore_errors=True)
    return real_restore(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "restore", retention_strikes)
  loaded = runs.load_for_inference(str(run_dir))
  assert loaded.step == 10
  assert not (run_dir / "ckpt" / "20.damaged").exists()  # gone, not damaged


def test_a_step_vanishing_while_orbax_lists_the_steps_is_retried(run, monkeypatch):
  _, run_dir = run
  calls = []

  class ListingRaces(ocp.CheckpointManager):
    """Orbax's manager, whose first opening meets a step deleted between Orbax's listing of
    the steps and its stat of it (training's retention), as Orbax raises it then."""

    def __init__(self, *args, **kwargs):
      calls.append(1)
      if len(calls) == 1:
        raise FileNotFoundError(2, "No such file or directory", str(run_dir / "ckpt" / "20"))
      super().__init__(*args, **kwargs)

  monkeypatch.setattr(ocp, "CheckpointManager", ListingRaces)
  assert runs.load_for_inference(str(run_dir)).step == 20
  assert len(calls) >= 2  # the listing was tried again


# --- planted symlinks -----------------------------------------------------------------------

@pytest.mark.parametrize("name", [".lock", "config.json", "tokenizer.json"])
def test_a_planted_symlink_in_a_new_run_is_refused_and_its_target_kept(tiny_config, tmp_path,
                                                                        name):
  outside = tmp_path / "precious.txt"
  outside.write_text("keep me\n")
  run_dir = pathlib.Path(tiny_config.workdir) / tiny_config.run_name
  run_dir.mkdir(parents=True)
  (run_dir / name).symlink_to(outside)
  tiny_config.train.steps, tiny_config.sample.num_samples = 2, 0
  with pytest.raises(UserError, match="symlink"):
    train_loop.train(tiny_config, log=quiet)
  assert outside.read_text() == "keep me\n"
  assert (run_dir / name).is_symlink()  # left for its owner to look at


@pytest.mark.parametrize("name", ["metrics.jsonl", "samples", "ckpt", "run folder"])
def test_every_planted_symlink_training_would_write_through_is_refused(tiny_config, tmp_path,
                                                                       name):
  """Not only .lock, config.json and tokenizer.json: whatever training writes in a run
  folder, and the run folder itself, is refused as a symlink, its target left untouched."""
  outside = tmp_path / "someone_elses"
  outside.mkdir()
  (outside / "metrics.jsonl").write_text("theirs\n")
  run_dir = pathlib.Path(tiny_config.workdir) / tiny_config.run_name
  run_dir.parent.mkdir(parents=True)
  if name == "run folder":
    link = run_dir
  else:
    run_dir.mkdir()
    link = run_dir / name
  link.symlink_to(outside / "metrics.jsonl" if name == "metrics.jsonl" else outside)
  tiny_config.train.steps, tiny_config.train.log_every = 2, 1
  with pytest.raises(UserError, match=f"{link} is a symlink") as e:
    train_loop.train(tiny_config, log=quiet)
  assert "\n" not in str(e.value)
  assert sorted(p.name for p in outside.iterdir()) == ["metrics.jsonl"]  # nothing written in
  assert (outside / "metrics.jsonl").read_text() == "theirs\n" and link.is_symlink()


def test_a_symlink_planted_while_training_runs_is_refused_when_it_is_written(tiny_config,
                                                                            tmp_path, monkeypatch):
  outside = tmp_path / "someone_elses"
  outside.mkdir()
  run_dir = pathlib.Path(tiny_config.workdir) / tiny_config.run_name
  real = runs.write_run_files

  def then_plant(*args, **kwargs):  # after the checks at the start
    real(*args, **kwargs)
    (run_dir / "samples").symlink_to(outside)

  monkeypatch.setattr(runs, "write_run_files", then_plant)
  tiny_config.train.steps, tiny_config.train.eval_every = 2, 2
  with pytest.raises(UserError, match=r"samples is a symlink"):
    train_loop.train(tiny_config, log=quiet)
  assert list(outside.iterdir()) == []


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "metrics.jsonl", ".lock"])
def test_a_fifo_in_a_run_folder_is_refused_by_training_at_once(run, name):
  c, run_dir = run
  (run_dir / name).unlink(missing_ok=True)
  os.mkfifo(run_dir / name)
  c.train.steps = 30
  with pytest.raises(UserError, match=f"{run_dir / name} is not a regular file"):
    train_loop.train(c, log=quiet)  # before, it waited for a writer (or reader) forever


def _writer_after(seconds: float, fifo: pathlib.Path) -> threading.Timer:
  """Opens `fifo` for writing, and closes it, after `seconds`, should a reader be waiting on
  it by then: a command that opened it fails (at its end of file) instead of hanging the
  test run. Cancel it once the command is over."""
  def open_and_close():
    try:
      os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # ENXIO: no reader, as it should be
      pass
  timer = threading.Timer(seconds, open_and_close)
  timer.daemon = True
  timer.start()
  return timer


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_a_fifo_in_a_run_folder_is_one_error_line_for_sample(run, name):
  _, run_dir = run
  (run_dir / name).unlink()
  os.mkfifo(run_dir / name)
  unblock = _writer_after(30, run_dir / name)  # before, it waited for a writer forever
  try:
    proc = run_command("minigpt_jax.sample", "--checkpoint", str(run_dir))
  finally:
    unblock.cancel()
  one_line_error(proc, f"{name} is not a regular file")


def test_resuming_on_a_read_only_filesystem_says_so(run, monkeypatch):
  c, run_dir = run
  real = os.open

  def read_only(path, flags, *args, **kwargs):
    if str(path).startswith(str(run_dir)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
      raise OSError(errno.EROFS, "Read-only file system", str(path))
    return real(path, flags, *args, **kwargs)

  monkeypatch.setattr(os, "open", read_only)
  c.train.steps = 30
  with pytest.raises(UserError) as e:
    train_loop.train(c, log=quiet)
  assert str(e.value) == (f"cannot write in the run folder {run_dir}: Read-only file system "
                          "(read-only, or no permission)")


# --- malformed metadata ---------------------------------------------------------------------

def edit_config(run_dir: pathlib.Path, section: str, field: str, value) -> None:
  saved = json.loads((run_dir / "config.json").read_text())
  if value is KeyError:
    del saved[section][field]
  else:
    saved[section][field] = value
  (run_dir / "config.json").write_text(json.dumps(saved))


@pytest.mark.parametrize("section,field,value", [
    ("model", "n_layers", None), ("model", "compute_dtype", ["float32"]),
    ("model", "d_model", KeyError)])
def test_sample_names_a_malformed_model_field_in_one_line(run, section, field, value):
  _, run_dir = run
  edit_config(run_dir, section, field, value)
  proc = run_command("minigpt_jax.sample", "--checkpoint", str(run_dir))
  one_line_error(proc, f"model.{field}" if value is not KeyError else field)


@pytest.mark.parametrize("section,field,value", [
    ("train", "batch_size", None), ("train", "batch_size", "8"), ("train", "batch_size", KeyError),
    ("data", "dir", None), ("data", "dir", KeyError), ("data", "name", 7),
    ("data", "max_file_chars", "lots"), ("data", "max_file_chars", None)])
def test_evaluate_names_a_malformed_field_the_run_records(run, section, field, value):
  _, run_dir = run
  edit_config(run_dir, section, field, value)
  with pytest.raises(UserError, match=f"{section}.{field}"):
    runs.load_for_inference(str(run_dir))


def test_evaluate_cli_names_a_null_batch_size_in_one_line(run):
  _, run_dir = run
  edit_config(run_dir, "train", "batch_size", None)
  proc = run_command("minigpt_jax.evaluate", "--checkpoint", str(run_dir), "--num_samples", "0")
  one_line_error(proc, "train.batch_size")


def _config_json_a_folder(path: pathlib.Path, monkeypatch) -> str:
  path.mkdir()
  return "Is a directory"


def _config_json_unreadable(path: pathlib.Path, monkeypatch) -> str:
  path.write_text("{}")  # a chmod does not stop root, who runs the tests here: as it would fail
  read_text = pathlib.Path.read_text
  def denied(self, *args, **kwargs):
    if self == path:
      raise PermissionError(13, "Permission denied", str(path))
    return read_text(self, *args, **kwargs)
  monkeypatch.setattr(pathlib.Path, "read_text", denied)
  return "Permission denied"


def _config_json_nested_deep(path: pathlib.Path, monkeypatch) -> str:
  path.write_text('{"model": ' + "[" * 100_000 + "]" * 100_000 + "}")
  return "nested more than 32 deep"


def _config_json_nested_below_the_stack_limit(path: pathlib.Path, monkeypatch) -> str:
  path.write_text('{"model": {}, "data": {}, "train": {"x": ' + "[" * 900 + "]" * 900 + "}}")
  return "nested more than 32 deep"


@pytest.mark.parametrize("make", [_config_json_a_folder, _config_json_unreadable,
                                  _config_json_nested_deep,
                                  _config_json_nested_below_the_stack_limit])
def test_a_config_json_that_cannot_be_read_is_one_error_line(tmp_path, monkeypatch, make):
  fragment = make(tmp_path / "config.json", monkeypatch)
  with pytest.raises(UserError, match="config.json is unreadable") as e:
    runs.read_config(tmp_path)
  assert fragment in str(e.value) and "\n" not in str(e.value)


def test_an_absurd_context_in_a_runs_config_is_refused_before_any_jitted_call(run):
  """A context_len of 10**12 overflowed int32 inside a jitted call (OverflowError)."""
  _, run_dir = run
  edit_config(run_dir, "model", "context_len", 10**12)
  with pytest.raises(UserError, match=r"config.json is damaged: model.context_len must be at "
                                      r"most 2147483647 \(2\*\*31 - 1\), got 1000000000000"):
    runs.load_for_inference(str(run_dir))


def test_a_tokenizer_json_of_another_kind_names_its_file_and_field(run):
  _, run_dir = run
  d = json.loads((run_dir / "tokenizer.json").read_text())
  (run_dir / "tokenizer.json").write_text(json.dumps({**d, "kind": "bpe"}))
  with pytest.raises(UserError) as e:
    runs.read_tokenizer(run_dir)
  assert str(e.value) == (f"{run_dir / 'tokenizer.json'}: unsupported tokenizer description: "
                          "field 'kind' is 'bpe', not 'char'")


def write_meta(run_dir: pathlib.Path, step: int, meta) -> None:
  (run_dir / "ckpt" / str(step) / "meta" / "metadata").write_text(json.dumps(meta))


def test_checkpoint_metadata_that_is_not_an_object_is_refused_by_name(run):
  _, run_dir = run
  write_meta(run_dir, 20, ["step", 20])
  with pytest.raises(UserError, match="step 20.*metadata"):
    checkpoints.trained_on(run_dir, 20)


def test_an_asked_for_step_removed_meanwhile_is_named_removed_not_damaged(run):
  _, run_dir = run
  shutil.rmtree(run_dir / "ckpt" / "20")  # as training's retention removes a step
  with pytest.raises(UserError, match="step 20.*removed") as e:
    checkpoints.trained_on(run_dir, 20)
  assert "damaged" not in str(e.value)


def test_a_resume_skips_a_checkpoint_whose_metadata_is_not_an_object(run):
  _, run_dir = run
  write_meta(run_dir, 20, ["step", 20])
  assert checkpoints.trained_on(run_dir)[0] == 10
  assert (run_dir / "ckpt" / "20.damaged").is_dir()


def test_sample_refuses_a_permuted_vocabulary_in_one_line(run):
  _, run_dir = run
  d = json.loads((run_dir / "tokenizer.json").read_text())
  chars = list(d["chars"])
  chars[30], chars[31] = chars[31], chars[30]  # same characters, two ids swapped
  (run_dir / "tokenizer.json").write_text(json.dumps({**d, "chars": "".join(chars)}))
  proc = run_command("minigpt_jax.sample", "--checkpoint", str(run_dir))
  one_line_error(proc, "tokenizer", "id 32")


@pytest.mark.parametrize("chars,fragment", [
    (tokenizer.CHARS[:-1] + "\x00", "control"),
    (tokenizer.CHARS[:-1], "missing '~'"),
    (tokenizer.CHARS.replace("a", "\x07"), "control"),
    (tokenizer.CHARS + "\x1b", "control")])
def test_a_vocabulary_other_than_the_codes_is_refused_naming_the_difference(chars, fragment):
  d = {**CharTokenizer().to_dict(), "chars": chars}
  with pytest.raises(UserError, match="unsupported tokenizer description") as e:
    CharTokenizer.from_dict(d)
  assert fragment in str(e.value)


# --- leftovers of a crashed save ------------------------------------------------------------

def plant_stale_tmp(run_dir: pathlib.Path) -> list[pathlib.Path]:
  """What a save killed midway leaves: Orbax's temporary step folders (both namings)."""
  stale = [run_dir / "ckpt" / "25.orbax-checkpoint-tmp",
           run_dir / "ckpt" / "26.orbax-checkpoint-tmp-1700000000"]
  for p in stale:
    (p / "params").mkdir(parents=True)
    (p / "params" / "half_written").write_bytes(b"\0" * 100)
  return stale


def test_a_reader_leaves_stale_temporary_checkpoints_alone(run):
  _, run_dir = run
  stale = plant_stale_tmp(run_dir)
  assert runs.load_for_inference(str(run_dir)).step == 20
  assert all(p.is_dir() for p in stale)


def test_training_removes_stale_temporary_checkpoints_when_it_starts(run):
  c, run_dir = run
  stale = plant_stale_tmp(run_dir)
  c.train.steps = 30
  assert train_loop.train(c, log=quiet).last_step == 30
  assert not any(p.exists() for p in stale)
  assert steps_of(run_dir) == [10, 20, 30]


# --- integrity: flipped bytes, damaged metadata, step folders Orbax cannot read -------------

def flip_bytes(run_dir: pathlib.Path, step: int) -> None:
  """As the hostile tester did: XOR bytes in the middle of the largest parameter data file
  (same size, still a valid file to Orbax: only the values change)."""
  files = (run_dir / "ckpt" / str(step) / "params").rglob("d/*")
  largest = max((f for f in files if f.is_file()), key=lambda f: f.stat().st_size)
  data = bytearray(largest.read_bytes())
  for i in range(len(data) // 2, len(data) // 2 + 64):
    data[i] ^= 0xFF
  largest.write_bytes(bytes(data))


def damage_warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_flipped_bytes_are_a_damaged_step_a_reader_falls_back_past(run, caplog):
  _, run_dir = run
  flip_bytes(run_dir, 20)
  with caplog.at_level(logging.WARNING):
    loaded = runs.load_for_inference(str(run_dir))
  assert loaded.step == 10
  assert np.isfinite(np.asarray(loaded.params["lm_head"]["kernel"])).all()
  (line,) = damage_warnings(caplog)
  assert "step 20" in line and "checksum" in line and "20.damaged" in line
  assert steps_of(run_dir) == [10] and (run_dir / "ckpt" / "20.damaged").is_dir()


def test_an_explicitly_chosen_step_with_flipped_bytes_is_refused_in_one_line(run):
  _, run_dir = run
  flip_bytes(run_dir, 20)
  with pytest.raises(UserError, match=r"step 20 .*damaged \(params/.*checksum") as e:
    runs.load_for_inference(str(run_dir / "ckpt" / "20"))
  assert "\n" not in str(e.value)
  assert steps_of(run_dir) == [10, 20]  # asked for by name: reported, left where it is


def test_a_resume_falls_back_past_flipped_bytes_instead_of_training_on_them(run):
  c, run_dir = run
  flip_bytes(run_dir, 20)
  c.train.stop_at_step = 10  # resumed, nothing to train: what matters is where it resumed
  summary = train_loop.train(c, log=quiet)
  assert summary.first_step == 10 and summary.last_step == 10
  assert (run_dir / "ckpt" / "20.damaged" / "params").is_dir()
  assert steps_of(run_dir) == [10]


def test_a_resume_reads_the_arrays_once(run, monkeypatch):
  """The newest intact step's corpus is learnt from its "meta" item alone; the arrays are
  read (and their checksums checked) by the resume itself."""
  c, run_dir = run  # already at train.steps: resumed, restored, nothing to train
  real_restore, items_read = ocp.CheckpointManager.restore, []

  def spy(self, step, *args, **kwargs):
    items_read.append((step, sorted(kwargs["args"].keys())))
    return real_restore(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "restore", spy)
  assert train_loop.train(c, log=quiet).first_step == 20
  assert items_read == [(20, ["meta"]), (20, ["meta", "opt_state", "params"])]


def test_a_checkpoint_saved_without_checksums_still_loads(run):
  _, run_dir = run
  meta = json.loads((run_dir / "ckpt" / "20" / "meta" / "metadata").read_text())
  assert set(meta["checksums"]) == {"params", "opt_state"}
  del meta["checksums"]
  write_meta(run_dir, 20, meta)
  loaded = runs.load_for_inference(str(run_dir))
  assert loaded.step == 20 and loaded.corpus_sha256 == meta["corpus_sha256"]


def _meta_not_json(path: pathlib.Path) -> None:
  path.write_text("not json{")


def _meta_missing(path: pathlib.Path) -> None:
  path.unlink()


@pytest.mark.parametrize("spoil", [_meta_not_json, _meta_missing])
def test_evaluate_falls_back_past_a_damaged_meta_item(run, spoil):
  _, run_dir = run
  spoil(run_dir / "ckpt" / "20" / "meta" / "metadata")
  out = scoring.evaluate_checkpoint(str(run_dir), num_samples=0, log=quiet)
  assert out["step"] == 10 and np.isfinite(out["val"]["nats_per_char"])
  assert (run_dir / "ckpt" / "20.damaged").is_dir()


def _empty_step(step_dir: pathlib.Path) -> str:
  shutil.rmtree(step_dir)
  step_dir.mkdir()
  return "empty"


def _no_params_metadata(step_dir: pathlib.Path) -> str:
  shutil.rmtree(step_dir / "params")
  (step_dir / "_CHECKPOINT_METADATA").unlink()
  return "params"


@pytest.mark.parametrize("spoil", [_empty_step, _no_params_metadata])
def test_a_step_orbax_cannot_read_is_one_warning_with_its_cause(run, caplog, spoil):
  _, run_dir = run
  cause = spoil(run_dir / "ckpt" / "20")
  with caplog.at_level(logging.WARNING):
    assert runs.load_for_inference(str(run_dir)).step == 10
  (line,) = damage_warnings(caplog)  # not Orbax's "Metadata file does not exist", repeated
  assert "step 20" in line and cause in line and "20.damaged" in line


def test_a_step_without_orbaxs_record_of_the_save_loads_with_one_warning(run, caplog):
  _, run_dir = run
  (run_dir / "ckpt" / "20" / "_CHECKPOINT_METADATA").unlink()
  with caplog.at_level(logging.WARNING):
    assert runs.load_for_inference(str(run_dir)).step == 20  # its arrays check out
    assert runs.load_for_inference(str(run_dir)).step == 20
  (line,) = damage_warnings(caplog)
  assert "ckpt/20 has no _CHECKPOINT_METADATA" in line


_LOAD = """
import sys
from minigpt_jax import runs
print(runs.load_for_inference(sys.argv[1]).step)
"""


def test_an_unreadable_step_is_one_warning_naming_the_permission(run):
  """A permission the process lacks (root reads anything: it drops that capability)."""
  _, run_dir = run
  (run_dir / "ckpt" / "20").chmod(0)
  cmd = [sys.executable, "-c", _LOAD, str(run_dir)]
  if os.geteuid() == 0:
    if not shutil.which("setpriv"):
      pytest.skip("as root, a chmod stops nothing, and setpriv (to drop that) is missing")
    cmd = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
           "--bounding-set=-dac_override,-dac_read_search", *cmd]
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0 and proc.stdout.split() == ["10"], proc.stderr[-3000:]
  (line,) = proc.stderr.strip().splitlines()
  assert "step 20" in line and "Permission denied" in line and "20.damaged" in line


def test_a_step_that_is_a_symlink_loop_is_set_aside_before_training_saves_over_it(run, caplog):
  """Orbax lists no step there, so training resumed from step 10, and its save of step 20
  failed on the link with two Orbax tracebacks, leaving its temporary folder."""
  c, run_dir = run
  shutil.rmtree(run_dir / "ckpt" / "20")
  (run_dir / "ckpt" / "20").symlink_to("20")
  with caplog.at_level(logging.WARNING):
    summary = train_loop.train(c, log=quiet)
  assert summary.first_step == 10 and summary.last_step == 20
  (line,) = damage_warnings(caplog)
  assert "step 20" in line and "symbolic links" in line and "20.damaged" in line
  assert (run_dir / "ckpt" / "20.damaged").is_symlink()
  assert steps_of(run_dir) == [10, 20]
  assert not list((run_dir / "ckpt").glob("*orbax-checkpoint-tmp*"))



def test_a_step_that_is_a_symlink_to_a_folder_is_set_aside_and_its_target_untouched(
    run, tmp_path, caplog):
  """Through the link training would restore someone else's step, and later prune it."""
  c, run_dir = run
  elsewhere = tmp_path / "someone_elses_step"
  shutil.move(run_dir / "ckpt" / "20", elsewhere)
  (run_dir / "ckpt" / "20").symlink_to(elsewhere)
  before = sorted(str(p.relative_to(elsewhere)) for p in elsewhere.rglob("*"))
  c.train.stop_at_step = 10
  with caplog.at_level(logging.WARNING):
    assert train_loop.train(c, log=quiet).first_step == 10
  (line,) = damage_warnings(caplog)
  assert "step 20" in line and "is a symlink" in line and "20.damaged" in line
  assert sorted(str(p.relative_to(elsewhere)) for p in elsewhere.rglob("*")) == before


def test_a_fifo_planted_as_the_lock_does_not_hang_a_reader(tmp_path):
  """Readers probe the lock before setting a damaged step aside; a FIFO counts as held."""
  os.mkfifo(tmp_path / ".lock")
  answer = []
  probe = threading.Thread(target=lambda: answer.append(checkpoints._being_trained(tmp_path)),
                           daemon=True)
  probe.start()
  probe.join(timeout=10)
  assert answer == [True]

def test_a_plain_file_at_a_step_is_set_aside_not_deleted_by_the_next_save(run, caplog):
  c, run_dir = run
  shutil.rmtree(run_dir / "ckpt" / "20")
  (run_dir / "ckpt" / "20").write_text("someone's notes\n")
  c.train.stop_at_step = 10  # the manager that would save step 20 is made; no need to train
  with caplog.at_level(logging.WARNING):
    assert train_loop.train(c, log=quiet).first_step == 10
  (line,) = damage_warnings(caplog)
  assert "step 20" in line and "not a folder" in line and "20.damaged" in line
  assert (run_dir / "ckpt" / "20.damaged").read_text() == "someone's notes\n"
  assert not (run_dir / "ckpt" / "20").exists()
