"""Training curves of a run as one PNG:

  python -m minigpt_jax.plot checkpoints/small [--out curves.png]

Needs matplotlib: pip install -e .[plot]
"""

import pathlib

from absl import flags

from minigpt_jax import cli

_OUT = flags.DEFINE_string("out", None, "PNG path (default: <run>/curves.png).")


def main(args):
  out = cli.check_output_path(_OUT.value or pathlib.Path(args[0]) / "curves.png", "--out")
  from minigpt_jax import curves
  print(f"wrote {curves.plot_run(args[0], out)}")


if __name__ == "__main__":
  cli.run(main, positional="RUN_DIR")
