"""Training and the commands when things go wrong: preemption (SIGTERM), failed checkpoint
saves, unwritable output paths, out-of-memory, out-of-range seeds, torn metrics lines."""

import errno
import json
import logging
import os
import pathlib
import re
import resource
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import REPO, ok, one_line_error, run_command, run_module, tiny_config_in, tiny_flags
from minigpt_jax import (checkpoints, curves, generate, preemption, report, runs, scoring,
                         train_loop, train_step)
from minigpt_jax.errors import UserError

quiet = lambda *_: None
TINY = str(REPO / "configs" / "tiny.py")
NEVER = "--config.train.ckpt_every=1000000"  # only preemption (or the end) saves


def _env():
  return {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}


def _train_losses(run_dir: pathlib.Path) -> dict:
  return {r["step"]: r["loss"] for r in report.read_metrics(run_dir / "metrics.jsonl")
          if r["kind"] == "train"}


def _wait_for_logged_steps(path: pathlib.Path, proc, n: int, timeout: float = 180) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and proc.poll() is None:
    if path.exists() and len(path.read_text().splitlines()) >= n:
      return
    time.sleep(0.05)
  ended = proc.poll() is not None
  raise AssertionError(f"no {n} logged steps in {path}; "
                       + (f"exit {proc.returncode}: {proc.stderr.read()[-3000:]}" if ended else
                          "timed out"))


def read_only(monkeypatch, folder: pathlib.Path) -> None:
  """Makes os.access report `folder` (and what is under it) as not writable, as on a
  read-only filesystem (chmod does not stop root, who runs these tests)."""
  real, ro = os.access, str(folder)
  monkeypatch.setattr(os, "access", lambda p, m, *a, **k: False if m & os.W_OK and
                      os.path.abspath(p).startswith(ro) else real(p, m, *a, **k))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, corpus_dir):
  """A run trained for 2 steps (checkpoint 2), shared by the tests below (they only read it)."""
  c = tiny_config_in(tmp_path_factory.mktemp("small"), corpus_dir)
  c.train.steps, c.sample.num_samples = 2, 0
  return train_loop.train(c, log=quiet).run_dir


# --- preemption -----------------------------------------------------------------------------

