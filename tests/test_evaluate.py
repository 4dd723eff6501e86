import ast
import json
import math
import random

import jax
import numpy as np
import pytest

from helpers import REPO, model_config, run_module, tiny_config_in
from minigpt_jax import curves, data, scoring, syntax, train_loop
from minigpt_jax.errors import UserError
from minigpt_jax.model import init_params
from minigpt_jax.tokenizer import EOS_ID, CharTokenizer

tok = CharTokenizer()
TIMING_KEYS = ("loss_seconds", "syntax_seconds")


# --- loss numbers -----------------------------------------------------------------------------

def test_uniform_model_scores_ln_vocab_nats_and_log2_vocab_bits():
  """A zero LM head predicts every character with probability 1/V: ln V nats, log2 V bits."""
  cfg = model_config(context_len=16, d_model=16, n_layers=1, n_heads=2, d_ff=32)
  params = init_params(cfg, jax.random.key(0))
  params = {**params, "lm_head": {"kernel": np.zeros_like(params["lm_head"]["kernel"])}}
  ids = tok.encode("def f(x):\n    return x + 1\n" * 3)  # 81 chars: 5 full windows and a part
  r = scoring.split_loss(params, cfg, ids, batch_size=4)
  assert r["chars"] == ids.size - 1  # every character but the first is predicted once
  assert r["nats_per_char"] == pytest.approx(math.log(99), rel=1e-6)
  assert r["bits_per_char"] == pytest.approx(math.log2(99), rel=1e-6)
  assert r["bits_per_char"] == pytest.approx(r["nats_per_char"] / math.log(2), rel=1e-12)


def test_encode_folder_matches_the_corpus_rules(tmp_path):
  (tmp_path / "b").mkdir()
  (tmp_path / "__pycache__").mkdir()
  (tmp_path / "a.py").write_bytes("x = 'é'\r\ny = 2\r\n".encode())
  (tmp_path / "b" / "c.py").write_text("z = 3\n")
  (tmp_path / "b" / "empty.py").write_text("")
  (tmp_path / "b" / "notes.txt").write_text("not python\n")
  (tmp_path / "__pycache__" / "d.py").write_text("skipped = True\n")
  ids, n_files = scoring.encode_folder(str(tmp_path), tok)
  want = np.concatenate([tok.encode("x = ''\ny = 2\n"), [EOS_ID], tok.encode("z = 3\n"), [EOS_ID]])
  np.testing.assert_array_equal(ids, want)
  assert n_files == 2
  # The run's per-file limit applies as when the corpus was built: a.py (13 chars) goes.
  ids, n_files = scoring.encode_folder(str(tmp_path), tok, max_file_chars=10)
  np.testing.assert_array_equal(ids, np.concatenate([tok.encode("z = 3\n"), [EOS_ID]]))
  assert n_files == 1


def test_encode_folder_refuses_missing_or_empty_folders(tmp_path):
  with pytest.raises(UserError, match="not a directory"):
    scoring.encode_folder(str(tmp_path / "nope"), tok)
  with pytest.raises(UserError, match="no non-empty .py files"):
    scoring.encode_folder(str(tmp_path), tok)


# --- the syntax cutter --------------------------------------------------------------------------

GOOD = "def f(x):\n    return x + 1\n"


@pytest.mark.parametrize("text,truncated,kept", [
    (GOOD, False, GOOD),  # valid: kept whole
    (GOOD + "\nclass A:\n    y = (1,\n", False, GOOD + "\n"),  # cut mid-statement
    (GOOD + "x = 1", True, GOOD),  # maybe "x = 12": the cut-off last line is not kept
    (GOOD + "x = 1", False, GOOD + "x = 1"),  # ended at <eos>: the last line is complete
    ("def f(x):\n    if x:\n        return (", False, ""),  # nothing valid
    ("def :\n", False, ""),
    ("# only a comment\nx = (", False, ""),  # a prefix that parses but holds no statement
    ("", False, ""),
    # indented block cut: the cut falls back to the top-level line, never inside the block
    (GOOD + "def g():\n    a = 1\n\n    b = [\n", False, GOOD),
    (GOOD + "def g():\n    a = 1\n# note\n    b = 2 +\n", False, GOOD),
    # a column-0 line inside brackets or strings is not a statement boundary
    ("x = [\n1,\n]\ns = '''\ny\n'''\nz = (", False, "x = [\n1,\n]\ns = '''\ny\n'''\n"),
])
def test_cut_to_complete(text, truncated, kept):
  assert syntax.cut_to_complete(text, truncated) == kept


