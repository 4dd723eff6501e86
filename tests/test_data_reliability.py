"""The prepared corpus under misuse and crashes: overlapping roots, folders that are not a
corpus, damaged manifests, special files, and a rebuild killed half-way."""

import contextlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from helpers import REPO, one_line_error, run_command, tiny_flags
from minigpt_jax import corpus_folder, data, scoring
from minigpt_jax.errors import UserError
from minigpt_jax.tokenizer import CharTokenizer

tok = CharTokenizer()
quiet = lambda *_: None


def _prepare(cfg, **kwargs):
  return data.load_corpus(cfg.data, tok, log=quiet, **kwargs)


def _out_dir(cfg) -> pathlib.Path:
  return pathlib.Path(cfg.data.dir) / cfg.data.name


def _snapshot(folder: pathlib.Path) -> dict:
  """Every path below `folder` with its bytes (None for a folder)."""
  return {p.relative_to(folder).as_posix(): None if p.is_dir() else p.read_bytes()
          for p in sorted(folder.rglob("*"))}


@contextlib.contextmanager
def _deadline(seconds: int):
  """Turns a hang (a blocking open of a FIFO) into a test failure (not an OSError, which the
  code under test may take for an unreadable file)."""
  def fail(*_):
    pytest.fail(f"still running after {seconds}s")
  previous = signal.signal(signal.SIGALRM, fail)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# --- overlapping roots -----------------------------------------------------------------------

def _symlinked_files(src: pathlib.Path, other: pathlib.Path) -> pathlib.Path:
  other.mkdir()
  for f in sorted(src.rglob("*.py")):
    (other / f"link_{f.parent.name}_{f.name}").symlink_to(f)
  return other


def _symlinked_folder(src: pathlib.Path, other: pathlib.Path) -> pathlib.Path:
  other.mkdir()
  (other / "own.py").write_text("own = 1\n")
  (other / "linked").symlink_to(src / "pkg3", target_is_directory=True)
  return other


def _link_to_inside(src: pathlib.Path, link: pathlib.Path) -> pathlib.Path:
  link.symlink_to(src / "pkg2", target_is_directory=True)
  return link


# name: (roots from src and a scratch folder, whether src's files are all reached twice).
# A nested root names its files from itself ("1:mod.py"), so only repeats keep src's split.
ROOT_LAYOUTS = {
    "same_root_twice": (lambda src, t: (src, src), True),
    "trailing_slash": (lambda src, t: (src, f"{src}/"), True),
    "repeated_override": (lambda src, t: (src, _symlinked_folder(src, t / "o"), src), True),
    "nested_inner_last": (lambda src, t: (src, src / "pkg1"), False),
    "nested_inner_first": (lambda src, t: (src / "pkg1", src), False),
    "symlinked_root_inside_another": (lambda src, t: (src, _link_to_inside(src, t / "l")), False),
    "symlinked_folder_inside_another": (lambda src, t: (src, _symlinked_folder(src, t / "o")),
                                        False),
    "symlinked_files": (lambda src, t: (src, _symlinked_files(src, t / "o")), True),
}


def _real_split_of(manifest: dict) -> dict:
  """Each file's real path -> its splits (a list: a file listed twice shows twice)."""
  resolved = [pathlib.Path(r) for r in manifest["spec"]["roots"]]
  split_of = {}
  for s in data.SPLITS:
    for rel, _ in manifest["files"][s]:
      i, below = rel.split(":", 1)
      split_of.setdefault(os.path.realpath(resolved[int(i)] / below), []).append(s)
  return split_of


@pytest.mark.parametrize("layout", ROOT_LAYOUTS)
def test_no_file_is_in_both_splits_whatever_the_roots(layout, tiny_config, corpus_dir, tmp_path):
  src = tmp_path / "src"
  shutil.copytree(corpus_dir, src)
  tiny_config.data.val_fraction = 0.3  # many val files: a file listed twice lands in both
  tiny_config.data.roots = (str(src),)
  alone = _prepare(tiny_config)[1]
  make_roots, repeats = ROOT_LAYOUTS[layout]
  tiny_config.data.roots = tuple(str(r) for r in make_roots(src, tmp_path))
  tiny_config.data.name = "overlap"
  manifest = _prepare(tiny_config)[1]
  split_of = _real_split_of(manifest)
  assert all(len(splits) == 1 for splits in split_of.values()), {
      f: s for f, s in split_of.items() if len(s) > 1}
  every_file = {os.path.realpath(f) for f in src.rglob("*.py")}
  assert every_file <= set(split_of)
  if repeats:  # the repeat is counted, and each file keeps the split it has alone
    assert manifest["skipped_files"]["duplicate"] > 0
    assert {f: split_of[f][0] for f in every_file} == {
        f: s[0] for f, s in _real_split_of(alone).items()}


