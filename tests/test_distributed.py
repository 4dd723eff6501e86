"""Data parallel, FSDP and multi-process training on CPU devices, checked against one device.

Every multi-device case runs in a child process, because the number of CPU
devices (XLA_FLAGS=--xla_force_host_platform_device_count) and the distributed
runtime are fixed when JAX starts. The children all run distributed_child.py, which
trains, spies on what `checkpoints.save` / `checkpoints.restore` see, and prints one JSON line; the
assertions live here.
"""

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from helpers import REPO

STEPS = 8  # every run's schedule; the FSDP run stops at SPLIT and resumes on another mesh
SPLIT = 4
TOL = dict(rtol=2e-5, atol=2e-5)  # float32: reductions split over devices change the rounding



def _env(n_devices: int) -> dict:
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n_devices}"
  return {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags.strip()}


def _start(n_devices: int, args: dict) -> subprocess.Popen:
  """Starts a child; its output goes to files, so a chatty child never blocks on a full pipe."""
  out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
  p = subprocess.Popen([sys.executable, str(REPO / "tests" / "distributed_child.py"),
                        json.dumps(args)], cwd=REPO,
                       env=_env(n_devices), stdout=out, stderr=err, text=True)
  p.out, p.err = out, err
  return p


def _wait(procs: list, timeout: float) -> list[tuple[int, str, str]]:
  """Waits for all children, killing every one left once `timeout` s have passed.

  Returns (exit status, stdout, stderr) per child (-9: killed)."""
  deadline = time.monotonic() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(deadline - time.monotonic(), 0.1))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  outs = []
  for p in procs:
    p.out.seek(0), p.err.seek(0)
    outs.append((p.returncode, p.out.read(), p.err.read()))
    p.out.close(), p.err.close()
  return outs


def _finish(procs: list, timeout: float = 150) -> list[tuple[dict, str]]:
  """Waits for all children, which must succeed. Returns (result, stdout) per child."""
  results = []
  for rc, stdout, stderr in _wait(procs, timeout):
    lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
    assert rc == 0 and lines, f"child failed (rc {rc}):\n{stderr[-3000:]}"
    results.append((json.loads(lines[-1][len("RESULT "):]), stdout))
  return results


def _losses(run: dict, kind: str = "train") -> dict:
  return {int(k): v for k, v in run[kind].items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus_dir):
  """One device (reference), 8 devices data parallel, 8 devices FSDP stopped at SPLIT,
  resumed on 4 devices with another FSDP split, and the checkpoint loaded on 1 device."""
  tmp = tmp_path_factory.mktemp("dist")

  def overrides(name, **more):
    # d_ff 128: tiny's FFN kernels then reach sharding.MIN_FSDP_SIZE and are really split.
    return {"data.roots": [str(corpus_dir)], "data.dir": str(tmp / "data"),
            "workdir": str(tmp / "runs"), "run_name": name, "model.d_ff": 128,
            "train.steps": STEPS, "train.log_every": 1, "train.eval_every": SPLIT,
            "train.ckpt_every": SPLIT, "sample.num_samples": 0, **more}

  fsdp = overrides("fsdp", **{"mesh.fsdp": 4, "mesh.data": -1, "train.stop_at_step": SPLIT})
  (eight, _), = _finish([_start(8, {
      "runs": [overrides("dp"), fsdp], "dump_saved_at": SPLIT, "dump_to": str(tmp / "saved.npz")})])
  one, four = [r for r, _ in _finish([
      _start(1, {"runs": [overrides("ref")], "inference": {
          "path": str(tmp / "runs" / "fsdp"), "step": SPLIT, "dump_to": str(tmp / "on1.npz"),
          "compare_with": str(tmp / "saved.npz")}}),
      _start(4, {"runs": [{**fsdp, "mesh.fsdp": 2, "train.stop_at_step": 0}],
                 "dump_restored_to": str(tmp / "on4.npz"),
                 "hlo": overrides("hlo", **{"mesh.fsdp": 2})})])]
  return {"tmp": tmp, "overrides": overrides, "one": one, "eight": eight, "four": four}


