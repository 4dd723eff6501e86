"""Streaming samples (`sample --stream`) and interactive completion (`sample --interactive`)."""

import io
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import REPO, model_config, ok, one_line_error, run_command, tiny_flags
from minigpt_jax import generate, interactive, runs
from minigpt_jax.generate import SamplingConfig
from minigpt_jax.model import init_params
from minigpt_jax.tokenizer import EOS_ID, PAD_ID, CharTokenizer

CFG = model_config(context_len=64)
PARAMS = init_params(CFG, jax.random.key(0))
GREEDY = SamplingConfig(greedy=True)
SAMPLED = SamplingConfig(temperature=1.5, top_k=20)
tok = CharTokenizer()
RUN = runs.LoadedRun(PARAMS, CFG, tok, None, 0, None)  # random weights: fast, no training


def _prompts(*lens):
  return [np.asarray(jax.random.randint(jax.random.key(n), (n,), 2, 99)) for n in lens]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, corpus_dir):
  """A tiny run trained by the CLI, as in test_cli.py; the tests below only read it."""
  tmp = tmp_path_factory.mktemp("stream")
  ok(run_command("minigpt_jax.train", *tiny_flags(tmp, corpus_dir)))
  return tmp / "runs" / "tiny"


@pytest.fixture
def in_process(monkeypatch):
  """`run_command` for `sample --stream` / `--interactive`: their writers' default `out`
  and `err` are the sys.stdout / sys.stderr of when `interactive` was imported, not the
  command's captured ones; the writers are made to look them up at each call. Returns
  `run_sample(*args, stdin_text=None)`, which also feeds `stdin_text` as sys.stdin."""
  write_stream, loop = interactive.write_stream, interactive.loop
  monkeypatch.setattr(interactive, "write_stream",
                      lambda pieces, rows, num_samples, out=None:
                      write_stream(pieces, rows, num_samples, out or sys.stdout))
  monkeypatch.setattr(interactive, "loop", lambda run, *, out=None, err=None, **kw:
                      loop(run, out=out or sys.stdout, err=err or sys.stderr, **kw))

  def run_sample(*args, stdin_text=None):
    if stdin_text is None:
      return run_command("minigpt_jax.sample", *args)
    with monkeypatch.context() as m:
      m.setattr(sys, "stdin", io.StringIO(stdin_text))
      return run_command("minigpt_jax.sample", *args)
  return run_sample


def _sample_with_stdin(*args, stdin_text: str):
  """`python -m minigpt_jax.sample args...` in a fresh process, reading `stdin_text` from a
  pipe."""
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "minigpt_jax.sample", *args], cwd=REPO, env=env,
                        input=stdin_text, capture_output=True, text=True, timeout=240)


# --- the library: decode in chunks, and stream_text --------------------------------------------------

@pytest.mark.parametrize("sampling,stop_at_eos,segment,chunk", [
    (GREEDY, True, 8, 3), (SAMPLED, False, 8, 3), (GREEDY, False, 0, 16), (SAMPLED, True, 128, 5),
], ids=["greedy-stop-seg8", "sampled-nostop-seg8", "greedy-nostop-oneseg", "sampled-stop"])
def test_chunked_decode_equals_generate_tokens(sampling, stop_at_eos, segment, chunk):
  """Chunk by chunk, the same tokens as the one-call decode (cache growth included)."""
  prompts = _prompts(1, 7, 20)
  common = dict(max_new_tokens=20, sampling=sampling, seed=3, stop_at_eos=stop_at_eos)
  want_BG = generate.generate_tokens(PARAMS, CFG, prompts, segment=segment, **common)
  assert sampling.greedy or (want_BG == EOS_ID).any(axis=1).all()  # seed 3: every row ends
  chunks = list(generate.decode(PARAMS, CFG, prompts, segment=segment, chunk=chunk, **common))
  got_BG = np.concatenate(chunks, axis=1)
  assert all(c.shape[1] <= chunk for c in chunks[1:])
  np.testing.assert_array_equal(got_BG, want_BG[:, :got_BG.shape[1]])
  assert (want_BG[:, got_BG.shape[1]:] == PAD_ID).all()  # stopped early only once all ended


def test_streamed_long_samples_equal_plain_ones():
  """Past the context (window restarts at different steps for ragged rows), in chunks of
  5: the same tokens as the one-chunk-per-segment decode."""
  cfg = model_config(context_len=16)
  params = init_params(cfg, jax.random.key(2))
  common = dict(max_new_tokens=90, sampling=SAMPLED, seed=4, stop_at_eos=False)
  want_BG = generate.generate_tokens(params, cfg, _prompts(2, 9), **common)
  chunks = list(generate.decode(params, cfg, _prompts(2, 9), chunk=5, **common))
  np.testing.assert_array_equal(np.concatenate(chunks, 1), want_BG)
  assert max(c.shape[1] for c in chunks) == 5


