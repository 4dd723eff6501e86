"""Train or resume a run: python -m minigpt_jax.train --config configs/small.py [--config.train.steps=N]"""

from absl import flags
from ml_collections import config_flags

from minigpt_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/small.py; override fields with --config.a.b=value.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where runs live (overrides config.workdir).")
_RUN_NAME = flags.DEFINE_string("run_name", None, "Run directory name (overrides config.run_name).")


def main(_):
  config = cli.load_config(_CONFIG)
  with config.unlocked():
    config.workdir = _WORKDIR.value or config.workdir
    config.run_name = _RUN_NAME.value or config.run_name
  from minigpt_jax.train_loop import train  # after flag parsing: --help stays fast
  train(config)


if __name__ == "__main__":
  cli.run(main)
