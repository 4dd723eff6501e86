"""A ~0.8M-parameter model that learns Python-like text in ~5 minutes on a 2-core CPU."""

from minigpt_jax.config import base_config


def get_config():
  c = base_config()
  c.run_name = "small"
  c.data.name = "stdlib"
  c.data.roots = ("stdlib",)
  c.model.context_len = 128
  c.model.d_model = 128
  c.model.n_layers = 4
  c.model.n_heads = 4
  c.model.d_ff = 512
  c.model.vocab_pad_multiple = 1
  c.train.steps = 1800  # BENCHMARKS.md has the trials behind these four settings
  c.train.batch_size = 32
  c.train.lr = 5e-3
  c.train.warmup_steps = 100
  c.train.b2 = 0.99
  c.train.log_every = 25
  c.train.eval_every = 300
  c.train.eval_batches = 8
  c.train.ckpt_every = 300
  c.sample.max_new_tokens = 600  # several top-level statements; the context holds 128
  return c
