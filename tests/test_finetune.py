"""Fine-tuning: a new run that starts from another run's parameters (config.init_from)."""

import hashlib
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from helpers import one_line_error, run_command, tiny_config_in, tiny_flags
from minigpt_jax import config as config_lib
from minigpt_jax import data, runs, train_loop, train_step
from minigpt_jax.errors import UserError
from minigpt_jax.model import init_params
from minigpt_jax.tokenizer import CharTokenizer

quiet = lambda *_: None

# Code unlike the shared synthetic corpus (tests/helpers.py): what fine-tuning adapts to.
_NEW_STYLE = ('while n_{i} < LIMIT:\n    table["key_{i}"] = [n_{i}, n_{i} * 2]\n'
              '    n_{i} += step\n')


def write_new_corpus(root: pathlib.Path, n_files: int = 24) -> pathlib.Path:
  root.mkdir()
  for i in range(n_files):
    (root / f"job_{i:02d}.py").write_text(_NEW_STYLE.format(i=i) * (3 + i % 4))
  return root


def tree_sha256(folder: pathlib.Path) -> dict:
  """Every file below `folder` (none excluded) and the sha256 of its bytes."""
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory, corpus_dir) -> pathlib.Path:
  """A tiny run trained 10 steps on the shared corpus: the run fine-tuned from."""
  c = tiny_config_in(tmp_path_factory.mktemp("source"), corpus_dir)
  c.train.steps, c.sample.num_samples = 10, 0
  return train_loop.train(c, log=quiet).run_dir


def finetune_config(tmp_path, corpus_dir, source_dir, new_corpus):
  c = tiny_config_in(tmp_path, corpus_dir)
  c.run_name, c.data.name, c.data.roots = "ft", "ft", (str(new_corpus),)
  c.init_from = str(source_dir)
  c.train.steps, c.train.log_every, c.train.eval_every = 30, 1, 30
  c.train.lr, c.train.warmup_steps = 1e-3, 2
  c.sample.num_samples = 0
  return c


def a_batch(c, split: str):
  """A fixed batch of the prepared corpus of `c` (inputs_BT, targets_BT)."""
  splits, _ = data.load_corpus(c.data, CharTokenizer(), quiet, build=False)
  return train_step.get_batch(jax.numpy.asarray(splits[split]), jax.random.key(7), 8,
                        c.model.context_len)


def test_a_finetune_starts_from_the_source_parameters_with_a_fresh_optimizer(
    tmp_path, corpus_dir, source, monkeypatch):
  c = finetune_config(tmp_path, corpus_dir, source, write_new_corpus(tmp_path / "new"))
  c.train.steps = 2
  started = {}
  real = runs.init_or_restore

  def keep_initial_state(*args, **kwargs):  # fetched before the first step donates it
    state, tx, state_sh, start = real(*args, **kwargs)
    started["state"] = jax.device_get(state)
    return state, tx, state_sh, start

  monkeypatch.setattr(runs, "init_or_restore", keep_initial_state)
  s = train_loop.train(c, log=quiet)
  assert s.first_step == 0 and int(started["state"].step) == 0
  mu = [x for x in jax.tree.leaves(started["state"].opt_state) if np.ndim(x) > 0]
  assert mu and all(not np.any(x) for x in mu)  # Adam's moments are fresh: all zero
  src = runs.load_for_inference(str(source))
  inputs_BT, targets_BT = a_batch(c, "train")
  loss = lambda params: float(train_step.loss_fn(params, src.model_cfg, inputs_BT, targets_BT))
  assert loss(started["state"].params) == loss(src.params)
  fresh = init_params(src.model_cfg, jax.random.key(c.seed))
  assert abs(loss(fresh) - loss(src.params)) > 0.1  # the comparison tells the two apart


def test_finetuning_lowers_the_loss_on_the_new_corpus_and_leaves_the_source_alone(
    tmp_path, corpus_dir, source):
  before = tree_sha256(source)
  c = finetune_config(tmp_path, corpus_dir, source, write_new_corpus(tmp_path / "new"))
  s = train_loop.train(c, log=quiet)
  assert tree_sha256(source) == before
  c.init_from, c.run_name = "", "fresh"  # the same schedule from a fresh init
  fresh_dir = train_loop.train(c, log=quiet).run_dir
  src, tuned, fresh = (runs.load_for_inference(str(d)) for d in (source, s.run_dir, fresh_dir))
  inputs_BT, targets_BT = a_batch(c, "val")
  loss = lambda run: float(train_step.loss_fn(run.params, run.model_cfg, inputs_BT, targets_BT))
  assert loss(tuned) < loss(src) - 0.3, (loss(tuned), loss(src))  # measured 3.69 vs 4.31
  assert loss(tuned) < loss(fresh), (loss(tuned), loss(fresh))  # the head start counts: 3.92


