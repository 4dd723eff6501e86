import fcntl
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from minigpt_jax import checkpoints, hardware, runs, train_loop, train_step
from minigpt_jax.config import base_config
from minigpt_jax.errors import UserError
from helpers import model_config
from minigpt_jax.model import init_params

quiet = lambda *_: None


def test_loss_falls_on_a_tiny_corpus(tiny_config):
  tiny_config.train.steps = 80
  tiny_config.train.eval_every = 40
  tiny_config.sample.num_samples = 0
  s = train_loop.train(tiny_config, log=quiet)
  steps = sorted(s.train_losses)
  first, last = s.train_losses[steps[0]], s.train_losses[steps[-1]]
  assert first > 3.5  # about ln(99) = 4.6 at the start
  assert last < first - 1.5, s.train_losses
  assert s.val_losses[80] < s.val_losses[40] < first


def test_host_memory_follows_the_compiled_steps_scratch_size(tiny_config, monkeypatch):
  """The step is compiled before the first step, and its scratch size decides how freed
  host memory is kept (hardware.fit_host_memory_to); a finished run compiles nothing."""
  sizes = []
  monkeypatch.setattr(hardware, "fit_host_memory_to", sizes.append)
  tiny_config.train.steps = 4
  tiny_config.sample.num_samples = 0
  train_loop.train(tiny_config, log=quiet)
  assert len(sizes) == 1 and 0 < sizes[0] < hardware.KEEP_LIMIT
  train_loop.train(tiny_config, log=quiet)  # already at train.steps
  assert len(sizes) == 1


def test_bfloat16_training_follows_float32(tiny_config):
  """The GPU default (bf16 compute, float32 parameters and optimizer state), run on CPU:
  the same losses as float32 up to bf16 rounding, and float32 checkpoints."""
  tiny_config.train.steps = 30
  tiny_config.train.log_every = 1
  tiny_config.train.eval_every = 30
  tiny_config.sample.num_samples = 0
  f32 = train_loop.train(tiny_config, log=quiet).train_losses
  tiny_config.model.compute_dtype = "bfloat16"
  tiny_config.run_name = "tiny_bf16"
  bf16 = train_loop.train(tiny_config, log=quiet).train_losses
  assert sorted(bf16) == sorted(f32) == list(range(1, 31))
  diffs = [abs(bf16[s] - f32[s]) for s in f32]
  assert max(diffs) < 0.02, diffs  # measured 4e-4 on CPU
  assert bf16[30] < bf16[1] - 0.8  # it learns
  run = runs.load_for_inference(str(pathlib.Path(tiny_config.workdir) / "tiny_bf16"))
  params, cfg = run.params, run.model_cfg
  assert cfg.compute_dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}


def test_weight_decay_on_kernels_and_with_decay_embeddings_on_the_embeddings():
  cfg = model_config(context_len=8, d_model=16, n_layers=1, n_heads=2)
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))  # the tree is enough
  mask = train_step.decay_mask(shapes)
  assert mask["block_0"]["attn"]["qkv"]["kernel"] and mask["lm_head"]["kernel"]
  assert mask["block_0"]["ffn"]["up"]["kernel"]
  assert not mask["block_0"]["attn"]["qkv"]["bias"] and not mask["block_0"]["ln1"]["scale"]
  assert not mask["embed"]["token"]["embedding"] and not mask["embed"]["position"]["embedding"]
  mask = train_step.decay_mask(shapes, embeddings=True)
  assert mask["embed"]["token"]["embedding"] and mask["embed"]["position"]["embedding"]
  assert mask["lm_head"]["kernel"] and not mask["block_0"]["ln1"]["scale"]


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_the_optimizer_decays_the_embeddings_as_train_decay_embeddings_says(decay_embeddings):
  """One update with zero gradients: only weight decay moves a parameter."""
  cfg = model_config(context_len=8, d_model=16, n_layers=1, n_heads=2)
  train = base_config().train
  train.warmup_steps, train.decay_embeddings = 0, decay_embeddings
  params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
  tx = train_step.make_optimizer(train)
  update = lambda p: tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)[0]
  updates = jax.jit(update)(params)  # one compiled program, not the optimizer op by op
  moved = lambda x: bool(jnp.any(x != 0))
  assert moved(updates["embed"]["token"]["embedding"]) == decay_embeddings
  assert moved(updates["embed"]["position"]["embedding"]) == decay_embeddings
  assert moved(updates["lm_head"]["kernel"]) and not moved(updates["block_0"]["ln1"]["scale"])


