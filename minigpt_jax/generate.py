"""Generation: prefill the KV cache with the prompt, then `lax.scan` decode loops.

Prompts are left-padded to a shared length P (a power-of-two bucket, so new
prompt lengths rarely retrace), so every row writes the same cache slot at
each decode step; `KVCache.start_B` masks each row's padding. The cache grows
in segments as tokens are added, so a decode step reads only the slots
allocated so far, not the whole context. The uncached
path (`generate_uncached`) reruns the full forward pass over the whole
buffer every step: it is the reference the cached path is tested against.
"""

import jax
import jax.numpy as jnp
import numpy as np

from minigpt_jax.errors import UserError
from minigpt_jax.model import KVCache, MiniGPT, ModelConfig
from minigpt_jax.sampling import SamplingConfig, sample
from minigpt_jax.tokenizer import EOS_ID, PAD_ID, CharTokenizer, room_after_prompt

MIN_BUCKET = 16
DECODE_SEGMENT = 128  # the decode cache grows by this many slots at a time


def next_token(key: jax.Array, t, logits_BV: jax.Array, done_B: jax.Array,
               sampling: SamplingConfig, stop_at_eos: bool):
  """Token t of each row (drawn with `fold_in(key, t)`), `<pad>` for rows already done.

  Both decode paths call this, so they pick alike. Returns (tokens [B], done [B])."""
  tok_B = sample(jax.random.fold_in(key, t), logits_BV, sampling)
  tok_B = jnp.where(done_B, PAD_ID, tok_B)
  if stop_at_eos:
    done_B = done_B | (tok_B == EOS_ID)
  return tok_B, done_B


def prefill(params, cfg: ModelConfig, tokens_BP: jax.Array, cache: KVCache):
  """Runs the prompts through the model once. Returns (last logits [B, V], filled cache)."""
  logits_BPV, cache = MiniGPT(cfg).apply({"params": params}, tokens_BP, cache=cache)
  return logits_BPV[:, -1], cache


