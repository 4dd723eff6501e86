"""Prompts as the model takes them: led by `<eos>` (the start-of-file marker) and
left-padded to a shared length, with the context arithmetic that decides what fits."""

import numpy as np

from minigpt_jax.errors import UserError
from minigpt_jax.tokenizer import EOS_ID, PAD_ID

MIN_BUCKET = 16


def room_after_prompt(prompt_len: int, context_len: int) -> int:
  """How many new tokens fit in the context after a prompt of `prompt_len` characters
  (the start marker takes one slot)."""
  return context_len - 1 - prompt_len


def fit_new_tokens(wanted: int, prompt_lens, context_len: int) -> int:
  """`wanted`, lowered (not below 1) so that it fits after the longest prompt."""
  return max(1, min(wanted, room_after_prompt(max(prompt_lens), context_len)))


def bucket(n: int, limit: int) -> int:
  """The smallest power of two >= n (at least MIN_BUCKET), capped at `limit`: prompts of
  new lengths then rarely compile a new prefill."""
  b = MIN_BUCKET
  while b < n:
    b *= 2
  return max(n, min(b, limit))


def pad_prompts(prompts: list[np.ndarray], max_new_tokens: int, context_len: int,
                fill_context: bool = False):
  """Left-pads encoded prompts, each led by `<eos>`, to a shared bucket length P (with
  `fill_context`: all the slots `max_new_tokens` leave, whatever the prompts' lengths).

  Returns (tokens_BP int32, start_B int32: the slot of each row's marker).
  Raises UserError if there is no prompt, or a prompt plus the new tokens would not fit.
  """
  if not prompts:
    raise UserError("no prompt to continue: give at least one")
  if max_new_tokens < 1:
    raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  rows = [np.concatenate([[EOS_ID], np.asarray(p, np.int32)]) for p in prompts]
  longest = max(len(r) for r in rows)
  if max_new_tokens > room_after_prompt(longest - 1, context_len):
    raise UserError(
        f"prompt of {longest - 1} chars + max_new_tokens {max_new_tokens} exceed the context "
        f"length {context_len} (one slot holds the start marker); shorten the prompt or lower "
        "max_new_tokens")
  limit = context_len - max_new_tokens
  P = limit if fill_context else bucket(longest, limit)
  tokens_BP = np.full((len(rows), P), PAD_ID, np.int32)
  start_B = np.array([P - len(r) for r in rows], np.int32)
  for row, (r, s) in enumerate(zip(rows, start_B)):
    tokens_BP[row, s:] = r
  return tokens_BP, start_B