def test_sigterm_saves_and_the_resumed_run_is_identical_to_an_uninterrupted_one(tmp_path,
                                                                                corpus_dir):
  common = ["--config.train.log_every=1", "--config.sample.num_samples=0",
            "--config.train.steps=100000", "--config.train.eval_every=1000000", NEVER]
  cut = tmp_path / "cut"
  proc = subprocess.Popen([sys.executable, "-m", "minigpt_jax.train",
                           *tiny_flags(cut, corpus_dir, *common)], cwd=REPO, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    _wait_for_logged_steps(cut / "runs/tiny/metrics.jsonl", proc, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 143, err[-3000:]
  assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-3000:]
  step = int(re.search(r"preempted \(SIGTERM\) at step (\d+): checkpoint saved", err)[1])
  ckpt = cut / "runs/tiny/ckpt"
  assert sorted(p.name for p in ckpt.iterdir()) == [str(step)]  # complete, no tmp folder left
  assert sorted(_train_losses(cut / "runs/tiny")) == list(range(1, step + 1))

  end = [f"--config.train.stop_at_step={step + 3}"]  # the schedule stays that of 100000 steps
  resumed = ok(run_command("minigpt_jax.train", *tiny_flags(cut, corpus_dir, *common, *end)))
  assert f"from step {step}" in resumed.stdout
  straight = tmp_path / "straight"
  ok(run_command("minigpt_jax.train", *tiny_flags(straight, corpus_dir, *common, *end)))
  assert sorted(_train_losses(cut / "runs/tiny")) == list(range(1, step + 4))
  assert _train_losses(cut / "runs/tiny") == _train_losses(straight / "runs/tiny")
  a = runs.load_for_inference(str(cut / "runs/tiny")).params
  b = runs.load_for_inference(str(straight / "runs/tiny")).params
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_sigterm_in_process_stops_at_a_step_boundary_and_restores_the_handler(tiny_config,
                                                                             monkeypatch):
  received = []
  ours = lambda *_: received.append(1)
  previous = signal.signal(signal.SIGTERM, ours)  # a SIGTERM must never kill pytest
  real = runs.Training.log

  def metrics_then_sigterm(self, step, metrics):
    real(self, step, metrics)
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(runs.Training, "log", metrics_then_sigterm)
  tiny_config.train.log_every, tiny_config.sample.num_samples = 1, 0
  try:
    with pytest.raises(preemption.Preempted, match=r"preempted \(SIGTERM\) at step \d+") as e:
      train_loop.train(tiny_config, log=quiet)
    handler_after = signal.getsignal(signal.SIGTERM)
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert received == []  # train's handler took it
  assert e.value.exit_status == 143 and 3 <= e.value.step < 20
  run_dir = pathlib.Path(tiny_config.workdir) / tiny_config.run_name
  with checkpoints.reader(run_dir) as mngr:
    assert mngr.all_steps() == [e.value.step]
  assert handler_after is ours
  runs.lock_run_dir(run_dir).close()  # released


def test_sigterm_during_the_first_steps_checkpoint_stops_after_it(tiny_config, monkeypatch):
  """The loop has started: step 1's checkpoint (or eval) is not "before training"."""
  previous = signal.signal(signal.SIGTERM, lambda *_: None)  # a SIGTERM must never kill pytest
  real = runs.Training.save

  def checkpoint_then_sigterm(self, step, state):
    real(self, step, state)
    os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(runs.Training, "save", checkpoint_then_sigterm)
  tiny_config.train.ckpt_every, tiny_config.sample.num_samples = 1, 0
  try:
    with pytest.raises(preemption.Preempted, match=r"preempted \(SIGTERM\) at step 1:") as e:
      train_loop.train(tiny_config, log=quiet)
  finally:
    signal.signal(signal.SIGTERM, previous)
  with checkpoints.reader(pathlib.Path(tiny_config.workdir) / tiny_config.run_name) as mngr:
    assert mngr.all_steps() == [e.value.step] == [1]


def test_sigterm_before_the_loop_only_sets_the_flag_in_a_multi_process_run(monkeypatch):
  """Raising on one process would skip the step all of them stop at: the others would wait."""
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  flag = preemption.StopFlag(period=5)
  flag(signal.SIGTERM, None)  # no Terminated
  assert flag.requested


def test_processes_agree_on_stopping_at_the_period_steps(monkeypatch):
  """In a multi-process run a SIGTERM seen by any process stops all of them, at the next
  step that is a multiple of the period (they all ask then, so none waits for the others)."""
  gathered = []

  def allgather(x):  # this process's flag, and another process that got the SIGTERM
    gathered.append(int(x))
    return np.array([x, 1], np.int32)

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(preemption.multihost_utils, "process_allgather", allgather)
  flag = preemption.StopFlag(period=5)
  assert [flag.should_stop(s) for s in (3, 4)] == [False, False] and gathered == []
  assert flag.should_stop(5) and gathered == [0]
  flag(signal.SIGTERM, None)  # this process's own SIGTERM goes into the all-gather
  assert flag.should_stop(10) and gathered == [0, 1]


# --- Ctrl-C ---------------------------------------------------------------------------------

def run_interrupted(patch: str, *args: str, timeout: int = 120):
  """`python -m minigpt_jax.train args` in a fresh process with `patch` (Python source) run
  first, as monkeypatch would, with Ctrl-C's default handling (a shell starts background
  jobs, and so maybe these tests, with SIGINT ignored, which their children would inherit),
  and without the test run's compilation cache: a compile it has seen would not be one."""
  code = (f"{patch}\nimport runpy\n"
          "runpy.run_module('minigpt_jax.train', run_name='__main__', alter_sys=True)\n")
  env = {k: v for k, v in _env().items()
         if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
  return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout,
                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


# Ctrl-C while XLA compiles the train step on its own threads (just after JAX has lowered it).
SIGINT_IN_STEP_COMPILE = """
import os, signal, sys, threading
import jax
def listener(event, seconds, fun_name=None, **_):
  if event.endswith("/jaxpr_to_mlir_module_duration") and fun_name == "jit(train_step)":
    threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
jax.monitoring.register_event_duration_secs_listener(listener)
def cache_hit(event, **_):  # then there is no compile to interrupt
  if event == "/jax/compilation_cache/cache_hits":
    print("compilation cache hit", file=sys.stderr)
jax.monitoring.register_event_listener(cache_hit)
"""

# Ctrl-C while Python runs a garbage collector callback (as JAX has), where Python would
# print the KeyboardInterrupt and drop it.
SIGINT_IN_GC_CALLBACK = """
import gc, os, signal, time
import minigpt_jax.cli as cli
real = cli.load_config
def callback(phase, info):
  if phase == "stop" and not sent:
    sent.append(1)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)
def load_config(holder):
  gc.callbacks.append(callback)  # for good, as JAX's
  gc.collect()
  return real(holder)
sent = []
cli.load_config = load_config
"""


# Preparing the corpus blocks (as opening a FIFO does) once it has said so in a file.
BLOCKS_BEFORE_TRAINING = """
import os, pathlib, sys
from minigpt_jax import data
fifo = pathlib.Path(sys.argv[-1])
def load_corpus_everywhere(*a, **k):
  os.mkfifo(fifo)
  fifo.with_suffix(".waiting").touch()
  open(fifo).read()  # waits for a writer forever
data.load_corpus_everywhere = load_corpus_everywhere
sys.argv.pop()
"""


def test_sigterm_ends_a_process_blocked_before_training(tmp_path, corpus_dir):
  fifo = tmp_path / "blocked"
  proc = subprocess.Popen(
      [sys.executable, "-c", BLOCKS_BEFORE_TRAINING + "import runpy\nrunpy.run_module("
       "'minigpt_jax.train', run_name='__main__', alter_sys=True)\n",
       *tiny_flags(tmp_path, corpus_dir), str(fifo)],
      cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 120
    while not fifo.with_suffix(".waiting").exists() and proc.poll() is None:
      assert time.monotonic() < deadline
      time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)  # before, the handler only set a flag: it hung
  finally:
    proc.kill()
  assert proc.returncode == 143, err[-3000:]
  assert err.strip() == "terminated (SIGTERM) before training started; nothing to save", err
  assert not (tmp_path / "runs" / "tiny").exists()  # the new run's empty folder is removed


@pytest.mark.parametrize("patch", [SIGINT_IN_STEP_COMPILE, SIGINT_IN_GC_CALLBACK],
                         ids=["compile", "gc_callback"])
def test_ctrl_c_during_startup_exits_130_without_a_crash(tmp_path, corpus_dir, patch):
  proc = run_interrupted(patch, *tiny_flags(tmp_path, corpus_dir, "--config.train.steps=400",
                                            "--config.sample.num_samples=0"))
  assert proc.returncode == 130, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1] == "interrupted", proc.stderr[-3000:]
  assert "Fatal Python error" not in proc.stderr and "Traceback" not in proc.stderr
  assert "Exception ignored" not in proc.stderr, proc.stderr[-3000:]
  assert "compilation cache hit" not in proc.stderr
  runs.lock_run_dir(tmp_path / "runs" / "tiny").close()  # the lock was released


# --- failed saves ---------------------------------------------------------------------------

def test_a_failed_background_save_stops_training_at_once(tiny_config, monkeypatch):
  """Step 20's save fails in the background, for real: its array files outgrow the file
  size limit (RLIMIT_FSIZE, EFBIG) that this process has while the save runs. Training
  must stop at the next step, not at the next save (step 40)."""
  real_save, soft_limit, _ = checkpoints.save, *resource.getrlimit(resource.RLIMIT_FSIZE)
  failed = []

  def save_that_fails_in_the_background(mngr, step, *args, **kwargs):
    if step != 20:
      return real_save(mngr, step, *args, **kwargs)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, resource.getrlimit(
        resource.RLIMIT_FSIZE)[1]))
    try:
      real_save(mngr, step, *args, **kwargs)  # returns while the arrays are being written
      deadline = time.monotonic() + 120
      while mngr.is_saving_in_progress() and time.monotonic() < deadline:
        time.sleep(0.01)  # the background write has failed once it is over
      failed.append(not mngr.is_saving_in_progress())
    finally:
      resource.setrlimit(resource.RLIMIT_FSIZE, (soft_limit, resource.getrlimit(
          resource.RLIMIT_FSIZE)[1]))
      signal.signal(signal.SIGXFSZ, previous)

  monkeypatch.setattr(checkpoints, "save", save_that_fails_in_the_background)
  t = tiny_config.train
  t.steps, t.ckpt_every, t.log_every, t.eval_every = 60, 20, 1, 1000
  tiny_config.sample.num_samples = 0
  with pytest.raises(UserError, match=r"step 20.*File too large"):
    train_loop.train(tiny_config, log=quiet)
  assert failed == [True]
  run_dir = pathlib.Path(tiny_config.workdir) / tiny_config.run_name
  assert max(_train_losses(run_dir)) < 40  # not on until the next save


