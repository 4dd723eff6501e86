"""scripts/gpu_acceptance.sh on a CPU-only machine: each stage stops at once, with one line,
without a GPU backend; each stage's dry run runs its commands (tiny config) and exits 0;
a failed step makes its stage exit non-zero, and so does a train stage whose time ran
out before its first checkpoint."""

import json
import os
import re
import subprocess
import sys

import pytest

from helpers import REPO

SCRIPT = REPO / "scripts" / "gpu_acceptance.sh"
STAGES = ("headline", "levers", "train")


def acceptance(*args, cwd, **env):
  """Runs the script from `cwd` on the CPU, as a machine whose GPU backend did not load."""
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
         "PYTHON": sys.executable, **env}
  return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=400)


@pytest.mark.parametrize("stage", STAGES)
def test_without_a_gpu_backend_a_stage_stops_at_once_with_one_line(tmp_path, stage):
  proc = acceptance(stage, "out", cwd=tmp_path)
  assert proc.returncode == 1, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("no GPU backend: JAX runs on cpu"), proc.stderr
  assert "JAX_PLATFORMS=cpu" in lines[0] and "jax " in lines[0]
  # Nothing after the check ran: no pytest, no benchmark, no training.
  assert sorted(p.name for p in (tmp_path / "out" / stage).iterdir()) == [
      "backend.log", "backend.txt"]


def test_a_bad_stage_or_missing_folder_is_a_usage_error(tmp_path):
  for args in (("all", "out"), ("headline",), ()):
    proc = acceptance(*args, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("usage:"), proc.stderr
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stage", STAGES)
def test_the_dry_run_of_each_stage_runs_its_commands(tmp_path, stage):
  """From another directory, with OUT_DIR relative to it: every command of the stage runs
  (tiny config) and the stage exits 0; the backend check is run and fails with one line."""
  # Training runs until the timeout stops it: 30 s of it (not the default 45) leave its
  # first checkpoint, the corpus build and compile of ~10 s, room to spare.
  proc = acceptance("--dry_run", stage, "out", cwd=tmp_path, DRY_TRAIN_SECONDS="30")
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = tmp_path / "out" / stage
  assert "the backend check exits 1, as it must without a GPU: no GPU backend" in proc.stderr
  assert f"{stage}: done: {out}" in proc.stderr
  if stage == "headline":
    # Collected, and skipped on the CPU.
    assert re.search(r"^\d+ skipped in", (out / "pytest_gpu.txt").read_text(), re.M)
    bench = json.loads((out / "bench.json").read_text())
    assert [r["batch_size"] for r in bench["train"]["results"]] == [8]
    assert {(r["mode"], r["batch"]) for r in bench["decode"]["results"]} == {
        (m, b) for m in ("cached", "uncached") for b in (1, 8)}
  elif stage == "levers":
    table = (out / "levers.md").read_text()
    for lever in ("baseline", "attention_xla", "float32", "vocab_unpadded",
                  "decode_unsegmented", "decode_unroll4", "decode_unroll16",
                  "no_command_buffers"):
      assert f"| {lever} |" in table and (out / f"{lever}.json").exists()
  else:  # stopped by the timeout's SIGTERM, as the real stage is, which saved a checkpoint
    saved = re.search(r"preempted \(SIGTERM\) at step (\d+): checkpoint saved",
                      (out / "train.log").read_text())
    assert saved, (out / "train.log").read_text()[-3000:]
    assert json.loads((out / "eval.json").read_text())["step"] == int(saved[1])


def test_a_train_stage_stopped_before_its_first_checkpoint_fails(tmp_path):
  """The time ran out in the corpus build or the compile: said, and nothing to evaluate."""
  proc = acceptance("--dry_run", "train", "out", cwd=tmp_path, DRY_TRAIN_SECONDS="1")
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "train: train failed: no checkpoint was written in 1 s" in proc.stderr
  assert "raise DRY_TRAIN_SECONDS" in proc.stderr and "FAILED: train (no checkpoint)" in proc.stderr
  assert not (tmp_path / "out" / "train" / "eval.txt").exists()


def test_a_failed_step_fails_its_stage(tmp_path):
  """Each lever's benchmark fails: the stage says which, and exits 1."""
  wrapper = tmp_path / "python"
  wrapper.write_text(f'#!/bin/sh\ncase "$*" in *minigpt_jax.bench*) exit 3;; esac\n'
                     f'exec {sys.executable} "$@"\n')
  wrapper.chmod(0o755)
  proc = acceptance("--dry_run", "levers", str(tmp_path / "out"), cwd=tmp_path,
                    PYTHON=str(wrapper))
  assert proc.returncode == 1, proc.stderr
  assert "baseline failed (exit 3)" in (tmp_path / "out" / "levers" / "levers.log").read_text()
  assert "levers: levers failed (exit 1)" in proc.stderr and "FAILED: levers" in proc.stderr
