"""Generation, top to bottom: pad the prompts, prefill the KV cache with them, decode
with `lax.scan`s, and pick each token from the logits; plus the uncached reference the
cache is tested against.

Prompts are left-padded to P slots (`prompts.pad_prompts`), so every row writes the same
cache slot at each step; `KVCache.start_B` masks each row's padding.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from minigpt_jax.model import KVCache, MiniGPT, ModelConfig
from minigpt_jax.prompts import pad_prompts
from minigpt_jax.tokenizer import EOS_ID, PAD_ID, CharTokenizer

DECODE_SEGMENT = 128  # the decode cache grows by this many slots at a time
# Decode steps per iteration of the compiled scan loop. XLA:GPU drives a scan from the host,
# one round trip per iteration (jax-ml/jax#2491), so unrolling may pay there; on the CPU,
# 4 measured within noise of 1 (BENCHMARKS.md). `bench --decode_unroll` measures it.
DECODE_UNROLL = 1


def generate_text(params, cfg: ModelConfig, tok: CharTokenizer, prompts: list[str], *,
                  max_new_tokens: int, sampling: SamplingConfig, seed: int = 0,
                  use_cache: bool = True, stop_at_eos: bool = True) -> list[str]:
  """Continues each prompt; returns the new text only (cut at `<eos>` with `stop_at_eos`)."""
  ids = [tok.encode(p) for p in prompts]
  new_BG = generate_tokens(params, cfg, ids, max_new_tokens=max_new_tokens, sampling=sampling,
                           seed=seed, use_cache=use_cache, stop_at_eos=stop_at_eos)
  return [tok.decode(row, stop_at_eos=stop_at_eos) for row in new_BG]


def generate_tokens(params, cfg: ModelConfig, prompts: list[np.ndarray], *, max_new_tokens: int,
                    sampling: SamplingConfig, seed: int = 0, use_cache: bool = True,
                    stop_at_eos: bool = True, segment: int = DECODE_SEGMENT,
                    unroll: int = DECODE_UNROLL) -> np.ndarray:
  """Continues each encoded prompt. Returns new token ids [len(prompts), max_new_tokens].

  With the cache, the prompts fill a cache of exactly their P slots, which `decode` then
  grows `segment` slots at a time (0: straight to P + max_new_tokens - 1).
  """
  tokens_BP, start_B = pad_prompts(prompts, max_new_tokens, cfg.context_len)
  key = jax.random.key(seed)
  params = compute_params(params, cfg)
  B, P = tokens_BP.shape
  if use_cache:
    cache = KVCache.init(cfg, B, P, start_B)
    logits_BV, cache = prefill(params, cfg, jnp.asarray(tokens_BP), cache)
    new_BG, _ = decode(params, cfg, cache, logits_BV, key, max_new_tokens, sampling,
                           stop_at_eos, segment, unroll)
  else:
    buffer_BS = np.concatenate([tokens_BP, np.zeros((B, max_new_tokens), np.int32)], axis=1)
    new_BG = generate_uncached(params, cfg, jnp.asarray(buffer_BS), jnp.asarray(start_B),
                                   key, P, sampling, stop_at_eos)
  return np.asarray(new_BG)


def compute_params(params, cfg: ModelConfig):
  """`params` in the compute dtype: cast once, not in every decode step (half the weight
  reads under 16-bit compute)."""
  if cfg.dtype == jnp.float32:
    return params
  return jax.tree.map(lambda x: x.astype(cfg.dtype), params)

# --- the cached path: prefill, then decode -------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def prefill(params, cfg: ModelConfig, tokens_BP: jax.Array, cache: KVCache):
  """Runs the prompts through the model once. Returns (last logits [B, V], filled cache)."""
  logits_BPV, cache = MiniGPT(cfg).apply({"params": params}, tokens_BP, cache=cache)
  return logits_BPV[:, -1], cache


def decode_segments(slots: int, calls: int, segment: int) -> list[tuple[int, int]]:
  """The decode loop's plan: one `lax.scan` per segment, as (cache slots, model calls).

  Model call i writes slot `slots + i`. Each scan first grows the cache to the next
  multiple of `segment` (the last scan to exactly what it needs), so early calls attend
  over a short cache rather than the whole context. `segment` <= 0: one scan.
  """
  end = slots + calls
  caps = [end]
  if segment > 0:
    caps = [*range((slots // segment + 1) * segment, end, segment), end]
  return [(cap, cap - prev) for prev, cap in zip([slots, *caps], caps)] if calls else []


# No donation: decode returns a larger cache than it is given, so the input's buffers
# could not hold the output anyway (the caller drops the prompt's cache).
@functools.partial(jax.jit, static_argnames=("cfg", "steps", "sampling", "stop_at_eos",
                                             "segment", "unroll"))
def decode(params, cfg: ModelConfig, cache: KVCache, logits_BV: jax.Array, key: jax.Array,
           steps: int, sampling: SamplingConfig, stop_at_eos: bool = True,
           segment: int = DECODE_SEGMENT, unroll: int = DECODE_UNROLL):
  """Samples `steps` tokens after the prompts whose last logits are `logits_BV`.

  Token 0 comes from `logits_BV`; each later one costs one model call on the token before
  it, in the scans of `decode_segments` (planned for a full cache, as `prefill` leaves
  it). A row that has produced `<eos>` (with `stop_at_eos`) produces `<pad>` after it.
  Returns (tokens [B, G], the cache holding all but the last token).
  """
  if steps < 1:
    raise ValueError(f"decode: steps must be >= 1, got {steps}")
  step = decode_step(params, cfg, key, sampling, stop_at_eos)
  tok_B, done_B = next_token(key, 0, logits_BV, jnp.zeros(logits_BV.shape[:1], bool), sampling,
                             stop_at_eos)
  tokens = [tok_B[:, None]]
  t = 1
  for slots, calls in decode_segments(cache.slots, steps - 1, segment):
    carry = (cache.grow(slots), tok_B, done_B)
    (cache, tok_B, done_B), tokens_GB = jax.lax.scan(step, carry, jnp.arange(t, t + calls),
                                                     unroll=min(unroll, calls))
    tokens.append(tokens_GB.T)
    t += calls
  return jnp.concatenate(tokens, axis=1), cache


def decode_step(params, cfg: ModelConfig, key: jax.Array, sampling: SamplingConfig,
                stop_at_eos: bool):
  """The body of the decode loops: `step((cache, tokens [B], done [B]), t)` runs the model on
  each row's last token and picks token t. Returns (the new carry, token t [B])."""
  model = MiniGPT(cfg)

  def step(carry, t):
    cache, tok_B, done_B = carry
    logits_B1V, cache = model.apply({"params": params}, tok_B[:, None], cache=cache)
    tok_B, done_B = next_token(key, t, logits_B1V[:, 0], done_B, sampling, stop_at_eos)
    return (cache, tok_B, done_B), tok_B
  return step