def test_data_parallel_and_fsdp_match_one_device(runs):
  (ref,), (dp, fsdp_first), (fsdp_rest,) = (runs[k]["runs"] for k in ("one", "eight", "four"))
  assert (runs["one"]["devices"], runs["eight"]["devices"], runs["four"]["devices"]) == (1, 8, 4)
  want = _losses(ref)
  assert sorted(want) == list(range(1, STEPS + 1)) and want[STEPS] < want[1] - 0.3  # it learns
  np.testing.assert_allclose([_losses(dp)[s] for s in want], list(want.values()), **TOL)
  fsdp = {**_losses(fsdp_first), **_losses(fsdp_rest)}  # 8 devices, then resumed on 4
  assert sorted(fsdp) == sorted(want)
  np.testing.assert_allclose([fsdp[s] for s in want], list(want.values()), **TOL)
  for run, step in ((dp, SPLIT), (dp, STEPS), (fsdp_first, SPLIT), (fsdp_rest, STEPS)):
    np.testing.assert_allclose(_losses(run, "val")[step], _losses(ref, "val")[step], **TOL)


def test_fsdp_really_splits_the_large_parameters(runs):
  dp_saved = runs["eight"]["runs"][0]["saved"][str(SPLIT)]
  on8 = runs["eight"]["runs"][1]["saved"][str(SPLIT)]
  on4 = runs["four"]["runs"][0]["restored"]
  up, down = "['block_0']['ffn']['up']['kernel']", "['block_1']['ffn']['down']['kernel']"
  # data=2 x fsdp=4: 8 local shards, each a quarter of the [32, 128] / [128, 32] kernel.
  assert on8[up] == ["P(None, 'fsdp')", [[32, 32]] * 8]
  assert on8[down] == ["P('fsdp', None)", [[32, 32]] * 8]
  # Restored for data=2 x fsdp=2: resharded to halves.
  assert on4[up] == ["P(None, 'fsdp')", [[32, 64]] * 4]
  assert on4[down] == ["P('fsdp', None)", [[64, 32]] * 4]
  # Small arrays stay whole; pure data parallel replicates everything.
  assert on8["['ln_f']['scale']"] == ["P()", [[32]] * 8]
  assert all(spec == "P()" for spec, _ in dp_saved.values())
  assert dp_saved[up][1] == [[32, 128]] * 8


def test_checkpoint_from_8_devices_restores_on_4_and_on_1(runs):
  saved = dict(np.load(runs["tmp"] / "saved.npz"))
  for name in ("on4.npz", "on1.npz"):
    got = dict(np.load(runs["tmp"] / name))
    assert sorted(got) == sorted(saved) and len(saved) > 10
    for k in saved:
      np.testing.assert_array_equal(got[k], saved[k], err_msg=f"{name} {k}")
  inf = runs["one"]["inference"]
  assert inf["step"] == SPLIT and len(inf["devices"]) == 1
  # 12 new tokens (an <eos> is spelt out), the same as from the parameters before saving
  assert len(inf["text"]) >= 12 and inf["text"] == inf["text_from_saved"]


def test_batch_is_never_whole_on_one_device(runs):
  """Each of 4 devices slices only its own rows of the 8-row batch out of the replicated
  corpus inside the step: the compiled step holds [2, T+1] windows, never [8, T+1]
  (T+1 = 33 for tiny). Without the step's sharding constraint every device builds all 8."""
  shapes = set(re.findall(r"s32\[(\d+),33\]", runs["four"]["hlo"]))
  assert shapes == {"2"}


def test_periodic_eval_splits_its_windows_over_the_devices(runs):
  """The eval step compiled for training's mesh scores [2, T+1] windows on each of 4
  devices, never all 8 (without its sharding constraint every device scores all 8)."""
  shapes = set(re.findall(r"s32\[(\d+),33\]", runs["four"]["eval_hlo"]))
  assert shapes == {"2"}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _has_cpu_collectives() -> bool:
  try:
    from jax._src.lib import _jax
  except ImportError:
    return True  # let the run say what is missing
  return hasattr(_jax, "make_gloo_tcp_collectives")


