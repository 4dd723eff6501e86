"""Fine-tunes the quick-start model (configs/small.py) on a folder of your own code: a new run
that starts from the small run's parameters, with a fresh optimizer and a short schedule.

  python -m minigpt_jax.train --config configs/finetune.py \
      --config.init_from=checkpoints/small --config.data.roots="('~/my_project',)"
"""

from configs import small


def get_config():
  c = small.get_config()  # the model section must stay small's: the checkpoint's shapes
  c.run_name = "finetune"  # a run of its own: the source run is only read
  c.init_from = "checkpoints/small"  # where the quick-start run lands; any run directory
  c.data.name = "finetune"  # not small's "stdlib": that prepared corpus stays as it is
  c.data.roots = ("minigpt_jax",)  # this repository's own code; point it at yours
  c.data.val_fraction = 0.2  # a small folder: hold out more files so val holds a window
  c.train.steps = 300  # a few minutes on a CPU
  c.train.lr = 5e-4  # a tenth of small's: adapt the model, do not retrain it
  c.train.warmup_steps = 20
  c.train.eval_every = 100  # a short run: see the held-out loss move
  c.train.ckpt_every = 100
  return c