def _exhaustive_cut(text: str, truncated: bool) -> str:
  """Tries every candidate cut from the end, with no skipping: the reference."""
  cuts = [m.start() for m in syntax._STATEMENT_START.finditer(text)]
  cuts += [] if truncated else [len(text)]
  for cut in reversed(cuts):
    if cut and syntax._parses(text[:cut])[0]:
      return text[:cut] if ast.parse(text[:cut]).body else ""
  return ""


def test_skipping_past_the_error_line_loses_no_valid_prefix():
  """The cutter skips cuts beyond each parse error's line; exhaustive search agrees."""
  rng = random.Random(0)
  source = (REPO / "minigpt_jax" / "syntax.py").read_text() + GOOD * 3
  for _ in range(300):
    start = rng.randrange(len(source))
    text = list("def " + source[start:start + rng.randrange(20, 400)])
    for _ in range(rng.randrange(3)):
      text.insert(rng.randrange(len(text) + 1), rng.choice("()[]:'\"\n    #\\="))
    text = "".join(text)
    for truncated in (False, True):
      assert syntax.cut_to_complete(text, truncated) == _exhaustive_cut(text, truncated), text


def test_validity_counts():
  samples = [GOOD, GOOD + "x = (", "def (", GOOD + "y = 2"]
  r = syntax.validity(samples, truncated=[False, False, False, True])
  assert (r["n"], r["valid"], r["rate"]) == (4, 3, 0.75)
  assert r["kept_chars"] == [len(GOOD), len(GOOD), 0, len(GOOD)]
  assert r["mean_kept_chars"] == pytest.approx(3 * len(GOOD) / 4)
  fractions = [1, len(GOOD) / len(samples[1]), 0, len(GOOD) / len(samples[3])]
  assert r["mean_kept_fraction"] == pytest.approx(sum(fractions) / 4)
  with pytest.raises(ValueError):
    syntax.validity(samples, truncated=[True])


def test_whole_def_and_class_blocks_are_counted_in_the_kept_text():
  text = "class A:\n    def f(self):\n        pass\n\nasync def g():\n    pass\nx = 1\ndef h("
  assert syntax.count_blocks(syntax.cut_to_complete(text)) == 3  # h( is cut off: not counted
  assert syntax.count_blocks("") == 0
  r = syntax.validity([text, "x = 1\n", "def ("], truncated=[False, False, False])
  assert (r["blocks"], r["samples_with_blocks"]) == (3, 1)


# --- on a trained checkpoint --------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, corpus_dir):
  """configs/tiny.py trained for a few steps on the synthetic corpus: (run dir, val split)."""
  root = tmp_path_factory.mktemp("eval_run")
  c = tiny_config_in(root, corpus_dir)
  c.train.steps = c.train.eval_every = c.train.ckpt_every = 10
  c.sample.num_samples = 0
  summary = train_loop.train(c, log=lambda *_: None)
  val = np.fromfile(root / "data" / "tiny" / "val.bin", np.uint8)
  return summary.run_dir, val


EVAL_ARGS = dict(num_samples=5, max_new_tokens=20, seed=3)


@pytest.fixture(scope="module")
def evaluated(trained_run, corpus_dir):
  run_dir, _ = trained_run
  return scoring.evaluate_checkpoint(str(run_dir), extra_corpora=[str(corpus_dir / "pkg1")],
                                      log=lambda *_: None, **EVAL_ARGS)


def _without_timings(out: dict) -> dict:
  return {k: v for k, v in out.items() if k not in TIMING_KEYS}