def test_checkpoint_round_trip(tmp_path):
  cfg = model_config(context_len=8, d_model=16, n_layers=1, n_heads=2)
  params = init_params(cfg, jax.random.key(3))
  opt = {"mu": jnp.arange(5.0), "count": jnp.array(7)}
  mngr = checkpoints.manager(tmp_path)
  checkpoints.save(mngr, 12, params, opt, {"step": 12})
  mngr.wait_until_finished()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), {"params": params, "opt_state": opt})
  with checkpoints.reader(tmp_path) as reader:
    got = checkpoints.restore(reader, 12, abstract)
  jax.tree.map(np.testing.assert_array_equal, got["params"], params)
  jax.tree.map(np.testing.assert_array_equal, got["opt_state"], opt)


def test_a_checkpoint_saved_mid_run_holds_that_steps_parameters(tiny_config):
  """Checkpoints are written while training goes on with its buffers donated: step 10 of a
  20-step run must equal a run stopped at step 10, bit for bit."""
  tiny_config.train.steps = 20
  tiny_config.train.ckpt_every = 10
  tiny_config.sample.num_samples = 0
  train_loop.train(tiny_config, log=quiet)
  stopped = tiny_config.copy_and_resolve_references()
  stopped.run_name, stopped.train.stop_at_step = "stopped", 10
  train_loop.train(stopped, log=quiet)
  workdir = pathlib.Path(tiny_config.workdir)
  mid = runs.load_for_inference(str(workdir / tiny_config.run_name / "ckpt" / "10")).params
  end = runs.load_for_inference(str(workdir / "stopped")).params
  jax.tree.map(np.testing.assert_array_equal, mid, end)
  last = runs.load_for_inference(str(workdir / tiny_config.run_name)).params
  assert not np.array_equal(last["lm_head"]["kernel"], mid["lm_head"]["kernel"])  # it trained on


def test_nan_stops_before_a_checkpoint_and_the_run_can_restart(tiny_config, monkeypatch):
  make_optimizer = train_step.make_optimizer  # the first update makes every parameter NaN:
  monkeypatch.setattr(train_step, "make_optimizer",
                      lambda t: optax.chain(make_optimizer(t), optax.scale(float("nan"))))
  tiny_config.train.ckpt_every = 1
  tiny_config.sample.num_samples = 0
  with pytest.raises(UserError, match=r"parameter update is nan at step 1; stopped, no "
                                      r"checkpoint was written"):
    train_loop.train(tiny_config, log=quiet)
  run_dir = pathlib.Path(tiny_config.workdir) / tiny_config.run_name
  assert sorted(p.name for p in (run_dir / "ckpt").iterdir()) == []  # nothing half-written
  # Nothing was saved, so the same run may start again (with a working optimizer).
  monkeypatch.undo()
  tiny_config.train.steps = 4
  s = train_loop.train(tiny_config, log=quiet)
  assert s.first_step == 0 and s.last_step == 4 and np.isfinite(list(s.train_losses.values())).all()


def _trained_on_a_copy_of_the_sources(tiny_config, tmp_path) -> pathlib.Path:
  """Trains tiny_config 10 steps on a copy of its sources; returns the copy's folder."""
  src = tmp_path / "src"
  shutil.copytree(tiny_config.data.roots[0], src)
  tiny_config.data.roots = (str(src),)
  tiny_config.train.steps = 10
  tiny_config.sample.num_samples = 0
  train_loop.train(tiny_config, log=quiet)
  return src