def test_a_finetune_run_resumes_itself_without_its_source(tmp_path, corpus_dir, source):
  moved = tmp_path / "source_copy"
  shutil.copytree(source, moved)
  c = finetune_config(tmp_path, corpus_dir, moved, write_new_corpus(tmp_path / "new"))
  c.train.stop_at_step, c.train.ckpt_every = 5, 5
  train_loop.train(c, log=quiet)
  shutil.rmtree(moved)  # a resume reads only the run's own checkpoints
  c.train.stop_at_step = 10
  s = train_loop.train(c, log=quiet)
  assert (s.first_step, s.last_step) == (5, 10)


def test_a_model_that_differs_from_the_source_is_refused_before_any_work(
    tmp_path, corpus_dir, source):
  before = tree_sha256(source)
  new = write_new_corpus(tmp_path / "new")
  proc = run_command("minigpt_jax.train", *tiny_flags(
      tmp_path, corpus_dir, f"--config.init_from={source}", "--config.run_name=ft",
      "--config.data.name=ft", f"--config.data.roots=('{new}',)", "--config.model.d_model=48"))
  one_line_error(proc, "model.d_model", "48", "32")
  assert not (tmp_path / "runs" / "ft").exists()
  assert not (tmp_path / "data" / "ft").exists()  # refused before the corpus was prepared
  assert tree_sha256(source) == before



def test_a_finetune_keeps_the_sources_head_tied_or_untied(tiny_config, source):
  """Tying removes the LM head's parameters: named, not an Orbax tree mismatch."""
  tiny_config.init_from, tiny_config.model.tie_embeddings = str(source), True
  with pytest.raises(UserError, match="model.tie_embeddings is True here but False"):
    runs.finetune_source(tiny_config)

def test_the_source_tokenizer_must_match(tmp_path, corpus_dir, source):
  other = tmp_path / "other_tokenizer"
  shutil.copytree(source, other)
  (other / "tokenizer.json").write_text('{"kind": "bpe"}')
  c = finetune_config(tmp_path, corpus_dir, other, write_new_corpus(tmp_path / "new"))
  with pytest.raises(UserError, match="cannot fine-tune from .*tokenizer"):
    train_loop.train(c, log=quiet)
  assert not (tmp_path / "runs" / "ft").exists()


def test_a_missing_source_step_is_a_clear_error(tmp_path, corpus_dir, source):
  c = finetune_config(tmp_path, corpus_dir, source, write_new_corpus(tmp_path / "new"))
  c.init_from_step = 7
  with pytest.raises(UserError, match="no checkpoint for step 7"):
    train_loop.train(c, log=quiet)


def _names_in_split(split: str, n: int, prefix: str) -> list[str]:
  """`n` file names that the corpus's hash puts in `split` (at val_fraction 0.1)."""
  names, i = [], 0
  while len(names) < n:
    name = f"{prefix}{i}.py"
    if data.is_val_file(f"0:{name}", 0.1) == (split == "val"):
      names.append(name)
    i += 1
  return names


def test_a_val_split_smaller_than_a_window_says_what_to_change(tmp_path, corpus_dir, source):
  small = tmp_path / "small_project"
  small.mkdir()
  for name in _names_in_split("train", 8, "mod"):
    (small / name).write_text(_NEW_STYLE.format(i=1) * 4)
  (small / _names_in_split("val", 1, "mod")[0]).write_text("x = 1\n")  # 7 with its end marker
  c = finetune_config(tmp_path, corpus_dir, source, small)
  with pytest.raises(UserError, match=r"val split has 7 chars.*at least 34.*data\.val_fraction"):
    train_loop.train(c, log=quiet)


def test_a_run_saved_before_init_from_existed_still_resumes(tiny_config):
  tiny_config.train.steps, tiny_config.sample.num_samples = 5, 0
  s = train_loop.train(tiny_config, log=quiet)
  saved = json.loads((s.run_dir / "config.json").read_text())
  del saved["init_from"], saved["init_from_step"]  # as written before fine-tuning existed
  (s.run_dir / "config.json").write_text(json.dumps(saved))
  tiny_config.train.steps = 10
  assert train_loop.train(tiny_config, log=quiet).first_step == 5


def test_the_finetune_config_is_small_with_its_own_corpus_and_schedule():
  from configs import finetune, small
  c, base = finetune.get_config(), small.get_config()
  config_lib.validate(c)
  assert c.model == base.model  # it can load the quick-start checkpoint
  assert c.data.name != base.data.name and c.run_name != base.run_name and c.init_from
  assert c.train.lr < base.train.lr and c.train.steps < base.train.steps
