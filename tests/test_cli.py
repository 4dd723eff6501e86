"""The train and sample commands, run as a user would: in this process (`run_command`), and
in fresh processes where the process is the point (its exit status, a closed stdout, a
resume in a new process)."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import REPO, one_line_error, run_command, run_module, tiny_flags
from minigpt_jax import report, runs


def _ok(proc):
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _one_line_error(proc, *fragments):
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  err = proc.stderr.strip().splitlines()
  assert len(err) <= 2, proc.stderr  # absl may add a "--helpshort" hint line
  for f in fragments:
    assert f in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, corpus_dir):
  """A tiny run trained by the CLI, shared by the tests below (they only read it)."""
  tmp = tmp_path_factory.mktemp("cli")
  proc = _ok(run_command("minigpt_jax.train", *tiny_flags(tmp, corpus_dir)))
  return tmp, tmp / "runs" / "tiny", proc


def test_train_cli_writes_a_complete_run(trained_run):
  _, run, proc = trained_run
  assert "model: 24,512 parameters" in proc.stdout
  assert "done: step 20" in proc.stdout
  assert (run / "config.json").exists() and (run / "tokenizer.json").exists()
  assert sorted(p.name for p in (run / "ckpt").iterdir() if p.name.isdigit()) == ["10", "20"]
  rows = report.read_metrics(run / "metrics.jsonl")
  train = [r for r in rows if r["kind"] == "train"]
  evals = [r for r in rows if r["kind"] == "eval"]
  assert [r["step"] for r in train] == [5, 10, 15, 20]
  assert [r["step"] for r in evals] == [10, 20] and evals[0]["samples"][0].startswith("def ")
  assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in train)
  # The learning rate each logged step's update used: tiny warms up over 2 steps to 3e-3,
  # then cosine-decays to 3e-4 at step 20; update 20 runs at count 19, a little above it:
  # 3e-4 + 2.7e-3 * (1 + cos(pi * 17 / 18)) / 2 = 3.2055e-4.
  lrs = [r["lr"] for r in train]
  assert lrs == sorted(lrs, reverse=True) and lrs[0] < 3e-3
  assert abs(lrs[-1] - 3.2055e-4) < 1e-7, lrs
  assert all(0 <= r["syntax_rate"] <= 1 and r["val_bpc"] > 0 for r in evals)
  saved = sorted(p.name for p in (run / "samples").iterdir())
  assert saved == ["step_0000010.txt", "step_0000020.txt"]
  assert evals[1]["samples"][0] in (run / "samples" / saved[1]).read_text()


def test_exact_resume_across_processes(tmp_path, corpus_dir):
  """2N steps straight == N steps, a new process, N more: same losses and parameters, bit for bit.
  (The first N steps and the straight run train in this process; the resume in a fresh one.)"""
  common = ["--config.train.log_every=1", "--config.sample.num_samples=0"]
  straight = tmp_path / "straight"
  _ok(run_command("minigpt_jax.train", *tiny_flags(straight, corpus_dir, *common)))
  split = tmp_path / "split"
  first = _ok(run_command("minigpt_jax.train",
                          *tiny_flags(split, corpus_dir, *common, "--config.train.stop_at_step=10")))
  assert "done: step 10" in first.stdout
  second = _ok(run_module("minigpt_jax.train", *tiny_flags(split, corpus_dir, *common)))
  assert "resuming" in second.stdout and "from step 10" in second.stdout

  loss = lambda d: {r["step"]: r["loss"] for r in report.read_metrics(d / "runs/tiny/metrics.jsonl")
                    if r["kind"] == "train"}
  assert sorted(loss(split)) == list(range(1, 21))
  assert loss(split) == loss(straight)
  a = runs.load_for_inference(str(straight / "runs/tiny")).params
  b = runs.load_for_inference(str(split / "runs/tiny")).params
  import jax
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_sample_cli_greedy_cached_equals_uncached(trained_run):
  _, run, _ = trained_run
  args = ["--checkpoint", str(run), "--prompt", "def ", "--prompt", "class A:\n", "--greedy",
          "--max_new_tokens", "12", "--json", "--nostop_at_eos"]
  cached = json.loads(_ok(run_command("minigpt_jax.sample", *args)).stdout)
  uncached = json.loads(_ok(run_command("minigpt_jax.sample", *args, "--no_cache")).stdout)
  assert cached["step"] == 20 and cached["cache"] and not uncached["cache"]
  texts = [s["text"] for s in cached["samples"]]
  assert texts == [s["text"] for s in uncached["samples"]]
  assert len(texts) == 2 and all(len(t) == 12 for t in texts)


def test_sample_cli_same_seed_same_text_and_step_selection(trained_run):
  _, run, _ = trained_run
  args = ["--checkpoint", str(run / "ckpt" / "10"), "--num_samples", "2", "--seed", "3",
          "--max_new_tokens", "20", "--top_k", "10"]
  a = _ok(run_command("minigpt_jax.sample", *args))
  b = _ok(run_module("minigpt_jax.sample", *args))  # and in another process: the same text
  assert a.stdout == b.stdout and "=== prompt 0, sample 1 ===" in a.stdout
  assert "[step 10," in a.stderr


@pytest.mark.parametrize("args,fragments", [
    (["--config.train.stepz=5"], ["stepz"]),
    (["--config.model.d_model=abc"], ["d_model"]),
    (["--config.sample.temperature=0"], ["sample.temperature must be > 0"]),
    (["--config.model.n_heads=3"], ["not divisible by model.n_heads 3"]),
])
def test_train_config_mistakes_are_one_line_errors(tmp_path, corpus_dir, args, fragments):
  proc = run_command("minigpt_jax.train", *tiny_flags(tmp_path, corpus_dir, *args))
  _one_line_error(proc, *fragments)
  assert proc.returncode == 2


def test_train_missing_config_file(tmp_path):
  """In a fresh process: a bad input ends the command with one `error:` line on stderr and
  exit status 2 (the other bad inputs run in this process, with the status cli.run exits with)."""
  proc = run_module("minigpt_jax.train", "--config", str(tmp_path / "nope.py"))
  _one_line_error(proc, "nope.py")
  assert proc.returncode == 2
  assert proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("source,fragment", [
    ("def get_config(:\n  pass\n", "SyntaxError: invalid syntax (broken.py, line 1)"),
    ("import no_such_module\n", "No module named 'no_such_module'"),
])
def test_train_config_file_that_does_not_load(tmp_path, source, fragment):
  (tmp_path / "broken.py").write_text(source)
  proc = run_command("minigpt_jax.train", "--config", str(tmp_path / "broken.py"))
  _one_line_error(proc, "cannot load the config file", fragment)
  assert proc.returncode == 2


def test_train_empty_corpus(tmp_path):
  (tmp_path / "empty").mkdir()
  proc = run_command("minigpt_jax.train", *tiny_flags(tmp_path, tmp_path / "empty"))
  _one_line_error(proc, "error: the corpus has no train text")
  assert proc.returncode == 2
  assert not (tmp_path / "runs" / "tiny").exists()  # no empty run folder left behind


def test_train_refuses_a_run_another_process_is_training(tmp_path, corpus_dir):
  held = runs.lock_run_dir(tmp_path / "runs" / "tiny")  # this process "is training" it
  try:
    proc = run_command("minigpt_jax.train", *tiny_flags(tmp_path, corpus_dir))
  finally:
    held.close()
  _one_line_error(proc, "is being trained by pid", "pick another --config.run_name")
  assert proc.returncode == 2
  assert not (tmp_path / "runs" / "tiny" / "ckpt").exists()


@pytest.mark.parametrize("args,fragment", [
    (["--checkpoint", "/nonexistent/run"], "does not exist"),
    (["--step", "7"], "no checkpoint for step 7"),
    (["--prompt", "caf\u00e9"], "'\u00e9' at 3"),
    (["--prompt", "x" * 32], "32 characters does not fit the context of 32"),
    (["--max_new_tokens", "0"], "max_new_tokens must be >= 1"),
    (["--temperature", "0"], "temperature must be > 0"),
])
def test_sample_bad_input_is_a_one_line_error(trained_run, args, fragment):
  _, run, _ = trained_run
  base = [] if "--checkpoint" in args else ["--checkpoint", str(run)]
  proc = run_command("minigpt_jax.sample", *base, *args)
  _one_line_error(proc, fragment)
  assert proc.returncode == 2


def test_sample_bad_input_ends_the_process_with_one_error_line_and_status_2():
  """The case above in a fresh process: what a shell sees."""
  proc = run_module("minigpt_jax.sample", "--checkpoint", "/nonexistent/run")
  _one_line_error(proc, "does not exist")
  assert proc.returncode == 2
  assert proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("name,text,fragment", [
    ("config.json", '{"seed": 0}', "config.json is damaged: no data, model, train section"),
    ("config.json", "[1, 2]", "config.json is unreadable"),
    ("tokenizer.json", "[1, 2]", "tokenizer.json is damaged"),
    ("tokenizer.json", '{"kind": "char"}', "unsupported tokenizer description"),
])
def test_sample_damaged_run_files_are_one_line_errors(trained_run, tmp_path, name, text, fragment):
  _, run, _ = trained_run
  copy = tmp_path / "run"
  shutil.copytree(run, copy)
  (copy / name).write_text(text)
  proc = run_command("minigpt_jax.sample", "--checkpoint", str(copy), "--max_new_tokens", "5")
  _one_line_error(proc, fragment)
  assert proc.returncode == 2


def test_a_run_trained_with_cudnn_attention_samples_on_a_cpu(trained_run, tmp_path):
  """The attention kernel is this machine's choice; the run's stored one is for training."""
  _, run, _ = trained_run
  copy = tmp_path / "run"
  shutil.copytree(run, copy)
  config = json.loads((copy / "config.json").read_text())
  config["model"]["attention_impl"] = "cudnn"
  (copy / "config.json").write_text(json.dumps(config))
  args = ["--prompt", "def ", "--greedy", "--max_new_tokens", "10"]
  got = _ok(run_command("minigpt_jax.sample", "--checkpoint", str(copy), *args))
  want = _ok(run_command("minigpt_jax.sample", "--checkpoint", str(run), *args))
  assert got.stdout == want.stdout and "def " in got.stdout


@pytest.mark.parametrize("module,seed", [
    ("minigpt_jax.train", 2**64),  # was an OverflowError traceback, after the corpus was built
    ("minigpt_jax.train", -1),  # these two trained without a word: JAX wraps seeds mod 2**32
    ("minigpt_jax.bench", 2**32),
])
def test_a_config_seed_out_of_range_is_refused_before_any_work(tmp_path, corpus_dir, module,
                                                               seed):
  if module.endswith("bench"):  # no --workdir; nothing to benchmark: only the check runs
    args = ["--config", str(REPO / "configs" / "tiny.py"), "--batch_sizes=", "--decode_batches="]
  else:
    args = tiny_flags(tmp_path, corpus_dir, "--config.train.steps=1")
  proc = run_command(module, *args, f"--config.seed={seed}")
  one_line_error(proc, "seed must be an integer in [0, 4294967295]", f"got {seed}")
  assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


# --- a closed stdout (`... | head`): status 141, as a process SIGPIPE ended, no traceback ---

def _start(module: str, *args: str, stdout, unbuffered: bool = False) -> subprocess.Popen:
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  env.pop("PYTHONUNBUFFERED", None)  # buffered, as for most users: what is left fails at exit
  if unbuffered:  # every print writes at once, and fails there
    env["PYTHONUNBUFFERED"] = "1"
  return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                          stdout=stdout, stderr=subprocess.PIPE, text=True)


def _closed_stdout(module: str, *args: str, unbuffered: bool) -> subprocess.CompletedProcess:
  """Runs the command with its stdout a pipe whose reader has gone already."""
  read, write = os.pipe()
  os.close(read)
  try:
    proc = _start(module, *args, stdout=write, unbuffered=unbuffered)
  finally:
    os.close(write)
  _, err = proc.communicate(timeout=240)
  return subprocess.CompletedProcess(proc.args, proc.returncode, None, err)


def _quiet_141(returncode: int, stderr: str) -> None:
  assert returncode == 141, stderr[-3000:]
  assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr[-3000:]


def test_sample_stream_into_head_ends_quietly_with_141(trained_run):
  _, run, _ = trained_run
  # ~150 KB: more than a pipe holds, so the writer is still writing when the reader goes
  proc = _start("minigpt_jax.sample", "--checkpoint", str(run), "--prompt", "def ", "--stream",
                "--max_new_tokens", "27", "--num_samples", "2500", "--nostop_at_eos",
                stdout=subprocess.PIPE)
  try:
    head = proc.stdout.read(5)  # as `| head -c 5`
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=240)
  finally:
    proc.kill()
  assert head == "=== p"
  _quiet_141(proc.returncode, err)


@pytest.mark.parametrize("unbuffered", [False, True])
def test_evaluate_to_a_closed_stdout_still_writes_its_report(trained_run, tmp_path, unbuffered):
  _, run, _ = trained_run
  proc = _closed_stdout("minigpt_jax.evaluate", "--checkpoint", str(run), "--num_samples=0",
                        f"--json_out={tmp_path / 'report.json'}", unbuffered=unbuffered)
  _quiet_141(proc.returncode, proc.stderr)
  assert json.loads((tmp_path / "report.json").read_text())["step"] == 20


def test_training_that_loses_its_stdout_stops_quietly_with_complete_checkpoints(tmp_path,
                                                                                corpus_dir):
  """Stops as Ctrl-C does: a save in progress is finished first, the lock released."""
  proc = _start("minigpt_jax.train", *tiny_flags(
      tmp_path, corpus_dir, "--config.train.steps=100000", "--config.train.log_every=1",
      "--config.train.ckpt_every=2", "--config.train.eval_every=1000000",
      "--config.sample.num_samples=0"), stdout=subprocess.PIPE)
  run = tmp_path / "runs" / "tiny"
  try:
    assert proc.stdout.read(5)
    deadline = time.monotonic() + 180  # a few steps in: saves (every 2nd step) under way
    while time.monotonic() < deadline and proc.poll() is None and not (
        (run / "metrics.jsonl").exists() and
        len((run / "metrics.jsonl").read_text().splitlines()) >= 5):
      time.sleep(0.05)
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=240)
  finally:
    proc.kill()
  _quiet_141(proc.returncode, err)
  names = [p.name for p in (run / "ckpt").iterdir()]
  assert names and all(n.isdigit() for n in names), names  # no save left half-done
  assert runs.load_for_inference(str(run)).step == max(map(int, names))  # the newest loads


# --- small things a user meets ----------------------------------------------------------------

def test_interactive_takes_a_crlf_line_without_its_carriage_return():
  from minigpt_jax import interactive
  lines = iter(["def f(x):\\\r", "    return x\r", "print(1)\r", "\r"])
  read_line = lambda _: next(lines)
  assert interactive.read_prompt(read_line, tty=False) == "def f(x):\n    return x"
  assert interactive.read_prompt(read_line, tty=False) == "print(1)"
  assert interactive.read_prompt(read_line, tty=False) is None  # an empty CRLF line ends it


def test_an_unreadable_extra_corpus_names_the_permission_problem(tmp_path, monkeypatch):
  from minigpt_jax import scoring
  from minigpt_jax.errors import UserError
  from minigpt_jax.tokenizer import CharTokenizer
  (tmp_path / "a.py").write_text("x = 1\n")
  real = os.scandir

  def denied(path="."):  # as for a folder without read permission (chmod does not stop root)
    if os.fspath(path) == str(tmp_path):
      raise PermissionError(13, "Permission denied", str(path))
    return real(path)

  monkeypatch.setattr(os, "scandir", denied)
  with pytest.raises(UserError) as e:
    scoring.encode_folder(str(tmp_path), CharTokenizer())
  assert str(e.value) == f"cannot read --extra_corpus {str(tmp_path)!r}: Permission denied"