def test_evaluation_is_deterministic_and_covers_the_whole_split(trained_run, evaluated, corpus_dir):
  run_dir, val = trained_run
  again = scoring.evaluate_checkpoint(str(run_dir / "ckpt" / "10"),
                                       extra_corpora=[str(corpus_dir / "pkg1")],
                                       log=lambda *_: None, **EVAL_ARGS)
  assert _without_timings(again) == _without_timings(evaluated)
  assert evaluated["step"] == 10
  assert evaluated["val"]["chars"] == val.size - 1
  extra = evaluated["extra_corpora"][str(corpus_dir / "pkg1")]
  assert extra["files"] == 15 and extra["chars"] > 0
  assert 0 < evaluated["val"]["nats_per_char"] < math.log(99) + 0.5  # trained a little, finite
  s = evaluated["syntax"]
  assert s["n"] == 5 and len(s["samples"]) == 5
  assert [x["text"][:4] for x in s["samples"]] == ["def ", "clas", "impo", "for ", "if _"]
  assert s["max_new_tokens"] == 20  # fits: 32 - len("if __name__") - 1


def test_cli_writes_the_same_report_as_the_library(trained_run, evaluated, corpus_dir, tmp_path):
  run_dir, _ = trained_run
  out = tmp_path / "report.json"
  r = run_module("minigpt_jax.evaluate", f"--checkpoint={run_dir}", f"--json_out={out}",
                 f"--extra_corpus={corpus_dir / 'pkg1'}", "--num_samples=5",
                 "--max_new_tokens=20", "--seed=3")
  assert r.returncode == 0, r.stderr
  got = json.loads(out.read_text())
  assert {"run_dir", "step", "val", "extra_corpora", "syntax"} <= set(got)
  assert (got["compute_dtype"], got["attention_impl"]) == ("float32", "xla")  # what ran, on CPU
  assert {"nats_per_char", "bits_per_char", "chars"} <= set(got["val"])
  assert {"rate", "mean_kept_chars", "mean_kept_fraction", "samples"} <= set(got["syntax"])
  # Same numbers and samples in a fresh process: deterministic across processes too.
  assert _without_timings(got) == json.loads(json.dumps(_without_timings(evaluated)))
  assert "bits/char" in r.stdout and "syntax validity" in r.stdout


def test_the_plot_reads_evaluates_report(evaluated, tmp_path):
  """plot.py parses evaluate's JSON by key: a renamed key must fail here, not empty the plot."""
  scoring.write_report(evaluated, tmp_path / f"eval_step{evaluated['step']}.json")
  assert curves._full_evals(tmp_path) == [{"step": 10, "val_loss": evaluated["val"]["nats_per_char"],
                                        "syntax_rate": evaluated["syntax"]["rate"]}]


def test_a_corpus_rebuilt_since_training_is_refused(tmp_path, corpus_dir):
  """Scoring against a rebuilt corpus would give numbers on the wrong split, silently."""
  c = tiny_config_in(tmp_path, corpus_dir)
  c.train.steps = c.train.eval_every = c.train.ckpt_every = 5
  c.sample.num_samples = 0
  run_dir = train_loop.train(c, log=lambda *_: None).run_dir
  c.data.val_fraction, c.data.rebuild = 0.5, True  # another run's settings, same data.name
  data.load_corpus(c.data, tok, log=lambda *_: None)
  with pytest.raises(UserError, match="is not the corpus step 5 was trained on"):
    scoring.evaluate_checkpoint(str(run_dir), num_samples=0, log=lambda *_: None)


def test_cli_missing_extra_corpus_is_a_one_line_error(trained_run, tmp_path):
  run_dir, _ = trained_run
  # In a fresh process: the exit status a shell sees (other bad inputs run in-process).
  r = run_module("minigpt_jax.evaluate", f"--checkpoint={run_dir}",
                 f"--extra_corpus={tmp_path / 'missing'}")
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:") and "missing" in lines[0]
  assert not list(run_dir.glob("eval_step*.json"))