def test_a_rebuild_on_resume_never_replaces_the_corpus_the_run_was_trained_on(tiny_config, tmp_path):
  src = _trained_on_a_copy_of_the_sources(tiny_config, tmp_path)
  corpus = pathlib.Path(tiny_config.data.dir) / tiny_config.data.name
  prepared = {p.name: p.read_bytes() for p in corpus.iterdir()}
  (src / "extra.py").write_text("x = 1\n" * 50)  # lands in the train split
  tiny_config.data.rebuild = True
  tiny_config.train.steps = 20
  with pytest.raises(UserError, match="was left as it was"):
    train_loop.train(tiny_config, log=quiet)
  assert {p.name: p.read_bytes() for p in corpus.iterdir()} == prepared
  tiny_config.data.rebuild = False  # the kept corpus still resumes the run
  assert train_loop.train(tiny_config, log=quiet).last_step == 20
  shutil.rmtree(corpus)  # a deleted corpus is prepared again: from changed sources, refused
  tiny_config.train.steps = 30
  with pytest.raises(UserError, match="another train split than the one the run's checkpoints"):
    train_loop.train(tiny_config, log=quiet)
  assert not corpus.exists()


def test_resume_refuses_a_corpus_changed_since_the_checkpoint(tiny_config, tmp_path):
  src = _trained_on_a_copy_of_the_sources(tiny_config, tmp_path)
  (src / "extra.py").write_text("x = 1\n" * 50)
  other = tiny_config.copy_and_resolve_references()  # a new run rebuilds the shared corpus
  other.run_name, other.data.rebuild, other.train.steps = "other", True, 1
  train_loop.train(other, log=quiet)
  tiny_config.train.steps = 20
  with pytest.raises(UserError, match="train corpus differs from the one step 10"):
    train_loop.train(tiny_config, log=quiet)


@pytest.mark.parametrize("field,value,message", [
    ("train.stop_at_step", -5, "stop_at_step must be >= 0"),
    ("run_name", "..", "plain folder name"),
    ("sample.prompt", "caf\u00e9", "'\u00e9' at 3"),
    ("train.grad_clip", -1.0, r"train.grad_clip must be > 0, got -1.0"),  # would ascend the loss
    ("train.lr", 0.0, r"train.lr must be > 0"),
    ("train.warmup_steps", -5, r"train.warmup_steps must be >= 0"),
    ("train.min_lr_ratio", 1.5, r"train.min_lr_ratio must be in \[0, 1\]"),
    ("train.weight_decay", -0.1, r"train.weight_decay must be >= 0"),
    ("train.b2", 1.0, r"train.b2 must be in \[0, 1\)"),
])
def test_config_mistakes_fail_before_any_work(tiny_config, field, value, message):
  section, _, name = field.rpartition(".")
  setattr(tiny_config[section] if section else tiny_config, name, value)
  with pytest.raises(UserError, match=message):
    train_loop.train(tiny_config, log=quiet)
  assert not pathlib.Path(tiny_config.workdir).exists()


