"""Printing samples as they are produced (`sample --stream`), and interactive completion
(`sample --interactive`): read a prompt, stream its continuation, ask again.

A prompt is one line; a line ending in a backslash continues on the next (the backslash
becomes a newline), so `def f():\\` then an empty line sends "def f():\\n". An empty first
line or the end of input (Ctrl-D) ends the loop. The `>>> ` and `... ` prompt strings are
shown only when stdin is a terminal; piped, each answer is printed as `sample` prints one,
prompt then continuation, so the output stays clean for scripts.
"""

import sys
from typing import Callable, Iterable, Optional, TextIO

from minigpt_jax import generate, streaming
from minigpt_jax.errors import UserError


def write_stream(pieces: Iterable[tuple[int, str]], rows: list[str], num_samples: int,
                 out: TextIO = sys.stdout) -> list[str]:
  """Prints `streaming.stream_text`'s pieces as `sample` prints whole texts: a header per row
  when there are several, the row's prompt (`rows`), its text, a newline. Nothing is printed
  before the first piece, so a prompt the model cannot take prints nothing.

  Returns the texts."""
  texts = []
  for row, piece in pieces:
    if row == len(texts):  # the first piece of the next row
      if texts:
        out.write("\n")
      if len(rows) > 1:
        out.write(f"=== prompt {row // num_samples}, sample {row % num_samples} ===\n")
      out.write(rows[row])
      texts.append("")
    texts[row] += piece
    out.write(piece)
    out.flush()
  if texts:
    out.write("\n")
    out.flush()
  return texts


def read_prompt(read_line: Callable[[str], str], tty: bool) -> Optional[str]:
  """The next prompt from `read_line` (like `input`), or None at the end of input or for an
  empty first line. Lines ending in a backslash continue the prompt."""
  lines = []
  while True:
    try:
      line = read_line(("... " if lines else ">>> ") if tty else "")
    except EOFError:  # mid-prompt too: what was read is dropped, as the user ended the input
      return None
    if not lines and not line:
      return None
    if not line.endswith("\\"):
      return "\n".join([*lines, line])
    lines.append(line[:-1])


def loop(run, *, max_new_tokens: int, sampling: generate.SamplingConfig, seed: int,
         stop_at_eos: bool, read_line: Callable[[str], str] = input, tty: bool = False,
         out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
  """Answers prompts from `read_line` until it ends; returns how many were answered.

  Every prompt is padded to the same slots (all that `max_new_tokens` leave in the context),
  so prompts of any length share one compile of prefill and decode. A prompt the model
  cannot take prints `error: ...` to `err`, and the loop asks again.
  """
  cfg = run.model_cfg
  slots = cfg.context_len - max_new_tokens
  if slots < 2:  # the start marker and at least one character
    raise UserError(f"--max_new_tokens {max_new_tokens} leaves no room for a prompt in the "
                    f"context of {cfg.context_len}; lower it")
  params = generate.compute_params(run.params, cfg)  # once, not per prompt
  answered = 0
  while (prompt := read_prompt(read_line, tty)) is not None:
    pieces = streaming.stream_text(params, cfg, run.tokenizer, [prompt],
                                  max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                                  stop_at_eos=stop_at_eos, fill_context=True)
    try:  # at a terminal the prompt is on the screen already: print only the continuation
      write_stream(pieces, ["" if tty else prompt], 1, out)
    except UserError as e:
      print(f"error: {e}", file=err, flush=True)
      continue
    answered += 1
  return answered
