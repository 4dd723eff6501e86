"""Shared fixtures: a synthetic Python corpus and a tiny config pointing at it."""

import pathlib

import pytest

from helpers import tiny_config_in, write_corpus


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> pathlib.Path:
  return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def tiny_config(tmp_path, corpus_dir):
  return tiny_config_in(tmp_path, corpus_dir)