def test_chunked_decode_stops_once_every_row_has_ended():
  # A model that always predicts <eos> (final features all ones, which only <eos> reads):
  # every row ends at token 0.
  ones_D = np.ones(CFG.d_model, np.float32)
  params = dict(PARAMS, ln_f={"scale": 0 * ones_D, "bias": ones_D},
                lm_head={"kernel": np.zeros((CFG.d_model, CFG.vocab_size), np.float32)})
  params["lm_head"]["kernel"][:, EOS_ID] = 1
  chunks = list(generate.decode(params, CFG, _prompts(3, 4), max_new_tokens=40,
                                sampling=GREEDY, chunk=4))
  assert chunks[0].tolist() == [[EOS_ID], [EOS_ID]]
  assert len(chunks) <= 2, "decoding should stop once every row has ended"


def test_stream_yields_before_decoding_ends(monkeypatch):
  """The first tokens come out while later chunks are still to be decoded."""
  calls = []
  real = generate.decode_scan
  monkeypatch.setattr(generate, "decode_scan", lambda *a, **k: calls.append(1) or real(*a, **k))
  stream = generate.decode(PARAMS, CFG, _prompts(4), max_new_tokens=40, sampling=GREEDY,
                           stop_at_eos=False, chunk=4)
  next(stream)
  next(stream)
  assert len(calls) <= 2  # one chunk being printed, at most one more dispatched
  rest = list(stream)
  assert len(calls) == 10 and len(rest) == 9  # 39 calls after token 0, 4 at a time


def test_stream_text_rows_in_order_add_up_to_generate_text():
  texts = ["def ", "class A:\n    x = ", "import o"]
  common = dict(max_new_tokens=25, sampling=SAMPLED, seed=2, stop_at_eos=True)
  want = generate.generate_text(PARAMS, CFG, tok, texts, **common)
  pieces = list(interactive.stream_text(PARAMS, CFG, tok, texts, **common))
  rows = [r for r, _ in pieces]
  assert rows == sorted(rows) and set(rows) == {0, 1, 2}  # every row, one after another
  assert ["".join(p for r, p in pieces if r == row) for row in range(3)] == want


def _compiles(caplog):
  return [r.getMessage().split(" with ")[0] for r in caplog.records
          if r.getMessage().startswith("Compiling")]


def test_streamed_generation_compiles_once_per_cache_size_and_chunk_length(caplog):
  """40 tokens in chunks of 4 over caches grown 16 slots at a time: one decode_scan compile
  per cache size and chunk length, not per chunk, and none the second time."""
  prompts = _prompts(5)
  run = lambda: list(generate.decode(PARAMS, CFG, prompts, max_new_tokens=40, sampling=GREEDY,
                                     stop_at_eos=False, chunk=4, segment=16))
  jax.clear_caches()  # earlier tests compiled some of these shapes
  with caplog.at_level(logging.WARNING), jax.log_compiles():
    run()
    first = _compiles(caplog)
    caplog.clear()
    run()
    second = _compiles(caplog)
  # prompt bucket 16: caches of 32, 48, 55 slots; 16 + 16 + 7 calls: chunks of 4, and one of 3
  assert generate.decode_plan(16, 39, 16, 4) == [(32, 4)] * 4 + [(48, 4)] * 4 + [(55, 4), (55, 3)]
  assert first.count("Compiling jit(decode_scan)") == 4, first
  assert second == [], second


# --- the interactive loop -----------------------------------------------------------------------

def _lines(*lines):
  """A `read_line` that returns `lines`, then EOF; it records the prompt strings it is shown."""
  shown, queue = [], list(lines)

  def read_line(prompt):
    shown.append(prompt)
    if not queue:
      raise EOFError
    return queue.pop(0)
  return read_line, shown


def test_read_prompt_continues_lines_ending_in_a_backslash():
  read_line, shown = _lines("def f(x):\\", "    return x\\", "", "next")
  assert interactive.read_prompt(read_line, tty=True) == "def f(x):\n    return x\n"
  assert shown == [">>> ", "... ", "... "]
  assert interactive.read_prompt(read_line, tty=False) == "next"
  assert shown[-1] == ""  # no prompt string when stdin is not a terminal
  assert interactive.read_prompt(read_line, tty=False) is None  # EOF