def _linked_and_copied(src: pathlib.Path, other: pathlib.Path) -> int:
  """`other` holds a hard link to each of half of `src`'s files and a copy of the rest, under
  other names (so in other splits, by the hash of the name); returns how many."""
  files = sorted(src.rglob("*.py"))
  for n, f in enumerate(files):
    (other / f"sub{n % 3}").mkdir(parents=True, exist_ok=True)
    twin = other / f"sub{n % 3}" / f"twin_{n}.py"
    if n % 2:
      os.link(f, twin)
    else:
      shutil.copyfile(f, twin)
  return len(files)


def test_hard_links_and_copies_of_a_file_are_taken_once(tiny_config, corpus_dir, tmp_path):
  """One inode, or one text, reached under two names landed in both splits."""
  src, other = tmp_path / "src", tmp_path / "other"
  shutil.copytree(corpus_dir, src)
  twins = _linked_and_copied(src, other)
  tiny_config.data.roots = (str(src), str(other))
  tiny_config.data.val_fraction = 0.3
  said = []
  splits, manifest = data.load_corpus(tiny_config.data, tok, log=said.append)
  split_of_text = {}
  for s in data.SPLITS:
    for rel, _ in manifest["files"][s]:
      i, below = rel.split(":", 1)
      text = (pathlib.Path(manifest["spec"]["roots"][int(i)]) / below).read_bytes()
      split_of_text.setdefault(text, []).append(s)
  assert all(len(s) == 1 for s in split_of_text.values())  # each text once, in one split
  assert len(split_of_text) == twins  # every text of src is there
  assert manifest["skipped_files"]["duplicate"] == twins
  assert all(rel.startswith("0:") for s in data.SPLITS for rel, _ in manifest["files"][s])
  assert f"({twins} duplicates left out)" in said[-1], said


# --- a rebuild replaces only a prepared corpus ---------------------------------------------

def _user_folder_with_web_manifest(folder: pathlib.Path):
  (folder / "manifest.json").write_text('{"name": "my app", "start_url": "/"}')
  (folder / "index.html").write_text("<p>hello</p>")


def _lone_foreign_manifest(folder: pathlib.Path):
  (folder / "manifest.json").write_text('{"name": "my app"}')


def _corpus_plus_a_user_file(folder: pathlib.Path):
  (folder / "notes.txt").write_text("mine")


def _corpus_plus_a_subfolder(folder: pathlib.Path):
  (folder / "keep").mkdir()
  (folder / "keep" / "a.txt").write_text("mine")


NOT_A_CORPUS = {  # name: (prepare a corpus there first?, what the folder then holds)
    "user_folder_with_web_manifest": (False, _user_folder_with_web_manifest),
    "lone_foreign_manifest": (False, _lone_foreign_manifest),
    "corpus_plus_a_user_file": (True, _corpus_plus_a_user_file),
    "corpus_plus_a_subfolder": (True, _corpus_plus_a_subfolder),
}


@pytest.mark.parametrize("case", NOT_A_CORPUS)
def test_a_rebuild_never_replaces_a_folder_that_is_not_a_prepared_corpus(case, tiny_config):
  prepare_first, fill = NOT_A_CORPUS[case]
  folder = _out_dir(tiny_config)
  if prepare_first:
    _prepare(tiny_config)
  folder.mkdir(parents=True, exist_ok=True)
  fill(folder)
  before = _snapshot(folder)
  tiny_config.data.rebuild = True
  with pytest.raises(UserError, match="not a prepared corpus") as e:
    _prepare(tiny_config)
  assert "\n" not in str(e.value)
  assert _snapshot(folder) == before
  assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no work folders left


