"""Train or resume a run: python -m minigpt_jax.train --config configs/small.py [--config.train.steps=N]"""

from absl import flags
from ml_collections import config_flags

from minigpt_jax.config import load as load_config
from minigpt_jax.errors import UserError, run_cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/small.py; override fields with --config.a.b=value.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where runs live (overrides config.workdir).")
_RUN_NAME = flags.DEFINE_string("run_name", None, "Run directory name (overrides config.run_name).")


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = load_config(_CONFIG)
  with config.unlocked():
    if _WORKDIR.value:
      config.workdir = _WORKDIR.value
    if _RUN_NAME.value:
      config.run_name = _RUN_NAME.value
  from minigpt_jax.training import train  # after flag parsing: --help stays fast
  train(config)


if __name__ == "__main__":
  run_cli(main)