def _files(run_dir: pathlib.Path) -> dict:
  """Every file of a run but its lock (which names the last process that trained it)."""
  return {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_a_run_being_trained_is_not_trained_again_at_the_same_time(tiny_config):
  run_dir = pathlib.Path(tiny_config.workdir) / tiny_config.run_name
  tiny_config.train.steps = 2
  tiny_config.sample.num_samples = 0
  held = runs.lock_run_dir(run_dir)  # as a training process would hold it
  try:
    with pytest.raises(UserError, match=f"{run_dir} is being trained by pid {os.getpid()} on "):
      train_loop.train(tiny_config, log=quiet)
  finally:
    held.close()
  assert not (run_dir / "ckpt").exists()
  assert train_loop.train(tiny_config, log=quiet).last_step == 2  # released: it trains
  held = runs.lock_run_dir(run_dir)  # and training released it again when done
  held.close()


def _fails(*_, **__):
  raise UserError("the model does not fit")


def test_a_failed_training_releases_the_run(tiny_config, monkeypatch):
  """The error (and its traceback, which keeps train's frame alive) must not keep the lock."""
  run_dir = pathlib.Path(tiny_config.workdir) / tiny_config.run_name
  run_dir.mkdir(parents=True)  # the user's folder: it stays, with its lock file
  monkeypatch.setattr(runs, "check_fits", _fails)  # after the lock, before any writing
  with pytest.raises(UserError, match="does not fit") as failed:
    train_loop.train(tiny_config, log=quiet)
  assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
  runs.lock_run_dir(run_dir).close()  # free again, while the traceback still lives
  assert failed.traceback  # (kept alive until here)


def test_a_run_that_fails_before_writing_leaves_no_folder(tiny_config, monkeypatch):
  workdir = pathlib.Path(tiny_config.workdir)
  run_dir = workdir / tiny_config.run_name
  monkeypatch.setattr(runs, "check_fits", _fails)  # after the lock, before any writing
  with pytest.raises(UserError, match="does not fit"):
    train_loop.train(tiny_config, log=quiet)
  assert workdir.is_dir() and not run_dir.exists()  # only the run's own folder goes
  monkeypatch.undo()  # a run that fails after writing keeps what it wrote

  def fail(*_, **__):
    raise RuntimeError("out of memory")

  monkeypatch.setattr(train_step, "fresh_state", fail)
  with pytest.raises(RuntimeError, match="out of memory"):
    train_loop.train(tiny_config, log=quiet)
  assert {"config.json", "tokenizer.json", ".lock"} <= {p.name for p in run_dir.iterdir()}


def test_the_lock_is_never_taken_on_a_removed_lock_file(tmp_path, monkeypatch):
  """A failed new run removes its folder while holding the lock; a process that opened the
  old lock file meanwhile must not train on a lock nobody else can see."""
  run_dir, flock, calls = tmp_path / "run", fcntl.flock, []

  def flock_after_a_removal(f, op):
    if not calls:  # between our open and flock, the folder's failed run removes it
      runs.remove_if_only_lock(run_dir)
    calls.append(op)
    return flock(f, op)

  monkeypatch.setattr(fcntl, "flock", flock_after_a_removal)
  held = runs.lock_run_dir(run_dir)
  try:
    assert len(calls) == 2  # taken again, on the file that is there now
    assert os.fstat(held.fileno()).st_ino == os.stat(run_dir / ".lock").st_ino
  finally:
    held.close()


def test_a_run_folder_that_cannot_be_made_is_a_clear_error(tiny_config):
  pathlib.Path(tiny_config.workdir).mkdir(parents=True)
  (pathlib.Path(tiny_config.workdir) / tiny_config.run_name).write_text("not a folder")
  with pytest.raises(UserError, match="cannot create the run folder"):
    train_loop.train(tiny_config, log=quiet)


def test_resume_with_another_model_is_refused_and_keeps_the_run(tiny_config):
  tiny_config.train.steps = 10
  tiny_config.sample.num_samples = 0
  s = train_loop.train(tiny_config, log=quiet)
  before = _files(s.run_dir)
  tiny_config.model.d_model = 48
  with pytest.raises(UserError, match="another config.*model.d_model: run has 32, config has 48"):
    train_loop.train(tiny_config, log=quiet)
  assert _files(s.run_dir) == before


def test_unreadable_checkpoint_is_a_clear_error_and_left_alone(tiny_config):
  tiny_config.train.steps = 10
  tiny_config.sample.num_samples = 0
  s = train_loop.train(tiny_config, log=quiet)
  params_dir = s.run_dir / "ckpt" / "10" / "params"
  for f in params_dir.rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(b"garbage")
  before = _files(s.run_dir)
  tiny_config.train.steps = 20
  with pytest.raises(UserError, match="cannot restore checkpoint step 10"):
    train_loop.train(tiny_config, log=quiet)
  with pytest.raises(UserError, match="cannot restore checkpoint step 10"):
    runs.load_for_inference(str(s.run_dir))
  assert _files(s.run_dir) == before