def test_train_cli_refuses_to_rebuild_over_a_user_folder(tmp_path, corpus_dir):
  folder = tmp_path / "data" / "tiny"  # configs/tiny.py's data.name
  folder.mkdir(parents=True)
  _user_folder_with_web_manifest(folder)
  before = _snapshot(folder)
  flags = tiny_flags(tmp_path, corpus_dir, "--config.data.rebuild=True")
  one_line_error(run_command("minigpt_jax.train", *flags), "not a prepared corpus", str(folder))
  assert _snapshot(folder) == before


def test_a_rebuild_does_not_replace_a_symlinked_corpus_folder(tiny_config, tmp_path):
  _prepare(tiny_config)
  elsewhere = tmp_path / "elsewhere"
  _out_dir(tiny_config).rename(elsewhere)
  _out_dir(tiny_config).symlink_to(elsewhere, target_is_directory=True)
  before = _snapshot(elsewhere)
  tiny_config.data.rebuild = True
  with pytest.raises(UserError, match="symlink"):
    _prepare(tiny_config)
  assert _out_dir(tiny_config).is_symlink() and _snapshot(elsewhere) == before


def test_a_rebuild_still_replaces_a_prepared_corpus(tiny_config):
  _prepare(tiny_config)
  tiny_config.data.rebuild, tiny_config.data.val_fraction = True, 0.4
  assert _prepare(tiny_config)[1]["spec"]["val_fraction"] == 0.4


# --- a damaged manifest ------------------------------------------------------------------------

def _drop_splits(m):
  del m["splits"]
  return m


def _drop_val(m):
  del m["splits"]["val"]
  return m


def _drop_sha256(m):
  del m["splits"]["train"]["sha256"]
  return m


DAMAGE = {
    "no_splits": _drop_splits,
    "a_json_list": lambda m: [m],
    "no_val_split": _drop_val,
    "split_without_sha256": _drop_sha256,
    "spec_not_an_object": lambda m: {**m, "spec": "stdlib"},
    "splits_not_an_object": lambda m: {**m, "splits": ["train", "val"]},
    # Written as text (json.dumps cannot nest this deep): the parser's RecursionError.
    "nested_past_the_stack": lambda m: '{"spec": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "nested_below_the_stack": lambda m: {**m, "tokenizer": _nested(900)},
}


def _nested(depth: int) -> list:
  value = []
  for _ in range(depth - 1):
    value = [value]
  return value


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("build", [True, False])
def test_a_damaged_manifest_is_a_one_line_error_then_rebuilds(damage, build, tiny_config):
  _prepare(tiny_config)
  path = _out_dir(tiny_config) / "manifest.json"
  damaged = DAMAGE[damage](json.loads(path.read_text()))
  path.write_text(damaged if isinstance(damaged, str) else json.dumps(damaged))
  with pytest.raises(UserError, match=r"--config\.data\.rebuild=True") as e:
    _prepare(tiny_config, build=build)
  assert "\n" not in str(e.value) and "manifest.json" in str(e.value)
  tiny_config.data.rebuild = True
  splits, manifest = _prepare(tiny_config)  # the rebuild it suggests then works
  assert manifest["splits"]["val"]["chars"] == splits["val"].size > 0


# --- special files -----------------------------------------------------------------------------

def _root_with_special_files(root: pathlib.Path, n_files: int = 30) -> pathlib.Path:
  root.mkdir()
  for i in range(n_files):
    (root / f"f{i}.py").write_text(f"z{i} = {i}\n")
  os.mkfifo(root / "pipe.py")  # opening it for reading waits for a writer: forever
  (root / "null.py").symlink_to("/dev/null")  # a device: never read
  return root


def test_fifos_and_devices_in_the_corpus_are_skipped_not_read(tiny_config, tmp_path):
  tiny_config.data.roots = (str(_root_with_special_files(tmp_path / "src")),)
  tiny_config.data.val_fraction = 0.5
  with _deadline(30):
    splits, manifest = _prepare(tiny_config)
  assert manifest["skipped_files"]["not_regular"] == 2
  assert sum(manifest["splits"][s]["files"] for s in data.SPLITS) == 30
  assert "pipe" not in json.dumps(manifest["files"])


