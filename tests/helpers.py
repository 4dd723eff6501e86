"""What the tests share: a synthetic Python corpus, tiny configs, and running a command
in a fresh process."""

import dataclasses
import os
import pathlib
import subprocess
import sys

from configs import tiny  # importable: pytest's pythonpath is the repository
from minigpt_jax.model import ModelConfig

REPO = pathlib.Path(__file__).resolve().parents[1]

# A small float32 model on the CPU; tests change what they need with dataclasses.replace.
SMALL_MODEL = ModelConfig(vocab_size=99, context_len=32, d_model=32, n_layers=2, n_heads=4,
                          d_ff=64, vocab_pad_multiple=1, compute_dtype="float32",
                          attention_impl="xla")


def model_config(**changes) -> ModelConfig:
  return dataclasses.replace(SMALL_MODEL, **changes)

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


def tiny_config_in(root: pathlib.Path, corpus_dir: pathlib.Path):
  """configs/tiny.py on the synthetic corpus, writing its data and runs under `root`."""
  c = tiny.get_config()
  c.data.roots = (str(corpus_dir),)
  c.data.dir = str(root / "data")
  c.workdir = str(root / "runs")
  return c


def run_module(module: str, *args: str, cwd=None, timeout: int = 240, env_extra=None):
  """Runs `python -m module args...` in a fresh process; returns CompletedProcess."""
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", **(env_extra or {})}
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def cpu_only_run(markexpr: str) -> bool:
  """Whether a test run selected by `-m markexpr` runs JAX on the CPU, in-process as in the
  commands it starts (`run_module`): every run but one that selects the `gpu` tests alone."""
  from _pytest.mark.expression import Expression
  if not markexpr:
    return True
  selects = Expression.compile(markexpr).evaluate
  return not (selects(lambda mark: mark == "gpu") and not selects(lambda mark: False))


def tiny_flags(tmp_path, corpus_dir, *extra: str) -> list[str]:
  """Command-line flags that make configs/tiny.py train on the synthetic corpus in tmp_path."""
  return ["--config", str(REPO / "configs" / "tiny.py"),
          f"--config.data.roots=('{corpus_dir}',)", f"--config.data.dir={tmp_path / 'data'}",
          f"--workdir={tmp_path / 'runs'}", *extra]


def ok(proc):
  """`proc`, which must have succeeded."""
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def one_line_error(proc, *fragments):
  """`proc` failed with one error line (absl may add a --helpshort hint) holding `fragments`."""
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert len(proc.stderr.strip().splitlines()) <= 2, proc.stderr
  for f in fragments:
    assert f in proc.stderr, proc.stderr
