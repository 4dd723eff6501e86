"""Prompts as the model takes them: led by `<eos>` (the start-of-file marker) and
left-padded to a shared length."""

import numpy as np

from minigpt_jax.errors import UserError
from minigpt_jax.tokenizer import EOS_ID, PAD_ID

MIN_BUCKET = 16


def bucket(n: int, limit: int) -> int:
  """The smallest power of two >= n (at least MIN_BUCKET), capped at `limit`: prompts of
  new lengths then rarely compile a new prefill."""
  return max(n, min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), limit))


def pad_prompts(prompts: list[np.ndarray], max_new_tokens: int, context_len: int,
                fill_context: bool = False):
  """Encoded prompts, each led by `<eos>`, left-padded to a shared bucket length P that
  leaves room for all `max_new_tokens` in the context where it can. `fill_context` pads to
  all the slots the new tokens leave, so that prompts of every length share one compile.
  Returns (tokens_BP int32, start_B int32: the slot of each row's marker)."""
  if not prompts:
    raise UserError("no prompt to continue: give at least one")
  if max_new_tokens < 1:
    raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  rows = [np.concatenate([[EOS_ID], np.asarray(p, np.int32)]) for p in prompts]
  longest = max(len(r) for r in rows)
  if longest > context_len:
    raise UserError(f"a prompt of {longest - 1} characters does not fit the context of "
                    f"{context_len} (one slot holds the start marker); shorten it")
  room = context_len - max_new_tokens  # prompt slots that leave a slot for every new token
  if fill_context and room >= longest:
    return left_pad(rows, room)
  return left_pad(rows, bucket(longest, max(room, longest)))


def left_pad(rows: list[np.ndarray], slots: int):
  """`rows` right-aligned in `slots` slots of `<pad>`. Returns (tokens [B, slots] int32,
  start_B int32: the slot of each row's first token)."""
  tokens_BP = np.full((len(rows), slots), PAD_ID, np.int32)
  start_B = np.array([slots - len(r) for r in rows], np.int32)
  for row, (r, s) in enumerate(zip(rows, start_B)):
    tokens_BP[row, s:] = r
  return tokens_BP, start_B
