"""Which JAX the project admits, and which platform the test suite runs on."""

import importlib.metadata
import tomllib

import jax
from packaging.requirements import Requirement

from helpers import REPO, cpu_only_run


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
