import os
import shutil

import jax
import numpy as np
import pytest

from minigpt_jax import data, scoring, train_step
from minigpt_jax.errors import UserError
from minigpt_jax.tokenizer import CharTokenizer

tok = CharTokenizer()


def _prepare(cfg):
  return data.load_corpus(cfg.data, tok, log=lambda *_: None)


def test_split_is_deterministic_and_at_file_boundaries(tiny_config, corpus_dir, tmp_path):
  splits, manifest = _prepare(tiny_config)
  again = tiny_config.copy_and_resolve_references()
  again.data.dir = str(tmp_path / "other")
  splits2, manifest2 = _prepare(again)
  for s in data.SPLITS:
    np.testing.assert_array_equal(splits[s], splits2[s])
  assert manifest["splits"] == manifest2["splits"]

  # Every file lies whole in exactly one split, in order, followed by <eos>.
  files = sorted(corpus_dir.rglob("*.py"))
  seen = set()
  for s in data.SPLITS:
    docs = tok.decode(splits[s]).split("<eos>")
    assert docs[-1] == ""
    names = [rel.split(":", 1)[1] for rel, _ in manifest["files"][s]]
    assert len(names) == len(docs) - 1
    for name, doc in zip(names, docs):
      assert (corpus_dir / name).read_text() == doc
      seen.add(name)
  assert seen == {f.relative_to(corpus_dir).as_posix() for f in files}
  assert manifest["files"]["val"] and manifest["files"]["train"]


def test_relative_roots_are_recorded_absolute(tiny_config, corpus_dir, monkeypatch):
  monkeypatch.chdir(corpus_dir.parent)
  tiny_config.data.roots = (corpus_dir.name,)
  assert data.spec_of(tiny_config.data)["roots"] == [str(corpus_dir.resolve())]


def test_val_assignment_does_not_depend_on_other_files(tiny_config, corpus_dir, tmp_path):
  """Adding sources never moves a file between train and val (no leak into val)."""
  src = tmp_path / "src"
  shutil.copytree(corpus_dir, src)
  tiny_config.data.roots = (str(src),)
  tiny_config.data.val_fraction = 0.3
  split_of = lambda m: {rel: s for s in data.SPLITS for rel, _ in m["files"][s]}
  before = split_of(data.build_corpus(tiny_config.data, tmp_path / "a", tok, log=lambda *_: None))
  for i in range(40):
    (src / "new" / f"x{i}.py").parent.mkdir(exist_ok=True)
    (src / "new" / f"x{i}.py").write_text(f"x = {i}\n")
  after = split_of(data.build_corpus(tiny_config.data, tmp_path / "b", tok, log=lambda *_: None))
  assert len(after) == len(before) + 40 and {after[rel] for rel in after} == {"train", "val"}
  assert all(after[rel] == split for rel, split in before.items())
  held = [data.is_val_file(f"0:m{i}.py", 0.1) for i in range(2000)]
  assert 0.07 < np.mean(held) < 0.13


def test_dropped_characters_counted_and_newlines_normalised(tiny_config, tmp_path):
  root = tmp_path / "src"
  root.mkdir()
  (root / "a.py").write_bytes("x = 'é'\r\ny = 1\x0c\n".encode())
  for i in range(30):
    (root / f"f{i}.py").write_text(f"z{i} = {i}\n")
  tiny_config.data.roots = (str(root),)
  tiny_config.data.val_fraction = 0.5
  splits, manifest = _prepare(tiny_config)
  assert manifest["dropped_chars"]["non_ascii"] == 1
  assert manifest["dropped_chars"]["control"] == 1
  text = tok.decode(np.concatenate([splits["train"], splits["val"]]))
  assert "x = ''\ny = 1\n<eos>" in text and "\r" not in text


def test_rerun_is_a_no_op(tiny_config):
  _prepare(tiny_config)
  path = os.path.join(tiny_config.data.dir, tiny_config.data.name, "train.bin")
  before = os.stat(path).st_mtime_ns
  _prepare(tiny_config)
  assert os.stat(path).st_mtime_ns == before


def test_corrupt_corpus_is_refused(tiny_config):
  _prepare(tiny_config)
  path = os.path.join(tiny_config.data.dir, tiny_config.data.name, "val.bin")
  with open(path, "r+b") as f:
    f.write(b"\x05")
  with pytest.raises(UserError, match="sha256"):
    _prepare(tiny_config)


def test_stale_corpus_is_refused_then_rebuilt_on_request(tiny_config):
  _prepare(tiny_config)
  tiny_config.data.val_fraction = 0.3
  with pytest.raises(UserError, match="stale.*val_fraction"):
    _prepare(tiny_config)
  tiny_config.data.rebuild = True
  _, manifest = _prepare(tiny_config)
  assert manifest["spec"]["val_fraction"] == 0.3


def test_empty_corpus_is_an_error(tiny_config, tmp_path):
  (tmp_path / "empty").mkdir()
  tiny_config.data.roots = (str(tmp_path / "empty"),)
  with pytest.raises(UserError, match="no train text"):
    _prepare(tiny_config)
  assert not (tmp_path / "data" / tiny_config.data.name).exists()


def test_missing_root_is_an_error(tiny_config, tmp_path):
  tiny_config.data.roots = (str(tmp_path / "nope"),)
  with pytest.raises(UserError, match="not a directory"):
    _prepare(tiny_config)


def test_size_cap(tiny_config):
  tiny_config.data.max_chars = 6000
  tiny_config.data.val_fraction = 0.5
  splits, manifest = _prepare(tiny_config)
  assert splits["train"].size + splits["val"].size <= 6000
  assert manifest["skipped_files"]["over_cap"] > 0


def test_batch_targets_are_inputs_shifted_by_one():
  data_N = jax.numpy.arange(1000) % 97
  inputs, targets = train_step.get_batch(data_N, jax.random.key(3), 4, 16)
  assert inputs.shape == targets.shape == (4, 16)
  np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
  np.testing.assert_array_equal(targets, (inputs + 1) % 97)  # the data counts up by one


def test_batch_is_a_function_of_the_key():
  data_N = jax.random.randint(jax.random.key(0), (5000,), 0, 99)
  a = train_step.get_batch(data_N, jax.random.key(7), 4, 16)
  b = train_step.get_batch(data_N, jax.random.key(7), 4, 16)
  c = train_step.get_batch(data_N, jax.random.key(8), 4, 16)
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.array_equal(a[0], c[0])


def test_eval_windows_cover_the_split():
  starts = scoring.eval_windows(100, 16)
  np.testing.assert_array_equal(starts, np.arange(0, 99, 16))
  thinned = scoring.eval_windows(10_000, 16, max_windows=10)
  assert thinned.size == 10 and thinned[0] == 0 and thinned[-1] == (9999 // 16) * 16
