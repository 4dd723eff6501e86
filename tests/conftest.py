"""Shared fixtures: a synthetic Python corpus and a tiny config pointing at it."""

import os
import pathlib
import shutil
import tempfile

import pytest

# The tests run in two worker processes: on a GPU, JAX's default of taking 75% of its
# memory at start would leave the second worker none.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# One compilation cache on disk for the whole run: the workers and the commands the tests
# start in fresh processes (which inherit the environment) compile the tiny config's
# programs once instead of once per process. Set here, in the first process, before the
# workers start and before JAX is imported.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE = tempfile.mkdtemp(prefix="minigpt-jax-cache-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def pytest_configure(config):
  """The suite runs on the CPU, in-process as in the commands it starts: on a GPU machine a
  test comparing the two would otherwise compare a GPU's bf16 and cuDNN with the CPU's
  float32, and the tolerances and timings were measured on the CPU. `pytest -m gpu` runs the
  GPU tests on the GPU."""
  if cpu_only_run(config.option.markexpr):
    os.environ["JAX_PLATFORMS"] = "cpu"  # for the workers, and the commands they start
    import jax
    jax.config.update("jax_platforms", "cpu")  # JAX read the variable when imported


def pytest_unconfigure(config):
  if "_CACHE" in globals() and not hasattr(config, "workerinput"):
    shutil.rmtree(_CACHE, ignore_errors=True)

from helpers import cpu_only_run, tiny_config_in, write_corpus


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> pathlib.Path:
  return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def tiny_config(tmp_path, corpus_dir):
  return tiny_config_in(tmp_path, corpus_dir)