def test_interactive_errors_ask_again_and_empty_input_exits():
  read_line, _ = _lines("d\u00e9f", "x" * 64, "def ", "", "never read")
  out, err = io.StringIO(), io.StringIO()
  answered = interactive.loop(RUN, max_new_tokens=8, sampling=GREEDY, seed=0, stop_at_eos=False,
                              read_line=read_line, tty=False, out=out, err=err)
  assert answered == 1
  errors = err.getvalue().splitlines()
  assert len(errors) == 2 and all(e.startswith("error: ") for e in errors), errors
  assert "outside the vocabulary" in errors[0] and "does not fit the context" in errors[1]
  want = generate.generate_text(PARAMS, CFG, tok, ["def "], max_new_tokens=8, sampling=GREEDY,
                                stop_at_eos=False)[0]
  assert out.getvalue() == "def " + want + "\n"


def test_interactive_prompts_of_new_lengths_compile_nothing_new(caplog):
  marks = []
  # Buckets of 16, 32 and 44 slots (all that 20 new tokens leave in the 64 context).
  read_line, _ = _lines("d", "def function_name(x, y", "class Thing:\n  def method(self, value):")
  counting = lambda prompt: marks.append(len(_compiles(caplog))) or read_line(prompt)
  jax.clear_caches()  # earlier tests compiled some of these shapes
  with caplog.at_level(logging.WARNING), jax.log_compiles():
    interactive.loop(RUN, max_new_tokens=20, sampling=SAMPLED, seed=1, stop_at_eos=True,
                     read_line=counting, tty=False, out=io.StringIO(), err=io.StringIO())
  names = _compiles(caplog)
  assert {"Compiling jit(prefill)", "Compiling jit(decode_scan)"} <= set(names[marks[0]:marks[1]])
  assert names[marks[1]:] == [], names[marks[1]:]


# --- the sample command -------------------------------------------------------------------------

# (Stopping at <eos>, the default, is the sampled-several case's; greedy, the nostop one's.)
@pytest.mark.parametrize("args", [
    ["--greedy", "--nostop_at_eos", "--max_new_tokens", "90"],  # past the context of 32
    ["--seed", "7", "--top_k", "20", "--temperature", "1.5", "--nostop_at_eos"],
    ["--seed", "3", "--prompt", "class ", "--num_samples", "2", "--temperature", "1.5"],
], ids=["greedy-nostop", "sampled-nostop", "sampled-several"])
def test_sample_stream_prints_the_same_text(trained_run, in_process, args):
  common = ["--checkpoint", str(trained_run), "--prompt", "def ", "--max_new_tokens", "24", *args]
  plain = ok(in_process(*common))
  streamed = ok(in_process(*common, "--stream"))
  assert streamed.stdout == plain.stdout
  assert len(plain.stdout) > len("def \n")


def test_sample_interactive_with_piped_prompts(trained_run, in_process):
  good = ["def ", "class A:\n    ", "import"]
  lines = "def \nclass A:\\\n    \nnot \u00e9 ascii\nimport\n"
  proc = ok(in_process("--checkpoint", str(trained_run), "--interactive", "--greedy",
                       stdin_text=lines))
  errors = proc.stderr.strip().splitlines()
  assert [e for e in errors if e.startswith("error:")] == errors[:1], proc.stderr
  assert "outside the vocabulary" in errors[0]
  run = runs.load_for_inference(str(trained_run))
  max_new = max(1, run.model_cfg.context_len // 2)
  texts = [generate.generate_text(run.params, run.model_cfg, run.tokenizer, [p],
                                  max_new_tokens=max_new, sampling=GREEDY)[0] for p in good]
  assert proc.stdout == "".join(p + t + "\n" for p, t in zip(good, texts))
  assert ">>>" not in proc.stdout


@pytest.mark.parametrize("args,fragment", [
    (["--stream", "--json"], "--json"),
    (["--stream", "--no_cache"], "--no_cache"),
    (["--interactive", "--prompt", "x"], "--prompt"),
    (["--interactive", "--num_samples", "2"], "--num_samples"),
])
def test_sample_stream_and_interactive_refuse_what_they_cannot_do(trained_run, args, fragment):
  one_line_error(run_command("minigpt_jax.sample", "--checkpoint", str(trained_run), *args),
                 fragment)


def test_sample_interactive_exits_cleanly_at_eof(trained_run):
  """A real process reading a real (empty) pipe: exit status 0, nothing printed."""
  proc = ok(_sample_with_stdin("--checkpoint", str(trained_run), "--interactive", stdin_text=""))
  assert proc.stdout == "" and "error" not in proc.stderr