# --- the uncached reference ----------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("cfg", "prompt_len", "sampling", "stop_at_eos"))
def generate_uncached(params, cfg: ModelConfig, buffer_BS: jax.Array, start_B: jax.Array,
                      key: jax.Array, prompt_len: int, sampling: SamplingConfig,
                      stop_at_eos: bool = True):
  """Reference decode: the full forward pass over the fixed-size buffer at every step.

  `buffer_BS` holds the left-padded prompts in its first `prompt_len` slots.
  Returns tokens [B, S - prompt_len].
  """
  model = MiniGPT(cfg)
  steps = buffer_BS.shape[1] - prompt_len

  def step(carry, t):
    buffer_BS, done_B = carry
    logits_BSV, _ = model.apply({"params": params}, buffer_BS, start_B=start_B)
    logits_BV = jax.lax.dynamic_index_in_dim(logits_BSV, prompt_len - 1 + t, 1, keepdims=False)
    tok_B, done_B = next_token(key, t, logits_BV, done_B, sampling, stop_at_eos)
    buffer_BS = jax.lax.dynamic_update_slice(buffer_BS, tok_B[:, None], (0, prompt_len + t))
    return (buffer_BS, done_B), tok_B

  done_B = jnp.zeros(buffer_BS.shape[:1], bool)
  _, tokens_GB = jax.lax.scan(step, (buffer_BS, done_B), jnp.arange(steps))
  return tokens_GB.T

# --- picking tokens ------------------------------------------------------------------------------

def next_token(key: jax.Array, t, logits_BV: jax.Array, done_B: jax.Array,
               sampling: SamplingConfig, stop_at_eos: bool):
  """Token t of each row (drawn with `fold_in(key, t)`), `<pad>` for rows already done.

  Both decode paths call this, so they pick alike. Returns (tokens [B], done [B])."""
  tok_B = sample(jax.random.fold_in(key, t), logits_BV, sampling)
  tok_B = jnp.where(done_B, PAD_ID, tok_B)
  if stop_at_eos:
    done_B = done_B | (tok_B == EOS_ID)
  return tok_B, done_B


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to pick tokens. Hashable: it is a static argument of the jitted decode loop.
  The defaults are the plain softmax; what users get by default is `config.sample`."""

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


def sample(key: jax.Array, logits_BV: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """One token id per row, int32 [B]: greedy, or a draw after temperature, top-k, top-p."""
  if cfg.greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV.astype(jnp.float32) / cfg.temperature
  logits_BV = top_p_filter(top_k_filter(logits_BV, cfg.top_k), cfg.top_p)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


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