def test_a_save_that_fails_at_once_is_a_one_line_error_naming_the_step(tiny_config, monkeypatch):
  def read_only(*_, **__):
    raise OSError(errno.EROFS, "Read-only file system")

  monkeypatch.setattr(ocp.CheckpointManager, "save", read_only)
  tiny_config.train.steps, tiny_config.sample.num_samples = 10, 0
  with pytest.raises(UserError, match=r"checkpoint step 10.*Read-only file system"):
    train_loop.train(tiny_config, log=quiet)


def _full_disk_for_metrics_from(monkeypatch, from_step: int) -> None:
  """Writing metrics.jsonl fails with ENOSPC from the record of `from_step` on."""
  real = report.TrainReporter.write

  def write(self, record):
    if record["step"] >= from_step:
      real_open = runs.open_own
      def full(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
      monkeypatch.setattr(runs, "open_own", full)
      try:
        return real(self, record)
      finally:
        monkeypatch.setattr(runs, "open_own", real_open)
    return real(self, record)

  monkeypatch.setattr(report.TrainReporter, "write", write)


def test_a_full_disk_writing_metrics_is_one_error_naming_step_cause_and_checkpoint(
    tiny_config, monkeypatch):
  _full_disk_for_metrics_from(monkeypatch, 15)

  def full(self):  # the event files cannot be closed either: that must not hide the cause
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(report.TensorBoardLog, "close", full)
  t = tiny_config.train
  t.steps, t.ckpt_every, t.log_every, tiny_config.sample.num_samples = 30, 10, 5, 0
  with pytest.raises(UserError) as e:
    train_loop.train(tiny_config, log=quiet)
  run_dir = pathlib.Path(tiny_config.workdir) / tiny_config.run_name
  assert str(e.value) == (f"cannot write {run_dir / 'metrics.jsonl'} at step 15: No space left "
                          "on device; training stopped (step 10 is the last complete one)")
  assert sorted(_train_losses(run_dir)) == [5, 10]  # what was written stays
  with checkpoints.reader(run_dir) as mngr:
    assert mngr.all_steps() == [10]


def test_a_full_disk_closing_the_event_files_is_one_error_line(tiny_config, monkeypatch):
  def full(self):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(report.TensorBoardLog, "close", full)
  t = tiny_config.train
  t.steps, t.ckpt_every, t.log_every, tiny_config.sample.num_samples = 10, 10, 5, 0
  with pytest.raises(UserError, match=r"TensorBoard events .* at step 10: No space left on "
                                      r"device; training stopped \(step 10 is the last "
                                      r"complete one\)"):
    train_loop.train(tiny_config, log=quiet)


def test_event_files_that_cannot_be_created_are_one_error_line(tiny_config, monkeypatch):
  def read_only(*_, **__):
    raise OSError(errno.EROFS, "Read-only file system")

  closed = []
  real_close = ocp.CheckpointManager.close
  monkeypatch.setattr(ocp.CheckpointManager, "close",
                      lambda self: closed.append(1) or real_close(self))
  monkeypatch.setattr(report.TensorBoardLog, "__init__", read_only)
  with pytest.raises(UserError) as e:
    train_loop.train(tiny_config, log=quiet)
  run_dir = pathlib.Path(tiny_config.workdir) / tiny_config.run_name
  assert str(e.value) == (f"cannot write the TensorBoard events in {run_dir} at step 0: "
                          "Read-only file system; training stopped (no checkpoint is complete)")
  assert closed  # the checkpoint manager opened before it


def test_a_full_disk_writing_samples_is_one_error_line(tiny_config, monkeypatch):
  def full(path):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))

  monkeypatch.setattr(runs, "own_folder", full)
  t = tiny_config.train
  t.steps, t.ckpt_every, t.eval_every = 20, 20, 10
  with pytest.raises(UserError, match=r"samples/step_0000010.txt at step 10: No space left on "
                                      r"device; training stopped \(no checkpoint is "
                                      r"complete\)"):
    train_loop.train(tiny_config, log=quiet)


