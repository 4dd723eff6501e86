"""Shared fixtures: a synthetic Python corpus and a tiny config pointing at it."""

import os
import pathlib
import subprocess
import sys

import pytest

from configs import tiny  # importable: pytest's pythonpath is the repository

REPO = pathlib.Path(__file__).resolve().parents[1]

_TEMPLATES = [
    'def add_{i}(x):\n    """Return x plus {i}."""\n    if x > {i}:\n        return x - {i}\n'
    '    return x + {i}\n',
    'class Thing{i}:\n    def __init__(self, value):\n        self.value = value\n\n'
    '    def get(self):\n        return self.value * {i}\n',
    'import os\n\n\nfor i in range({i}):\n    print(i)\n\twith open("f") as f:\n'
    '        data = f.read()\n',
]


def write_corpus(root: pathlib.Path, n_files: int = 60) -> pathlib.Path:
  """Writes `n_files` small Python files (in nested folders) and returns the root."""
  for i in range(n_files):
    sub = root / f"pkg{i % 4}"
    sub.mkdir(parents=True, exist_ok=True)
    (sub / f"mod_{i:03d}.py").write_text(_TEMPLATES[i % 3].format(i=i) * (1 + i % 3))
  return root


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> pathlib.Path:
  return write_corpus(tmp_path_factory.mktemp("corpus"))


def tiny_config_in(root: pathlib.Path, corpus_dir: pathlib.Path):
  """configs/tiny.py on the synthetic corpus, writing its data and runs under `root`."""
  c = tiny.get_config()
  c.data.roots = (str(corpus_dir),)
  c.data.dir = str(root / "data")
  c.workdir = str(root / "runs")
  return c


@pytest.fixture
def tiny_config(tmp_path, corpus_dir):
  return tiny_config_in(tmp_path, corpus_dir)


def run_module(module: str, *args: str, cwd=None, timeout: int = 240, env_extra=None):
  """Runs `python -m module args...` in a fresh process; returns CompletedProcess."""
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", **(env_extra or {})}
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def tiny_flags(tmp_path, corpus_dir, *extra: str) -> list[str]:
  """Command-line flags that make configs/tiny.py train on the synthetic corpus in tmp_path."""
  return ["--config", str(REPO / "configs" / "tiny.py"),
          f"--config.data.roots=('{corpus_dir}',)", f"--config.data.dir={tmp_path / 'data'}",
          f"--workdir={tmp_path / 'runs'}", *extra]
