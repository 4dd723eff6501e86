"""Shared fixtures: a synthetic Python corpus and a tiny config pointing at it."""

import os
import pathlib

import pytest

# The tests run in two worker processes: on a GPU, JAX's default of taking 75% of its
# memory at start would leave the second worker none.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from helpers import tiny_config_in, write_corpus


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> pathlib.Path:
  return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def tiny_config(tmp_path, corpus_dir):
  return tiny_config_in(tmp_path, corpus_dir)