def test_fifos_in_an_extra_corpus_are_skipped_not_read(tmp_path):
  root = _root_with_special_files(tmp_path / "extra", n_files=3)
  with _deadline(30):
    ids, n_files = scoring.encode_folder(str(root), tok)
  assert n_files == 3 and tok.decode(ids).count("<eos>") == 3


# --- a huge file ------------------------------------------------------------------------------

def test_a_file_over_max_file_chars_is_skipped_without_reading_it_whole(tmp_path):
  """A 1 GB .py file cost 5.5 GB and 21 s when it was read whole before its size was
  checked; now it costs one chunk. Here: 64 MB against a cap of 1000 characters."""
  huge = tmp_path / "table.py"
  with open(huge, "wb") as f:
    for _ in range(64):
      f.write(b"x = 1\n" * ((1 << 20) // 6))
  size = huge.stat().st_size
  tracemalloc.start()
  try:
    ids, _, _, skip = data.encode_file(huge, tok, 1000)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert (ids, skip) == (None, "too_large")
  assert peak < size / 8, f"peak {peak:,} bytes for a file of {size:,}"


@pytest.mark.parametrize("chunk", [1, 2, 3, 1 << 20])
def test_a_file_read_in_chunks_encodes_as_read_whole(tmp_path, monkeypatch, chunk):
  """Characters split between chunks: a UTF-8 sequence, a "\\r\\n", a bad byte."""
  raw = b"a\r\nb\r\rc\xc3\xa9d\xe2\x82\xac\te\xff\x00f\r\n\r" * 3 + b"\xf0\x9f\x98\x80\r"
  path = tmp_path / "mixed.py"
  path.write_bytes(raw)
  monkeypatch.setattr(data, "READ_CHUNK", chunk)
  ids, n_non_ascii, n_control, skip = data.encode_file(path, tok, 0)
  text = raw.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")
  assert tok.decode(ids) == "".join(c for c in text if c in "\t\n" or " " <= c <= "~")
  assert (n_non_ascii, n_control, skip) == (sum(c > "~" for c in text), 3, None)
  assert data.encode_file(path, tok, ids.size)[3] is None
  assert data.encode_file(path, tok, ids.size - 1)[3] == "too_large"


# --- what an unusable extra corpus holds, and folder modes ----------------------------------

def _extra(tmp_path, files: dict) -> str:
  root = tmp_path / "extra"
  root.mkdir()
  for name, text in files.items():
    (root / name).write_text(text)
  return str(root)


@pytest.mark.parametrize("files, max_file_chars, fragments", [
    ({"a.py": "x = 1\n" * 10, "b.py": "y = 2\n" * 10, "c.py": "z\n" * 40}, 30,
     ["3 .py files", "3 over data.max_file_chars 30"]),
    ({"a.py": "", "b.py": "x = 1\n" * 10}, 30, ["2 .py files", "1 empty", "1 over"]),
    ({"notes.txt": "x = 1\n"}, 0, ["no .py files"]),
])
def test_an_unusable_extra_corpus_says_what_it_found(tmp_path, files, max_file_chars, fragments):
  folder = _extra(tmp_path, files)
  with pytest.raises(UserError) as e:
    scoring.encode_folder(folder, tok, max_file_chars)
  assert "\n" not in str(e.value) and folder in str(e.value)
  for f in fragments:
    assert f in str(e.value), str(e.value)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_the_prepared_corpus_folder_follows_the_umask(umask, tiny_config):
  previous = os.umask(umask)
  try:
    _prepare(tiny_config)
  finally:
    os.umask(previous)
  folder = _out_dir(tiny_config)
  assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
  assert (folder / "train.bin").stat().st_mode & 0o777 == 0o666 & ~umask


# --- a rebuild killed half-way ---------------------------------------------------------------

_CRASH = """
import json, os, pathlib, sys
import ml_collections
from minigpt_jax import data
from minigpt_jax.tokenizer import CharTokenizer
cfg, at = ml_collections.ConfigDict(json.loads(sys.argv[1])), sys.argv[2]
rename, write_text = pathlib.Path.rename, pathlib.Path.write_text
def renamed(self, target):  # dies as the new corpus is about to take the old one's place
  if at == "between_renames" and pathlib.Path(target).name == cfg.name:
    os._exit(3)
  return rename(self, target)
def written(self, *args, **kwargs):  # dies as the new corpus's manifest is written
  if at == "writing" and self.name == "manifest.json":
    os._exit(3)
  return write_text(self, *args, **kwargs)
pathlib.Path.rename, pathlib.Path.write_text = renamed, written
data.load_corpus(cfg, CharTokenizer(), log=lambda *_: None)
"""


def _crash_a_rebuild(cfg, at: str):
  """A rebuild (with another val_fraction) in a process killed at `at`, with no clean-up."""
  changed = cfg.data.to_dict()
  changed.update(rebuild=True, val_fraction=0.4, roots=list(cfg.data.roots))
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-c", _CRASH, json.dumps(changed), at], env=env,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 3, r.stderr[-3000:]


def _work_folders(cfg) -> list:
  return sorted(p.name for p in _out_dir(cfg).parent.glob(f".{cfg.data.name}.*"))


@pytest.mark.parametrize("build", [True, False])
def test_a_rebuild_killed_between_its_renames_leaves_the_old_corpus(build, tiny_config,
                                                                    monkeypatch):
  splits, manifest = _prepare(tiny_config)
  train_inode = (_out_dir(tiny_config) / "train.bin").stat().st_ino
  _crash_a_rebuild(tiny_config, "between_renames")
  assert not _out_dir(tiny_config).exists() and _work_folders(tiny_config)  # the crash's state

  def no_build(*_, **__):
    raise AssertionError("the corpus was prepared again, not put back")
  monkeypatch.setattr(data, "build_corpus", no_build)
  said = []
  again, manifest_again = data.load_corpus(tiny_config.data, tok, log=said.append, build=build)
  assert manifest_again == manifest and (_out_dir(tiny_config) / "train.bin").stat().st_ino \
      == train_inode
  np.testing.assert_array_equal(again["val"], splits["val"])
  assert any("put back" in line for line in said), said
  if build:  # the builder also clears the dead rebuild's unfinished folder
    assert _work_folders(tiny_config) == []


def test_the_unfinished_folders_of_dead_builds_are_removed_and_nothing_else(tiny_config):
  _, manifest = _prepare(tiny_config)
  _crash_a_rebuild(tiny_config, "writing")
  dead = _work_folders(tiny_config)
  assert len(dead) == 1 and (_out_dir(tiny_config).parent / dead[0] / "train.bin").exists()
  parent = _out_dir(tiny_config).parent
  live = corpus_folder.work_folder(_out_dir(tiny_config), "tmp", os.getppid())  # a build running now
  live.mkdir()
  keep = [parent / f".{tiny_config.data.name}.backup", parent / "notes"]
  for k in keep:
    k.mkdir()
    (k / "train.bin").write_text("mine")
  said = []
  assert data.load_corpus(tiny_config.data, tok, log=said.append)[1] == manifest
  assert not (parent / dead[0]).exists() and live.exists()
  assert all((k / "train.bin").read_text() == "mine" for k in keep)
  assert any("removed" in line for line in said), said


class _Interrupt(BaseException):
  """Stands for a KeyboardInterrupt, which no clean-up in the code under test catches."""


def test_a_rebuild_interrupted_in_this_process_is_put_back_by_its_next_load(tiny_config,
                                                                           monkeypatch):
  _, manifest = _prepare(tiny_config)
  rename = pathlib.Path.rename

  def interrupted(self, target):
    if pathlib.Path(target).name == tiny_config.data.name:
      raise _Interrupt
    return rename(self, target)
  monkeypatch.setattr(pathlib.Path, "rename", interrupted)
  tiny_config.data.rebuild = True
  with pytest.raises(_Interrupt):
    _prepare(tiny_config)
  monkeypatch.setattr(pathlib.Path, "rename", rename)
  assert not _out_dir(tiny_config).exists()
  tiny_config.data.rebuild = False
  monkeypatch.setattr(data, "build_corpus", lambda *_, **__: pytest.fail("prepared again"))
  assert _prepare(tiny_config)[1] == manifest and _work_folders(tiny_config) == []