def test_a_full_disk_during_a_save_names_the_cause_in_tensorstores_words(tiny_config,
                                                                         monkeypatch):
  def full(*_, **__):  # as TensorStore words it: its message is long, the cause at its end
    raise ValueError("RESOURCE_EXHAUSTED: Error writing local file " + "x" * 400 +
                     ": No space left on device [os_error_code='28']")

  monkeypatch.setattr(ocp.CheckpointManager, "save", full)
  tiny_config.train.steps, tiny_config.sample.num_samples = 10, 0
  with pytest.raises(UserError, match=r"checkpoint step 10 .*: No space left on device; "
                                      r"training stopped \(no checkpoint is complete\)"):
    train_loop.train(tiny_config, log=quiet)



@pytest.fixture
def small_tmpfs(tmp_path):
  """A 600 KiB tmpfs: room for the run's files, not for all of a 40-step run's checkpoints."""
  mount = tmp_path / "disk"
  mount.mkdir()
  if os.geteuid() != 0:
    pytest.skip("mounting a tmpfs needs root; the monkeypatched full-disk tests above run")
  made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)],
                        capture_output=True, text=True)
  if made.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
  yield mount
  subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk_is_one_error_line_and_keeps_the_last_checkpoint(tmp_path, corpus_dir,
                                                                            small_tmpfs):
  """Orbax's save threads and TensorStore's pending writes print hundreds of lines when a
  save fails for space; all that reaches the user is one line."""
  proc = run_module("minigpt_jax.train", "--config", str(REPO / "configs" / "tiny.py"),
                    f"--config.data.roots=('{corpus_dir}',)", f"--config.data.dir={tmp_path}/data",
                    f"--workdir={small_tmpfs}", "--config.train.steps=40")
  assert proc.returncode == 2
  lines = proc.stderr.splitlines()
  assert len(lines) == 1, proc.stderr[-3000:]  # one line, whichever save the disk stopped
  ckpt = re.escape(f"{small_tmpfs}/tiny/ckpt")
  failed = re.fullmatch(rf"error: saving checkpoint step (\d+) in {ckpt} "
                        r"failed: No space left on device; training stopped \((?:step (\d+) is "
                        r"the last complete one|no checkpoint is complete)\)", lines[0])
  assert failed, proc.stderr[-3000:]
  kept = [int(failed[2])] if failed[2] else []
  assert checkpoints.list_steps(small_tmpfs / "tiny")[-1:] == kept


