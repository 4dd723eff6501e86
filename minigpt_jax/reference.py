"""The uncached reference decode: at every step the full forward pass over each row's
window, as nanoGPT samples. The KV-cache decode of `generate.py` is tested against it
(same tokens, across window restarts too), and `sample --no_cache` runs it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from minigpt_jax.generate import (SamplingConfig, compute_params, next_token, window_keep,
                                  window_len)
from minigpt_jax.model import MiniGPT, ModelConfig
from minigpt_jax.prompts import pad_prompts
from minigpt_jax.tokenizer import PAD_ID


def generate_tokens(params, cfg: ModelConfig, prompts: list[np.ndarray], *, max_new_tokens: int,
                    sampling: SamplingConfig, seed: int = 0, stop_at_eos: bool = True,
                    keep: int | None = None) -> np.ndarray:
  """`generate.generate_tokens` without the cache: new token ids [len(prompts), max_new_tokens]."""
  tokens_BP, start_B = pad_prompts(prompts, max_new_tokens, cfg.context_len)
  return np.asarray(generate_uncached(
      compute_params(params, cfg), cfg, jnp.asarray(tokens_BP), jnp.asarray(start_B),
      jax.random.key(seed), max_new_tokens, window_keep(cfg.context_len, keep), sampling,
      stop_at_eos))


@functools.partial(jax.jit, static_argnames=("cfg", "steps", "keep", "sampling", "stop_at_eos"))
def generate_uncached(params, cfg: ModelConfig, tokens_BP: jax.Array, start_B: jax.Array,
                      key: jax.Array, steps: int, keep: int, sampling: SamplingConfig,
                      stop_at_eos: bool = True):
  """Reference decode: at every step, the full forward pass over each row's window (the
  window rule), right-aligned in `context_len` slots. Returns tokens [B, steps]."""
  model, C = MiniGPT(cfg), cfg.context_len
  B, P = tokens_BP.shape
  # Every row's tokens, after C slots of padding: the C slots before a row's next token
  # start at slot P + t.
  buffer_BS = jnp.concatenate([jnp.full((B, C), PAD_ID, jnp.int32), tokens_BP,
                               jnp.zeros((B, steps), jnp.int32)], axis=1)

  def step(carry, t):
    buffer_BS, done_B = carry
    window_BC = jax.lax.dynamic_slice_in_dim(buffer_BS, P + t, C, axis=1)
    lens_B = window_len(P - start_B + t, C, keep, jnp)
    logits_BCV, _ = model.apply({"params": params}, window_BC, start_B=C - lens_B)
    tok_B, done_B = next_token(key, t, logits_BCV[:, -1], done_B, sampling, stop_at_eos)
    buffer_BS = jax.lax.dynamic_update_slice(buffer_BS, tok_B[:, None], (0, C + P + t))
    return (buffer_BS, done_B), tok_B

  done_B = jnp.zeros((B,), bool)
  _, tokens_GB = jax.lax.scan(step, (buffer_BS, done_B), jnp.arange(steps))
  return tokens_GB.T
