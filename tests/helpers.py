"""What the tests share: a synthetic Python corpus, tiny configs, and running a command
in this process (`run_command`) or in a fresh one (`run_module`)."""

import contextlib
import dataclasses
import io
import logging
import os
import pathlib
import runpy
import signal
import subprocess
import sys
import warnings

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


# The commands (`python -m minigpt_jax.<name>`) that `run_command` runs in this process.
COMMANDS = ("train", "sample", "evaluate", "plot", "bench")


def _command_flags(flag_values) -> dict:
  """{name: (defining module, Flag)} of every flag a command module defined, and of the
  --config.a.b overrides ml_collections defines while parsing."""
  found = {}
  for module, module_flags in flag_values.flags_by_module_dict().items():
    # absl names a flag's module by its file where it ran as __main__ (run_command's runpy)
    if module.startswith("minigpt_jax.") or pathlib.Path(module).parent == REPO / "minigpt_jax":
      found.update((f.name, (module, f)) for f in module_flags)
  for name in list(flag_values):
    if name.startswith("config.") and name not in found:
      found[name] = (flag_values.find_module_defining_flag(name), flag_values[name])
  return found


def run_command(module: str, *args: str) -> subprocess.CompletedProcess:
  """Runs `python -m module args...` in this process: the module run afresh as __main__
  (runpy), its flags parsed from `args` and `main` run by `cli.run`, with stdout
  and stderr (absl's log handler included) captured. Returns a CompletedProcess whose
  returncode is the status `cli.run` ended with (its SystemExit code).

  For what does not depend on the process: a bad flag value, a refused output path, what a
  command writes. Signals, a closed stdout, two processes and the exit status a shell sees
  stay with `run_module`.

  Process-global state is restored afterwards, so that tests stay independent (an xdist
  worker runs many): absl's flags (the command modules' own, and any a test imported, are
  put back as they were), the command modules in sys.modules, Ctrl-C's handler, logging
  levels and handlers, and jax_log_compiles (train.debug_recompiles). What cannot be undone
  is not done: `hardware.keep_freed_host_memory` (glibc's malloc settings) is a no-op here,
  and `cli._exit_abruptly` (os._exit) raises instead of ending the test run.
  """
  import jax
  from absl import flags, logging as absl_logging
  import minigpt_jax
  from minigpt_jax import cli, hardware

  name = module.rpartition(".")[2]
  assert module == f"minigpt_jax.{name}" and name in COMMANDS, module
  FLAGS = flags.FLAGS
  saved_flags = _command_flags(FLAGS)
  saved_modules = {m: sys.modules.pop(f"minigpt_jax.{m}") for m in COMMANDS
                   if f"minigpt_jax.{m}" in sys.modules}
  saved_attrs = {m: minigpt_jax.__dict__.pop(m) for m in COMMANDS if m in minigpt_jax.__dict__}
  for flag_name in saved_flags:
    delattr(FLAGS, flag_name)
  saved_argv, saved_sigint = sys.argv, signal.getsignal(signal.SIGINT)
  saved_log_compiles = jax.config.jax_log_compiles
  saved_verbosity = absl_logging.get_verbosity()
  root, absl_logger = logging.getLogger(), logging.getLogger("absl")
  saved_levels = root.level, absl_logger.level
  saved_root_handlers = list(root.handlers)
  absl_handler = absl_logging.get_absl_handler()
  saved_keep, saved_exit = hardware.keep_freed_host_memory, cli._exit_abruptly

  def no_abrupt_exit(message="interrupted", status=130):
    if isinstance(sys.exc_info()[1], KeyboardInterrupt):
      raise KeyboardInterrupt  # a real Ctrl-C of the test run
    raise AssertionError(f"the command would end its process ({status}): {message}")

  out, err = io.StringIO(), io.StringIO()
  status = None
  try:
    hardware.keep_freed_host_memory = lambda: False
    cli._exit_abruptly = no_abrupt_exit
    if absl_handler not in root.handlers:  # as absl's app.run installs it in a fresh process
      root.addHandler(absl_handler)
    saved_stream = absl_handler.python_handler.setStream(err)
    try:
      with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
          warnings.catch_warnings():
        # ml_collections loads a config file with load_module(), which Python deprecates: a
        # warning that only shows where pytest turns DeprecationWarnings on.
        warnings.filterwarnings("ignore", r"the load_module\(\) method is deprecated",
                                DeprecationWarning)
        sys.argv = [module, *args]  # runpy makes argv[0] the module's file, as python -m
        try:
          runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as e:
          status = e.code
        else:
          raise AssertionError(f"{module} returned instead of ending in SystemExit")
    finally:
      absl_handler.python_handler.setStream(saved_stream)
  finally:
    sys.argv = saved_argv
    signal.signal(signal.SIGINT, saved_sigint)
    jax.config.update("jax_log_compiles", saved_log_compiles)
    hardware.keep_freed_host_memory, cli._exit_abruptly = saved_keep, saved_exit
    absl_logging.set_verbosity(saved_verbosity)
    root.handlers[:] = saved_root_handlers
    root.setLevel(saved_levels[0])
    absl_logger.setLevel(saved_levels[1])
    for flag_name in _command_flags(FLAGS):
      delattr(FLAGS, flag_name)
    for flag_name, (defined_by, flag) in saved_flags.items():
      FLAGS[flag_name] = flag
      if defined_by:
        FLAGS.register_flag_by_module(defined_by, flag)
    for m in COMMANDS:
      sys.modules.pop(f"minigpt_jax.{m}", None)
      minigpt_jax.__dict__.pop(m, None)
    sys.modules.update((f"minigpt_jax.{m}", mod) for m, mod in saved_modules.items())
    minigpt_jax.__dict__.update(saved_attrs)
  if isinstance(status, str):  # as the interpreter reports sys.exit("message")
    print(status, file=err)
    status = 1
  return subprocess.CompletedProcess([module, *args], status or 0, out.getvalue(),
                                     err.getvalue())


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
