"""Which JAX the project admits, which platform the test suite runs on, and what
minigpt_jax/hardware.py makes of the machine: the backend it expects, and glibc's handling of
freed host memory (in fresh processes: malloc's settings are the process's)."""

import importlib.metadata
import os
import subprocess
import sys
import tomllib

import jax
import pytest
from packaging.requirements import Requirement

from helpers import REPO, cpu_only_run
from minigpt_jax import hardware


def test_the_suite_runs_on_the_cpu_unless_it_selects_the_gpu_tests_alone():
  """In-process tests and the commands they start (tests/helpers.py `run_module`) must run
  on the same platform, or a test comparing the two fails on a GPU machine."""
  assert jax.config.jax_platforms == "cpu" and jax.default_backend() == "cpu"
  assert cpu_only_run("") and cpu_only_run("not gpu") and cpu_only_run("gpu or not gpu")
  assert not cpu_only_run("gpu") and not cpu_only_run("gpu and not slow")


def test_jax_is_pinned_to_tested_releases_alike_everywhere():
  """One range for jax in the dependencies and the CUDA extras, below releases no one has
  run, and the installed jax in it."""
  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  specs = [project["dependencies"], project["optional-dependencies"]["cuda12"],
           project["optional-dependencies"]["cuda13"]]
  jax_reqs = [r for reqs in specs for r in map(Requirement, reqs) if r.name == "jax"]
  assert len(jax_reqs) == 3 and len({str(r.specifier) for r in jax_reqs}) == 1, jax_reqs
  spec = jax_reqs[0].specifier
  assert spec.contains("0.10.2") and spec.contains("0.11.0")
  assert not spec.contains("0.10.1") and not spec.contains("0.12.0")
  assert spec.contains(importlib.metadata.version("jax"))


def test_the_cpu_backend_is_expected_from_jax_platforms_or_the_installed_plugins(
    monkeypatch, tmp_path):
  expected = hardware.cpu_backend_expected
  assert expected("cpu") and expected("cpu,cuda") and not expected("cuda") and not expected("cuda,cpu")
  assert expected("", accelerators=[]) and not expected("", accelerators=["jax-cuda"])
  # A CUDA plugin counts when its device is there: without a GPU, JAX falls back to the CPU.
  plugin = type("Dist", (), {"metadata": {"Name": "jax-cuda12-plugin"}})()
  monkeypatch.setattr(hardware.importlib.metadata, "distributions", lambda: [plugin])
  monkeypatch.setattr(hardware, "_ACCELERATORS", (("jax-cuda", (str(tmp_path / "nvidiactl"),)),))
  assert hardware.installed_accelerators() == [] and expected("")
  (tmp_path / "nvidiactl").touch()
  assert hardware.installed_accelerators() == ["jax-cuda"] and not expected("")


FAULTS_AFTER_FREE = """
import ctypes, resource, sys
from minigpt_jax import hardware
kept = hardware.keep_freed_host_memory() if sys.argv[1] != "default" else False
for scratch in sys.argv[2:]:  # steps compiled one after another, with these scratch sizes
  kept = hardware.fit_host_memory_to(int(scratch))
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
size, faults = 256 << 20, []
for _ in range(3):  # what XLA:CPU does each step: a big scratch buffer, written, then freed
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  p = libc.malloc(size)
  ctypes.memset(p, 1, size)
  libc.free(p)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, *faults)
"""


def faults_after_free(mode: str, *scratch_sizes: int, platforms: str = "cpu"
                      ) -> tuple[bool, list[int]]:
  """(whether freed memory is kept, page faults of each round) of FAULTS_AFTER_FREE, with
  JAX_PLATFORMS=`platforms` (JAX is imported, not started)."""
  out = subprocess.run([sys.executable, "-c", FAULTS_AFTER_FREE, mode, *map(str, scratch_sizes)],
                       capture_output=True, text=True, check=True, cwd=REPO,
                       env={**os.environ, "JAX_PLATFORMS": platforms}).stdout.split()
  return out[0] == "True", [int(f) for f in out[1:]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux's")
def test_a_freed_scratch_buffer_is_reused_without_page_faults():
  kept, with_keep = faults_after_free("keep")
  _, without = faults_after_free("default")
  assert kept
  # By default glibc maps such a buffer afresh each time, so its pages fault in every time;
  # told to keep freed memory, only the first round faults.
  assert max(with_keep[1:]) * 10 < min(without)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux's")
def test_freed_memory_is_kept_only_while_the_steps_scratch_buffer_is_small():
  """A heap that keeps freed memory grows by whole scratch buffers when steps cannot reuse
  each other's; past hardware.KEEP_LIMIT, large blocks go back to the kernel when freed."""
  limit = hardware.KEEP_LIMIT
  kept_small, small = faults_after_free("keep", limit)
  kept_big, big = faults_after_free("keep", limit + 1)
  kept_again, again = faults_after_free("keep", limit + 1, limit)  # e.g. the bench's next row
  assert kept_small and not kept_big and kept_again
  assert max(small[1:]) * 10 < min(big)  # every round of the big case faults its pages again
  assert max(again[1:]) * 10 < min(big)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux's")
def test_freed_memory_is_not_kept_for_an_accelerator_backend():
  """On a GPU the scratch buffers are device memory: glibc keeps its defaults (one arena
  would only serialise host allocations)."""
  kept, rounds = faults_after_free("keep", platforms="cuda")
  _, without = faults_after_free("default")
  assert not kept
  assert min(rounds) * 2 > min(without)  # every round faults its pages in, as by default