# --- out of memory --------------------------------------------------------------------------

@pytest.mark.parametrize("message, reported", [
    ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 80.00GiB.",
     r"out of memory.*train\.batch_size"),
    # XLA:CPU reports a failed allocation as INTERNAL, not RESOURCE_EXHAUSTED.
    ("INTERNAL: Failed to allocate: Out of memory allocating 85899345920 bytes.",
     r"out of memory \(INTERNAL.*\); lower train\.batch_size"),
], ids=["gpu", "cpu"])
def test_out_of_memory_in_the_train_step_names_the_batch_size(tiny_config, monkeypatch,
                                                              message, reported):
  def huge(*_, **__):
    def step(state, train_N):
      raise jax.errors.JaxRuntimeError(message)
    return step

  monkeypatch.setattr(train_step, "compile_train_step", huge)
  tiny_config.sample.num_samples = 0
  with pytest.raises(UserError, match=reported):
    train_loop.train(tiny_config, log=quiet)


def test_out_of_memory_when_sampling_names_num_samples(small_run, monkeypatch):
  def huge(*_, **__):
    raise MemoryError()

  monkeypatch.setattr(scoring, "sample_validity", huge)
  with pytest.raises(UserError, match=r"out of memory.*--num_samples"):
    scoring.evaluate_checkpoint(str(small_run), num_samples=4, max_new_tokens=4, log=quiet)
  monkeypatch.setattr(generate, "generate_text", huge)
  one_line_error(run_command("minigpt_jax.sample", f"--checkpoint={small_run}"),
                 "out of memory", "--num_samples")


