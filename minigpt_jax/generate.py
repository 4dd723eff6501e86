"""Generation, top to bottom: pad the prompts, prefill a KV cache with them, decode with
`lax.scan`s a chunk at a time, picking each token on the device. (`reference.py` holds the
uncached decode the cache is tested against.)

The window rule, which both follow: a row's model input is all of its tokens (start marker,
prompt, new tokens) while they fit the context; the token that would overflow it starts
the window anew from the row's last `keep` tokens, at positions 0.. (`window_len`). Each
row follows the rule on its own, so its text does not depend on the rest of the batch.

Prompts are left-padded to P slots (`prompts.pad_prompts`), so every row writes the same
cache slot at each step; `KVCache.start_B` masks each row's padding.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from minigpt_jax.errors import UserError
from minigpt_jax.model import KVCache, MiniGPT, ModelConfig
from minigpt_jax.prompts import left_pad, pad_prompts
from minigpt_jax.tokenizer import EOS_ID, PAD_ID, CharTokenizer

DECODE_SEGMENT = 128  # the decode cache grows by this many slots at a time
# Decode steps per iteration of the compiled scan loop. XLA:GPU drives a scan from the host,
# one round trip per iteration (jax-ml/jax#2491), so unrolling may pay there; on the CPU,
# 4 measured within noise of 1 (BENCHMARKS.md). `bench --decode_unroll` measures it.
DECODE_UNROLL = 1
# A full window restarts from its last KEEP_FRACTION of the context (BENCHMARKS.md: the
# bits/char of the characters after a restart, and the decode speed, against the fraction).
KEEP_FRACTION = 0.5


def window_keep(context_len: int, keep: int | None = None) -> int:
  """Tokens a full window keeps when it starts anew: `keep`, checked, or the default."""
  keep = max(1, round(context_len * KEEP_FRACTION)) if keep is None else keep
  if not 1 <= keep <= max(1, context_len - 1):  # a full window must shrink to grow again
    raise ValueError(f"keep must be in [1, {max(1, context_len - 1)}], got {keep}")
  return keep


def window_len(n_B, context_len: int, keep: int, xp=np):
  """Of a row's n tokens so far, how many (the most recent) the model sees: all of them
  up to the context, then windows that restart at `keep` tokens and grow to the context."""
  over_B = n_B - context_len - 1
  return xp.where(over_B < 0, n_B, keep + over_B % (context_len - keep + 1))


def generate_text(params, cfg: ModelConfig, tok: CharTokenizer, prompts: list[str], *,
                  stop_at_eos: bool = True, use_cache: bool = True, **options) -> list[str]:
  """Continues each prompt; returns the new text only (cut at `<eos>` with `stop_at_eos`).
  `options`: `decode`'s, or with `use_cache=False` the uncached reference's."""
  from minigpt_jax import reference  # which imports this module
  tokens_fn = generate_tokens if use_cache else reference.generate_tokens
  new_BG = tokens_fn(params, cfg, [tok.encode(p) for p in prompts], stop_at_eos=stop_at_eos,
                     **options)
  return [tok.decode(row, stop_at_eos=stop_at_eos) for row in new_BG]


def generate_tokens(params, cfg: ModelConfig, prompts: list[np.ndarray], *, max_new_tokens: int,
                    **options) -> np.ndarray:
  """Continues each encoded prompt (`options`: `decode`'s). Returns new token ids
  [len(prompts), max_new_tokens]; a row that has ended is `<pad>` after its `<eos>`."""
  chunks = list(decode(params, cfg, prompts, max_new_tokens=max_new_tokens, **options))
  new_BG = np.concatenate(chunks, axis=1)  # shorter if every row ended early
  return np.pad(new_BG, [(0, 0), (0, max_new_tokens - new_BG.shape[1])], constant_values=PAD_ID)


def compute_params(params, cfg: ModelConfig):
  """`params` in the compute dtype: cast once, not in every decode step (half the weight
  reads under 16-bit compute)."""
  return jax.tree.map(lambda x: x.astype(cfg.dtype), params)

# --- the cached path: prefill, then decode -------------------------------------------------------

def decode(params, cfg: ModelConfig, prompts: list[np.ndarray], *, max_new_tokens: int,
           sampling: SamplingConfig, seed: int = 0, stop_at_eos: bool = True,
           keep: int | None = None, chunk: int = 0, segment: int = DECODE_SEGMENT,
           unroll: int = DECODE_UNROLL, fill_context: bool = False) -> Iterator[np.ndarray]:
  """The one decode loop, for plain, streamed and interactive output. Yields each row's
  new tokens [B, n] as they are made: each pass's first token alone (from its prefill),
  then up to `chunk` at a time (0: a cache segment at a time); `max_new_tokens` in all, or
  fewer once every row has ended (`stop_at_eos`). `fill_context`: see `pad_prompts`."""
  tokens_BP, start_B = pad_prompts(prompts, max_new_tokens, cfg.context_len, fill_context)
  chunks = _decode_passes(compute_params(params, cfg), cfg, tokens_BP, start_B,
                          jax.random.key(seed), max_new_tokens, sampling, stop_at_eos,
                          window_keep(cfg.context_len, keep), chunk, segment, unroll)
  for new_BC, done_B in _one_ahead(chunks):
    yield np.asarray(new_BC)  # waits for this chunk only: the next is already dispatched
    if stop_at_eos and np.asarray(done_B).all():
      return


def _decode_passes(params, cfg: ModelConfig, tokens_BP: np.ndarray, start_B: np.ndarray,
                   key: jax.Array, steps: int, sampling: SamplingConfig, stop_at_eos: bool,
                   keep: int, chunk: int, segment: int, unroll: int):
  """Dispatches `decode`'s work; yields (tokens on the device [B, n], done [B]) per chunk.
  Each pass prefills the rows' windows and decodes until the fullest holds the context;
  the next lays out every row's window anew by the window rule."""
  done_B, t = jnp.zeros(len(start_B), bool), 0
  rows = [r[s:] for r, s in zip(tokens_BP, start_B)]  # each row's tokens so far
  lens_B = np.array([len(r) for r in rows])  # of which the window holds the last lens_B
  while True:
    cache = KVCache.init(cfg, *tokens_BP.shape, start_B)
    cache, tok_B, done_B = prefill(params, cfg, jnp.asarray(tokens_BP), cache, key, t, done_B,
                                   sampling, stop_at_eos)
    made = [tok_B[:, None]]
    yield made[-1], done_B
    # Model calls until the fullest window holds the whole context (or the sample ends).
    calls = int(min(steps - t - 1, cfg.context_len - lens_B.max()))
    t += 1
    for slots, n in decode_plan(cache.slots, calls, segment, chunk):
      cache, tok_B, done_B, new_BC = decode_scan(params, cfg, cache.grow(slots), tok_B, done_B,
                                                 key, t, n, sampling, stop_at_eos, unroll)
      made.append(new_BC)
      yield new_BC, done_B
      t += n
    if t == steps:
      return
    pass_BG = np.asarray(jnp.concatenate(made, axis=1))
    rows = [np.concatenate([r, new]) for r, new in zip(rows, pass_BG)]
    lens_B = window_len(np.array([len(r) for r in rows]), cfg.context_len, keep)
    tokens_BP, start_B = left_pad([r[len(r) - n:] for r, n in zip(rows, lens_B)], lens_B.max())


def _one_ahead(items):
  """Yields each item once the next has been made: the device decodes the next chunk while
  the host prints this one."""
  held = []
  for item in items:
    yield from held
    held = [item]
  yield from held


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "stop_at_eos"),
                   donate_argnames=("cache",))
