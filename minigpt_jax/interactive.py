"""Printing samples as they are produced (`sample --stream`), and interactive completion
(`sample --interactive`): read a prompt, stream its continuation, ask again.

A prompt is one line; a line ending in a backslash continues on the next (the backslash
becomes a newline), so `def f():\\` then an empty line sends "def f():\\n". An empty first
line or the end of input (Ctrl-D) ends the loop. The `>>> ` and `... ` prompt strings are
shown only when stdin is a terminal; piped, each answer is printed as `sample` prints one,
prompt then continuation, so the output stays clean for scripts.
"""

import sys
from collections.abc import Iterator
from typing import Callable, Iterable, Optional, TextIO

from minigpt_jax import generate
from minigpt_jax.errors import UserError
from minigpt_jax.model import ModelConfig
from minigpt_jax.tokenizer import EOS_ID, CharTokenizer

# Tokens per decode call when streaming: shorter chunks show text sooner but cost speed
# (BENCHMARKS.md).
STREAM_CHUNK = 16


def stream_text(params, cfg: ModelConfig, tok: CharTokenizer, prompts: list[str], *,
                max_new_tokens: int, sampling: generate.SamplingConfig, seed: int = 0,
                stop_at_eos: bool = True, fill_context: bool = False,
                chunk: int = STREAM_CHUNK) -> Iterator[tuple[int, str]]:
  """`generate.generate_text` as it is produced (the same decode, `chunk` tokens at a
  time): yields (row, piece), rows in order and each at least once, whose pieces add up to
  the row's text.

  The rows decode together, so a row's pieces come once the rows before it have ended (at
  `<eos>`, or at the last token): the first row streams, the others follow.
  """
  pieces, ended, row = [[] for _ in prompts], [False] * len(prompts), 0
  for new_BC in generate.decode(params, cfg, [tok.encode(p) for p in prompts],
                                max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                                stop_at_eos=stop_at_eos, chunk=chunk,
                                fill_context=fill_context):
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


def write_stream(pieces: Iterable[tuple[int, str]], rows: list[str], num_samples: int,
                 out: Optional[TextIO] = None) -> list[str]:
  """Prints `stream_text`'s pieces as `sample` prints whole texts: a header per row
  when there are several, the row's prompt (`rows`), its text, a newline. Nothing is printed
  before the first piece, so a prompt the model cannot take prints nothing.

  Returns the texts. `out`: default, the `sys.stdout` of the call (a redirect counts)."""
  out, texts = out or sys.stdout, []
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
  empty first line. Lines ending in a backslash continue the prompt; a line's one trailing
  carriage return (CRLF input) is dropped."""
  lines = []
  while True:
    try:
      line = read_line(("... " if lines else ">>> ") if tty else "")
    except EOFError:  # mid-prompt too: what was read is dropped, as the user ended the input
      return None
    line = line[:-1] if line.endswith("\r") else line  # a CRLF line (a Windows paste or file)
    if not lines and not line:
      return None
    if not line.endswith("\\"):
      return "\n".join([*lines, line])
    lines.append(line[:-1])


def loop(run, *, max_new_tokens: int, sampling: generate.SamplingConfig, seed: int,
         stop_at_eos: bool, read_line: Callable[[str], str] = input, tty: bool = False,
         out: Optional[TextIO] = None, err: Optional[TextIO] = None) -> int:
  """Answers prompts from `read_line` until it ends; returns how many were answered.

  When the whole continuation fits the context, every prompt is padded to the slots
  `max_new_tokens` leave, so prompts of any length share one compile of prefill and decode.
  A prompt the model cannot take prints `error: ...` to `err`, and the loop asks again.
  """
  out, err = out or sys.stdout, err or sys.stderr  # at the call, so redirects count
  cfg = run.model_cfg
  params = generate.compute_params(run.params, cfg)  # once, not per prompt
  answered = 0
  while (prompt := read_prompt(read_line, tty)) is not None:
    pieces = stream_text(params, cfg, run.tokenizer, [prompt], max_new_tokens=max_new_tokens,
                         sampling=sampling, seed=seed, stop_at_eos=stop_at_eos,
                         fill_context=True)
    try:  # at a terminal the prompt is on the screen already: print only the continuation
      write_stream(pieces, ["" if tty else prompt], 1, out)
    except UserError as e:
      print(f"error: {e}", file=err, flush=True)
      continue
    answered += 1
  return answered