# --- seeds ----------------------------------------------------------------------------------

@pytest.mark.parametrize("module", ["minigpt_jax.sample", "minigpt_jax.evaluate"])
@pytest.mark.parametrize("seed", [str(2**64), "-1"])
def test_a_seed_out_of_range_is_a_one_line_error(module, seed, tmp_path):
  one_line_error(run_command(module, f"--seed={seed}", f"--checkpoint={tmp_path}"),
                 "--seed", seed)


# --- output paths, checked before the work --------------------------------------------------

def test_output_paths_are_checked_before_the_work(tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  nowhere = f"--checkpoint={tmp_path / 'no_run'}"  # would fail later, after the path check
  one_line_error(run_command("minigpt_jax.evaluate", nowhere, f"--json_out={a_file}/r.json"),
                 "--json_out", "not a folder")
  one_line_error(run_command("minigpt_jax.plot", str(tmp_path / "no_run"), f"--out={tmp_path}"),
                 "--out", "is a folder")
  one_line_error(run_command("minigpt_jax.plot", str(tmp_path / "no_run"),
                             f"--out={a_file}/c.png"), "--out", "not a folder")
  one_line_error(run_command("minigpt_jax.bench", "--config", TINY, f"--json_out={tmp_path}",
                             "--config.train.batch_size=4", "--batch_sizes=",
                             "--decode_batches="), "--json_out", "is a folder")


def test_unwritable_outputs_fail_before_the_work(small_run, tmp_path, monkeypatch):
  out = tmp_path / "ro"
  out.mkdir()
  with monkeypatch.context() as m:
    read_only(m, small_run)
    r = run_command("minigpt_jax.evaluate", f"--checkpoint={small_run}", "--num_samples=0")
    one_line_error(r, "eval_step2.json", "--json_out")
    assert r.stdout == "" and not list(small_run.glob("eval_step*.json"))
    r = run_command("minigpt_jax.plot", str(small_run))
    one_line_error(r, "curves.png", "--out")
  read_only(monkeypatch, out)
  r = run_command("minigpt_jax.evaluate", f"--checkpoint={small_run}",
                  f"--json_out={out / 'r.json'}")
  one_line_error(r, "r.json", "--json_out")
  r = run_command("minigpt_jax.bench", "--config", TINY, f"--json_out={out / 'b.json'}",
                  "--batch_sizes=", "--decode_batches=")
  one_line_error(r, "b.json", "--json_out")


# --- metrics.jsonl --------------------------------------------------------------------------

def test_a_torn_metrics_line_is_skipped_with_a_warning(tmp_path, caplog):
  rows = [{"kind": "train", "step": s, "tokens": s * 256, "loss": 4.0 - s / 10} for s in (1, 2, 3)]
  lines = [json.dumps(r) for r in rows]
  lines.insert(2, lines[2][:17])  # a line cut short (a killed process, a full disk)
  lines.insert(3, "[1, 2]")  # valid JSON, not a record
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
  with caplog.at_level(logging.WARNING):
    got = report.read_metrics(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in got] == [1, 2, 3]
  assert "line 3" in caplog.text and "line 4" in caplog.text and "metrics.jsonl" in caplog.text
  assert curves.plot_run(tmp_path).read_bytes().startswith(b"\x89PNG")
