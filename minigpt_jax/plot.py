"""Training curves of a run as one PNG:

  python -m minigpt_jax.plot checkpoints/small [--out curves.png]

Needs matplotlib: pip install -e .[plot]
"""

from absl import flags

from minigpt_jax import cli

_OUT = flags.DEFINE_string("out", None, "PNG path (default: <run>/curves.png).")


def main(args):
  from minigpt_jax import curves
  print(f"wrote {curves.plot_run(args[0], _OUT.value)}")


if __name__ == "__main__":
  cli.run(main, positional="RUN_DIR")