def decode_segments(slots: int, forwards: int, segment: int) -> list[tuple[int, int]]:
  """Static plan of the decode loop: (cache slots, model calls) for each `lax.scan`.

  The cache starts with `slots` slots, all filled, and model call i writes slot
  `slots + i`. Each segment grows the cache to the next multiple of `segment`
  (the last one to exactly the slots needed), so a call attends over the slots
  allocated so far rather than over the whole context. `segment` <= 0: one scan.
  """
  plan, done, end = [], 0, slots + forwards
  while done < forwards:
    write = slots + done  # the slot the next call writes
    cap = min(end, -(-(write + 1) // segment) * segment) if segment > 0 else end
    plan.append((cap, cap - write))
    done += cap - write
  return plan


def decode(params, cfg: ModelConfig, cache: KVCache, logits_BV: jax.Array, key: jax.Array,
           steps: int, sampling: SamplingConfig, stop_at_eos: bool = True,
           segment: int = DECODE_SEGMENT):
  """Samples `steps` tokens after `logits_BV` (the prompt's last logits).

  Token 0 comes from `logits_BV`; each later token costs one model call on the token
  before it, so there are `steps - 1` calls, run as `lax.scan`s over the segments of
  `decode_segments` while the cache grows. Returns (tokens [B, steps], cache holding
  all but the last token). A row that has produced `<eos>` (with `stop_at_eos`)
  produces `<pad>` after it. Tokens are picked by `next_token`, as in `generate_uncached`.

  The segments are planned from the cache's slot count, taking it to be full, as
  `prefill` into `KVCache.init(cfg, B, P)` leaves it. A cache with free slots still gives
  the same tokens, but grows by `steps - 1` slots beyond its size all the same.
  """
  if steps < 1:
    raise ValueError(f"decode: steps must be >= 1, got {steps}")
  model = MiniGPT(cfg)
  pick = lambda t, logits_BV, done_B: next_token(key, t, logits_BV, done_B, sampling, stop_at_eos)

  def step(carry, t):
    cache, tok_B, done_B = carry
    logits_B1V, cache = model.apply({"params": params}, tok_B[:, None], cache=cache)
    tok_B, done_B = pick(t, logits_B1V[:, 0], done_B)
    return (cache, tok_B, done_B), tok_B

  tok_B, done_B = pick(0, logits_BV, jnp.zeros(logits_BV.shape[:1], bool))
  tokens = [tok_B[:, None]]
  t = 1
  for slots, calls in decode_segments(cache.slots, steps - 1, segment):
    carry = (cache.grow(slots), tok_B, done_B)
    (cache, tok_B, done_B), tokens_NB = jax.lax.scan(step, carry, jnp.arange(t, t + calls))
    tokens.append(tokens_NB.T)
    t += calls
  return jnp.concatenate(tokens, axis=1), cache


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
  _, tokens_NB = jax.lax.scan(step, (buffer_BS, done_B), jnp.arange(steps))
  return tokens_NB.T


prefill_jit = jax.jit(prefill, static_argnames=("cfg",), donate_argnames=("cache",))
# No donation for decode: it returns a larger cache than it is given, so the input's
# buffers could not hold the output anyway (the caller drops the prompt's cache).
decode_jit = jax.jit(
    decode, static_argnames=("cfg", "steps", "sampling", "stop_at_eos", "segment"))
generate_uncached_jit = jax.jit(
    generate_uncached, static_argnames=("cfg", "prompt_len", "sampling", "stop_at_eos"))


def bucket(n: int, limit: int) -> int:
  """The smallest power of two >= n (at least MIN_BUCKET), capped at `limit`."""
  b = MIN_BUCKET
  while b < n:
    b *= 2
  return max(n, min(b, limit))


def pad_prompts(prompts: list[np.ndarray], max_new_tokens: int, context_len: int):
  """Left-pads encoded prompts (each led by `<eos>`, the start-of-file marker).

  Returns (tokens [B, P] int32, start_B int32).
  Raises UserError if a prompt plus the new tokens would not fit the context.
  """
  if max_new_tokens < 1:
    raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  rows = [np.concatenate([[EOS_ID], np.asarray(p, np.int32)]) for p in prompts]
  longest = max(len(r) for r in rows)
  if max_new_tokens > room_after_prompt(longest - 1, context_len):
    raise UserError(
        f"prompt of {longest - 1} chars + max_new_tokens {max_new_tokens} exceed the context "
        f"length {context_len} (one slot holds the start marker); shorten the prompt or lower "
        "max_new_tokens")
  P = bucket(longest, context_len - max_new_tokens)
  tokens_BP = np.full((len(rows), P), PAD_ID, np.int32)
  start_B = np.array([P - len(r) for r in rows], np.int32)
  for row, (r, s) in enumerate(zip(rows, start_B)):
    tokens_BP[row, s:] = r
  return tokens_BP, start_B


def generate_tokens(params, cfg: ModelConfig, prompts: list[np.ndarray], *, max_new_tokens: int,
                    sampling: SamplingConfig, seed: int = 0, use_cache: bool = True,
                    stop_at_eos: bool = True, segment: int = DECODE_SEGMENT) -> np.ndarray:
  """Continues each encoded prompt. Returns new token ids [len(prompts), max_new_tokens].

  With the cache, the prompt fills a cache of exactly its P slots, which `decode` then
  grows `segment` slots at a time (0: straight to P + max_new_tokens - 1).
  """
  tokens_BP, start_B = pad_prompts(prompts, max_new_tokens, cfg.context_len)
  key = jax.random.key(seed)
  if cfg.dtype != jnp.float32:  # cast once, not in every decode step: half the weight reads
    params = jax.tree.map(lambda x: x.astype(cfg.dtype), params)
  B, P = tokens_BP.shape
  if use_cache:
    cache = KVCache.init(cfg, B, P, start_B)
    logits_BV, cache = prefill_jit(params, cfg, jnp.asarray(tokens_BP), cache)
    new_BN, _ = decode_jit(params, cfg, cache, logits_BV, key, max_new_tokens, sampling,
                           stop_at_eos, segment)
  else:
    buffer_BS = np.concatenate([tokens_BP, np.zeros((B, max_new_tokens), np.int32)], axis=1)
    new_BN = generate_uncached_jit(params, cfg, jnp.asarray(buffer_BS), jnp.asarray(start_B),
                                   key, P, sampling, stop_at_eos)
  return np.asarray(new_BN)


def generate_text(params, cfg: ModelConfig, tok: CharTokenizer, prompts: list[str], *,
                  max_new_tokens: int, sampling: SamplingConfig, seed: int = 0,
                  use_cache: bool = True, stop_at_eos: bool = True) -> list[str]:
  """Continues each prompt; returns the new text only (cut at `<eos>` with `stop_at_eos`)."""
  ids = [tok.encode(p) for p in prompts]
  new_BN = generate_tokens(params, cfg, ids, max_new_tokens=max_new_tokens, sampling=sampling,
                           seed=seed, use_cache=use_cache, stop_at_eos=stop_at_eos)
  return [tok.decode(row, stop_at_eos=stop_at_eos) for row in new_BN]
