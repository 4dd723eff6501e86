"""A 25K-parameter model for tests: seconds on a CPU. Point data.roots at a folder."""

from minigpt_jax.config import base_config


def get_config():
  c = base_config()
  c.run_name = "tiny"
  c.data.name = "tiny"
  c.data.roots = ("stdlib",)
  c.data.max_chars = 200_000
  c.model.context_len = 32
  c.model.d_model = 32
  c.model.n_layers = 2
  c.model.n_heads = 2
  c.model.d_ff = 64
  c.model.vocab_pad_multiple = 1
  c.train.steps = 20
  c.train.batch_size = 8
  c.train.lr = 3e-3
  c.train.warmup_steps = 2
  c.train.log_every = 5
  c.train.eval_every = 10
  c.train.eval_batches = 2
  c.train.ckpt_every = 10
  c.sample.num_samples = 1
  c.sample.max_new_tokens = 16
  return c
