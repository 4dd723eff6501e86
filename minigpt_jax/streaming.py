"""Streaming: `generate`'s cached decode in chunks that the host prints as each ends.

The tokens are `generate.generate_tokens`' (the same cache plan, keys and picks); the
device decodes the next chunk while the host prints the last.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from minigpt_jax.generate import (DECODE_SEGMENT, SamplingConfig, compute_params, decode_segments,
                                  decode_step, next_token, prefill)
from minigpt_jax.model import KVCache, ModelConfig
from minigpt_jax.prompts import pad_prompts
from minigpt_jax.tokenizer import EOS_ID, PAD_ID, CharTokenizer

# Tokens per decode call: shorter chunks show text sooner but cost speed (BENCHMARKS.md).
STREAM_CHUNK = 16


def stream_text(params, cfg: ModelConfig, tok: CharTokenizer, prompts: list[str], *,
                max_new_tokens: int, sampling: SamplingConfig, seed: int = 0,
                stop_at_eos: bool = True, fill_context: bool = False) -> Iterator[tuple[int, str]]:
  """`generate_text` as it is produced: yields (row, piece), rows in order and each at least
  once, whose pieces add up to the row's text.

  The rows decode together, so a row's pieces come once the rows before it have ended (at
  `<eos>`, or at the last token): the first row streams, the others follow.
  """
  pieces, ended, row = [[] for _ in prompts], [False] * len(prompts), 0
  for new_BC in stream_tokens(params, cfg, [tok.encode(p) for p in prompts],
                              max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                              stop_at_eos=stop_at_eos, fill_context=fill_context):
    for r, new_C in enumerate(new_BC):
      if not ended[r]:
        pieces[r].append(tok.decode(new_C, stop_at_eos=stop_at_eos))
        ended[r] = stop_at_eos and EOS_ID in new_C
    row = yield from _rows_in_order(pieces, ended, row)
  yield from _rows_in_order(pieces, [True] * len(prompts), row)


def _rows_in_order(pieces: list[list[str]], ended: list[bool], row: int):
  """Yields (row, text so far) for `row` and the ended rows after it, emptying `pieces`;
  returns the first row that has not ended."""
  while row < len(ended):
    yield row, "".join(pieces[row])
    pieces[row].clear()
    if not ended[row]:
      break
    row += 1
  return row


def stream_tokens(params, cfg: ModelConfig, prompts: list[np.ndarray], *, max_new_tokens: int,
                  sampling: SamplingConfig, seed: int = 0, stop_at_eos: bool = True,
                  fill_context: bool = False, chunk: int = STREAM_CHUNK,
                  segment: int = DECODE_SEGMENT) -> Iterator[np.ndarray]:
  """`generate_tokens` (cached) as it is produced: yields new token ids [B, n], token 0
  first, then up to `chunk` at a time; the same tokens (cache plan, keys and picks). With
  `stop_at_eos` it stops once every row has produced `<eos>`: the rest would be `<pad>`.

  `fill_context` pads the prompts to all the slots the new tokens leave instead of their
  bucket, so that prompts of every length share one compile.
  """
  tokens_BP, start_B = pad_prompts(prompts, max_new_tokens, cfg.context_len, fill_context)
  params = compute_params(params, cfg)
  cache = KVCache.init(cfg, *tokens_BP.shape, start_B)
  logits_BV, cache = prefill(params, cfg, jnp.asarray(tokens_BP), cache)
  chunks = _decode_chunks(params, cfg, cache, logits_BV, jax.random.key(seed), max_new_tokens,
                          sampling, stop_at_eos, chunk, segment)
  for new, calls, done_B in _one_ahead(chunks):
    new = np.asarray(new)  # waits for this chunk only: the next is already dispatched
    yield new.reshape(len(new), -1)[:, :calls]
    if stop_at_eos and np.asarray(done_B).all():
      return


def _one_ahead(items):
  """Yields each item once the next has been made: the device decodes the next chunk while
  the host prints this one."""
  held = []
  for item in items:
    yield from held
    held = [item]
  yield from held


def _decode_chunks(params, cfg: ModelConfig, cache: KVCache, logits_BV: jax.Array,
                   key: jax.Array, steps: int, sampling: SamplingConfig, stop_at_eos: bool,
                   chunk: int, segment: int):
  """Dispatches `decode`'s plan `chunk` model calls at a time. Yields, per chunk, (its
  tokens on the device, [B] or [B, chunk]; how many are real; done [B])."""
  tok_B, done_B = first_token(key, logits_BV, sampling, stop_at_eos)
  yield tok_B, 1, done_B
  t = 1
  for slots, calls in decode_segments(cache.slots, steps - 1, segment):
    cache = cache.grow(slots)
    for n in [chunk] * (calls // chunk) + [calls % chunk] * (calls % chunk > 0):
      cache, tok_B, done_B, new_BC = decode_chunk(params, cfg, cache, tok_B, done_B, key, t, n,
                                                  sampling, stop_at_eos, chunk)
      yield new_BC, n, done_B
      t += n


@functools.partial(jax.jit, static_argnames=("sampling", "stop_at_eos"))
def first_token(key: jax.Array, logits_BV: jax.Array, sampling: SamplingConfig,
                stop_at_eos: bool):
  """Token 0 of each row, picked from the prompts' last logits as `decode` picks it."""
  return next_token(key, 0, logits_BV, jnp.zeros(logits_BV.shape[:1], bool), sampling,
                    stop_at_eos)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "stop_at_eos", "chunk"),
                   donate_argnames=("cache",))
def decode_chunk(params, cfg: ModelConfig, cache: KVCache, tok_B: jax.Array, done_B: jax.Array,
                 key: jax.Array, t, calls, sampling: SamplingConfig, stop_at_eos: bool,
                 chunk: int):
  """`decode`'s model calls for tokens t .. t + calls - 1 (calls <= chunk). `t` and `calls`
  are traced, so one compile serves every chunk on a cache of this size.

  Returns (cache, token t + calls - 1 [B], done [B], tokens [B, chunk]: the first `calls`).
  """
  step = decode_step(params, cfg, key, sampling, stop_at_eos)

  def body(i, state):
    carry, new_BC = state
    carry, tok_B = step(carry, t + i)
    return carry, new_BC.at[:, i].set(tok_B)

  new_BC = jnp.full((tok_B.shape[0], chunk), PAD_ID, jnp.int32)
  (cache, tok_B, done_B), new_BC = jax.lax.fori_loop(0, calls, body,
                                                     ((cache, tok_B, done_B), new_BC))
  return cache, tok_B, done_B, new_BC