def prefill(params, cfg: ModelConfig, tokens_BP: jax.Array, cache: KVCache, key: jax.Array, t,
            done_B: jax.Array, sampling: SamplingConfig, stop_at_eos: bool):
  """Runs the prompts through the model once and picks token t from the last logits.
  Returns (filled cache, tokens [B], done [B])."""
  logits_BPV, cache = MiniGPT(cfg).apply({"params": params}, tokens_BP, cache=cache)
  return cache, *next_token(key, t, logits_BPV[:, -1], done_B, sampling, stop_at_eos)


def decode_plan(slots: int, calls: int, segment: int, chunk: int = 0) -> list[tuple[int, int]]:
  """The decode loop's scans, as (cache slots, model calls); model call i writes slot
  `slots + i`. The cache grows to the next multiple of `segment` at a time (the last time
  to what it needs; `segment` <= 0: one size), so early calls attend over a short cache.
  Each size's calls run as scans of `chunk` (0: one scan), the remainder last."""
  end = slots + calls
  caps = [*range((slots // segment + 1) * segment, end, segment), end] if segment > 0 else [end]
  plan = []
  for prev, cap in zip([slots, *caps], caps):
    n = cap - prev
    sizes = [chunk] * (n // chunk) + [n % chunk] * (n % chunk > 0) if chunk else [n]
    plan += [(cap, size) for size in sizes]
  return plan if calls else []


@functools.partial(jax.jit, static_argnames=("cfg", "steps", "sampling", "stop_at_eos",
                                             "unroll"), donate_argnames=("cache",))
def decode_scan(params, cfg: ModelConfig, cache: KVCache, tok_B: jax.Array, done_B: jax.Array,
                key: jax.Array, t, steps: int, sampling: SamplingConfig, stop_at_eos: bool,
                unroll: int = DECODE_UNROLL):
  """`steps` model calls, each on the token before it, picking tokens t .. t + steps - 1
  (`t` is traced: one compile per chunk length and cache size). Returns (cache, the last
  token [B], done [B], the tokens [B, steps])."""
  model = MiniGPT(cfg)

  def step(carry, t):
    cache, tok_B, done_B = carry
    logits_B1V, cache = model.apply({"params": params}, tok_B[:, None], cache=cache)
    tok_B, done_B = next_token(key, t, logits_B1V[:, 0], done_B, sampling, stop_at_eos)
    return (cache, tok_B, done_B), tok_B

  (cache, tok_B, done_B), tokens_CB = jax.lax.scan(step, (cache, tok_B, done_B),
                                                   t + jnp.arange(steps), unroll=unroll)
  return cache, tok_B, done_B, tokens_CB.T


# --- picking tokens ------------------------------------------------------------------------------

def next_token(key: jax.Array, t, logits_BV: jax.Array, done_B: jax.Array,
               sampling: SamplingConfig, stop_at_eos: bool):
  """Token t of each row (drawn with `fold_in(key, t)`), `<pad>` for rows already done
  (at `<eos>`, with `stop_at_eos`); both decode paths pick here. Returns (tokens, done)."""
  tok_B = jnp.where(done_B, PAD_ID, sample(jax.random.fold_in(key, t), logits_BV, sampling))
  if stop_at_eos:
    done_B = done_B | (tok_B == EOS_ID)
  return tok_B, done_B


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to pick tokens (hashable: a static argument of the jitted decode). The defaults
  are the plain softmax; what users get by default is `config.sample`."""

  temperature: float = 1.0
  top_k: int = 0  # keep the k most likely tokens; 0 = off
  top_p: float = 1.0  # keep the smallest set with probability >= p; 1.0 = off
  greedy: bool = False  # argmax; the other fields are ignored

  def __post_init__(self):  # where every sampling setting is checked (flags, config)
    if not self.greedy and not self.temperature > 0:
      raise UserError(f"temperature must be > 0, got {self.temperature}")
    if self.top_k < 0:
      raise UserError(f"top_k must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise UserError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(key: jax.Array, logits_BV: jax.Array, sampling: SamplingConfig) -> jax.Array:
  """One token id per row, int32 [B]: greedy, or a draw after temperature, top-k, top-p."""
  if sampling.greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV.astype(jnp.float32) / sampling.temperature
  logits_BV = top_p_filter(top_k_filter(logits_BV, sampling.top_k), sampling.top_p)
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