@pytest.fixture(scope="module")
def two_processes(runs):
  """Two processes of 2 devices each, which train, one after another: the run compared with
  one process, then a short run and its resume with data.rebuild=True (in a workdir of
  their own, on the same mesh, so that they reuse the first run's compiled step)."""
  if not _has_cpu_collectives():
    pytest.skip("this jaxlib has no gloo CPU collectives, so CPU processes cannot talk")
  port = _free_port()
  tmp = runs["tmp"]
  # FSDP over all 4 devices of the 2 processes: parameters, batches and samples span both.
  # A fresh data.dir: process 0 prepares the corpus while process 1 waits for it.
  base = runs["overrides"]("two_procs", **{
      "data.dir": str(tmp / "data_two_procs"), "mesh.distributed": True,
      "mesh.coordinator_address": f"127.0.0.1:{port}", "mesh.num_processes": 2,
      "mesh.fsdp": 4, "mesh.data": 1, "train.eval_every": STEPS, "train.ckpt_every": STEPS,
      "sample.num_samples": 1})
  short = {**base, "run_name": "rebuild_resume", "data.dir": str(tmp / "data_rebuild"),
           "workdir": str(tmp / "runs_rebuild"), "train.steps": 2, "train.eval_every": 2,
           "train.ckpt_every": 2, "sample.num_samples": 0}
  resume = {**short, "train.steps": 4, "data.rebuild": True}  # the sources are unchanged
  procs = [_start(2, {"distributed": True, "runs": [{**run, "mesh.process_id": i}
                                                    for run in (base, short, resume)]})
           for i in range(2)]
  return _finish(procs, timeout=180)


def test_two_processes_match_one_process(runs, two_processes):
  (p0, out0), (p1, out1) = two_processes
  assert [(p["process"], p["processes"], p["devices"]) for p in (p0, p1)] == [(0, 2, 4), (1, 2, 4)]
  want = _losses(runs["one"]["runs"][0])
  for p in (p0, p1):
    run = p["runs"][0]
    np.testing.assert_allclose([_losses(run)[s] for s in want], list(want.values()), **TOL)
    np.testing.assert_allclose(_losses(run, "val")[STEPS],
                               _losses(runs["one"]["runs"][0], "val")[STEPS], **TOL)
    up = run["saved"][str(STEPS)]["['block_0']['ffn']['up']['kernel']"]
    assert up == ["P(None, 'fsdp')", [[32, 32]] * 2]  # 2 of the 4 quarters each
  # Only process 0 reports: progress, samples, metrics.
  assert "sample 0 at step" in out0
  # (Process 1's stdout also holds gloo's connection messages, whose lines can arrive
  # split when threads write at once; so look for what process 0 reports instead.)
  ours = ("loss", "sample", "step")
  assert all(m in out0 for m in ours)
  assert not [m for m in ours if m in out1], out1[-2000:]
  run_dir = runs["tmp"] / "runs" / "two_procs"
  rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, STEPS + 1))
  assert [r["step"] for r in rows if r["kind"] == "eval"] == [STEPS] and rows[-1]["samples"]
  assert sorted(p.name for p in (run_dir / "ckpt").iterdir()) == [str(STEPS)]


def test_when_process_0_cannot_prepare_the_corpus_every_process_stops(runs, tmp_path):
  """Process 0 alone builds the corpus; when that fails, process 1 must not wait for it
  at a barrier until the runtime times out, but stop at once and say why."""
  if not _has_cpu_collectives():
    pytest.skip("this jaxlib has no gloo CPU collectives, so CPU processes cannot talk")
  (tmp_path / "empty").mkdir()
  base = runs["overrides"]("no_corpus", **{
      "data.roots": [str(tmp_path / "empty")], "data.dir": str(tmp_path / "data"),
      "mesh.distributed": True, "mesh.coordinator_address": f"127.0.0.1:{_free_port()}",
      "mesh.num_processes": 2})
  t0 = time.monotonic()
  outs = _wait([_start(1, {"distributed": True, "runs": [{**base, "mesh.process_id": i}]})
                for i in range(2)], timeout=90)
  (rc0, _, err0), (rc1, _, err1) = outs
  assert rc0 not in (0, -9) and "the corpus has no train text" in err0, err0[-2000:]
  assert rc1 not in (0, -9) and "process 0 failed while preparing the corpus" in err1, err1[-2000:]
  assert time.monotonic() - t0 < 60


def test_two_processes_resume_with_a_rebuild(two_processes):
  """A resume with data.rebuild=True reads the corpus record of the run's checkpoint. Orbax
  synchronises every process when it opens checkpoints, so all must read it: read by
  process 0 alone, both processes waited for each other forever (the fixture's children
  then time out)."""
  for p, _ in two_processes:
    assert sorted(_losses(p["runs"][1])) == [1, 2]
    assert sorted(_losses(p["runs"][2])) == [3, 4]  # resumed at step 2
