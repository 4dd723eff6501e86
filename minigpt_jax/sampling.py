"""Next-token choice from logits: small pure functions, composed by `sample`."""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to pick tokens. Hashable: it is a static argument of the jitted decode loop."""

  temperature: float = 1.0
  top_k: int = 0  # keep the k most likely tokens; 0 = off
  top_p: float = 1.0  # keep the smallest set with probability >= p; 1.0 = off
  greedy: bool = False  # argmax; the other fields are ignored

  def __post_init__(self):
    if not self.greedy and not self.temperature > 0:
      raise ValueError(f"temperature must be > 0 (use greedy for argmax), got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def top_k_filter(logits_BV: jax.Array, k: int) -> jax.Array:
  """Sets all but the k largest logits of each row to -inf (ties at the k-th are kept)."""
  if k <= 0 or k >= logits_BV.shape[-1]:
    return logits_BV
  kth_B1 = jax.lax.top_k(logits_BV, k)[0][..., -1:]
  return jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)


def top_p_filter(logits_BV: jax.Array, p: float) -> jax.Array:
  """Nucleus filter: keeps the most likely tokens whose probabilities first reach `p`."""
  if p >= 1.0:
    return logits_BV
  sorted_BV = jnp.sort(logits_BV, axis=-1)[..., ::-1]
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  keep_BV = mass_before_BV < p  # the first token is always kept
  cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)


def sample(key: jax.Array, logits_BV: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """One token id per row, int32 [B]."""
  if cfg.greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV.astype(jnp.float32) / cfg.temperature
  logits_BV = top_p_filter(top_k_filter(logits_BV, cfg.top_k), cfg.top_p)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)
