"""A prepared corpus on disk: the folder `data/<name>/` holding `train.bin`, `val.bin`
(uint8 token ids, files separated by `<eos>`) and `manifest.json`; read with its checks,
written atomically, and never replacing a folder that is not a prepared corpus.

A build works beside the folder in `.<name>.tmp.*` (the new corpus being written) and,
for the moment between two renames, `.<name>.old.*` (the corpus being replaced); the next
load puts back an old corpus a killed rebuild left aside and removes what dead builds left.
"""

import hashlib
import json
import os
import pathlib
import re
import secrets
import socket
from typing import Iterator

import numpy as np

from minigpt_jax.errors import UserError, parse_json

SPLITS = ("train", "val")
CORPUS_FILES = ("train.bin", "val.bin", "manifest.json")  # all a prepared corpus folder holds


# Work folders name the host and process that made them, so a dead build's are told apart
# from a live one's (on this host; another host's are never removed).
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def work_folder(out_dir: pathlib.Path, kind: str, pid: int | None = None) -> pathlib.Path:
  """Where a build by `pid` (default: this process) writes ("tmp") or sets the old corpus
  aside ("old"): `.<name>.<kind>.<host>.<pid>.<random tag>`."""
  pid = os.getpid() if pid is None else pid
  return out_dir.with_name(f".{out_dir.name}.{kind}.{_HOST}.{pid}.{secrets.token_hex(4)}")


def _work_folders(out_dir: pathlib.Path) -> Iterator[tuple[pathlib.Path, str, bool | None]]:
  """(folder, kind, whether its build runs: None if unknown) of each folder named by
  `work_folder` for `out_dir`; nothing else."""
  pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.(tmp|old)\.([A-Za-z0-9-]+)\.(\d+)"
                       r"\.[0-9a-f]{8}")
  if not out_dir.parent.is_dir():
    return
  for p in sorted(out_dir.parent.iterdir()):
    m = pattern.fullmatch(p.name)
    if m and p.is_dir() and not p.is_symlink():
      yield p, m[1], _is_running(m[2], int(m[3]))


def _is_running(host: str, pid: int) -> bool | None:
  if host != _HOST:
    return None
  if pid == os.getpid():  # called between builds, never during one: ours are over
    return False
  try:
    os.kill(pid, 0)  # signal 0: only asks whether the process exists
  except ProcessLookupError:
    return False
  except (PermissionError, OverflowError):  # another user's process; a pid out of range
    return True  # cannot tell: taken as running, so its folders are left alone
  return True


def _remove_work_folder(folder: pathlib.Path) -> bool:
  """Removes the corpus files in `folder`, then the folder if that left it empty."""
  try:
    for name in CORPUS_FILES:
      (folder / name).unlink(missing_ok=True)
    folder.rmdir()
  except OSError:
    return False
  return True


def put_back_and_clean(out_dir: pathlib.Path, log, clean: bool) -> None:
  """Puts back a corpus that a rebuild killed between its two renames left aside, and (with
  `clean`) removes the work folders of dead builds."""
  folders = list(_work_folders(out_dir))
  if not os.path.lexists(out_dir):
    aside = [p for p, kind, running in folders
             if kind == "old" and running is not True and _is_complete(p)]
    if aside:
      newest = max(aside, key=lambda p: (p / "manifest.json").stat().st_mtime)
      try:
        newest.rename(out_dir)
        log(f"corpus: put back {out_dir} from {newest.name}, where a rebuild that did not "
            "finish had left it")
      except OSError as e:
        log(f"corpus: could not put back {out_dir} from {newest}: {e}")
  if not clean:
    return
  for p, _, running in folders:
    if running is False and p.exists() and _remove_work_folder(p):
      log(f"corpus: removed {p.name}, left by a build that did not finish")


def _is_complete(folder: pathlib.Path) -> bool:
  """Whether `folder` holds a whole prepared corpus: a manifest and the splits it names."""
  try:
    read_splits(folder, read_manifest(folder))
  except UserError:
    return False
  return True


def _replace_problem(out_dir: pathlib.Path) -> str | None:
  """Why a rebuild may not replace `out_dir` (None: it may). Only an empty folder or a
  prepared corpus is replaced: data.dir/data.name may name any folder of the user's."""
  if out_dir.is_symlink():
    return "it is a symlink, which a rebuild would replace"
  if not out_dir.exists():
    return None
  if not out_dir.is_dir():
    return "it is not a folder"
  entries = {p.name: p for p in out_dir.iterdir()}
  if not entries:
    return None
  if others := sorted(set(entries) - set(CORPUS_FILES)):
    return f"it holds {others[0]!r}, which is not a corpus file"
  if any(p.is_symlink() or not p.is_file() for p in entries.values()):
    return "its files are not all regular files"
  if "manifest.json" not in entries:
    return "it has no manifest.json"
  # A manifest that does not vouch for the folder, in one that is not a whole corpus either.
  if len(entries) < len(CORPUS_FILES) and not _written_here(entries["manifest.json"]):
    return "its manifest.json was not written by this project"
  return None


def _written_here(manifest_path: pathlib.Path) -> bool:
  try:
    manifest = parse_json(manifest_path.read_text())
  except (OSError, ValueError):
    return False
  return isinstance(manifest, dict) and isinstance(manifest.get("spec"), dict) and \
      type(manifest["spec"].get("format")) is int


def refuse_to_replace(out_dir: pathlib.Path) -> None:
  if problem := _replace_problem(out_dir):
    raise UserError(f"{out_dir} is not a prepared corpus ({problem}) and was left as it was; "
                    "move it away or choose another --config.data.name")


def write_atomically(out_dir: pathlib.Path, arrays: dict, manifest: dict) -> None:
  """Writes into a fresh folder, then swaps it in. A crash leaves the old corpus intact: in
  place, or between the two renames aside in `.<name>.old.*`, where the next `load_corpus`
  finds it and puts it back."""
  tmp = work_folder(out_dir, "tmp")
  try:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()  # with the user's umask, like any folder (tempfile.mkdtemp's is 0700)
  except OSError as e:
    raise UserError(f"could not write the corpus into {out_dir.parent}: {e}") from e
  try:
    for s in SPLITS:
      arrays[s].tofile(tmp / f"{s}.bin")
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    refuse_to_replace(out_dir)  # again: the folder may have changed during the build
  except BaseException as e:  # the folder this call made, and only that, is removed
    _remove_work_folder(tmp)
    if isinstance(e, OSError):
      raise UserError(f"could not write the corpus into {out_dir.parent}: {e}") from e
    raise
  old = None
  if out_dir.exists():
    old = work_folder(out_dir, "old")
    out_dir.rename(old)
  tmp.rename(out_dir)
  if old is not None:
    _remove_work_folder(old)



# --- reading ------------------------------------------------------------------------------

def read_manifest(folder: pathlib.Path) -> dict:
  """`folder`'s manifest.json, with the parts loading relies on checked."""
  path = folder / "manifest.json"
  try:
    manifest = parse_json(path.read_text())
  except (OSError, ValueError) as e:
    raise UserError(f"{path} is unreadable ({e}); rebuild with --config.data.rebuild=True")
  if problem := _manifest_problem(manifest):
    raise UserError(f"{path} is damaged ({problem}); rebuild with --config.data.rebuild=True")
  return manifest


def _manifest_problem(manifest) -> str | None:
  if not isinstance(manifest, dict):
    return f"a JSON {type(manifest).__name__}, not an object"
  if not isinstance(manifest.get("spec"), dict):
    return 'no "spec" object'
  if not isinstance(manifest.get("splits"), dict):
    return 'no "splits" object'
  for s in SPLITS:
    split = manifest["splits"].get(s)
    if not isinstance(split, dict) or not {"files", "chars", "sha256"} <= set(split):
      return f'no complete "splits"."{s}"'
  return None


def read_splits(folder: pathlib.Path, manifest: dict) -> dict:
  """The token ids of each split, checked against the manifest's sha256."""
  splits = {}
  for s in SPLITS:
    path = folder / f"{s}.bin"
    try:
      ids = np.fromfile(path, np.uint8) if path.exists() else np.zeros(0, np.uint8)
    except OSError as e:
      raise UserError(f"{path} is unreadable ({e}); rebuild with --config.data.rebuild=True")
    if hashlib.sha256(ids.tobytes()).hexdigest() != manifest["splits"][s]["sha256"]:
      raise UserError(f"{path} does not match its sha256 in the manifest (corrupt or edited); "
                      "rebuild with --config.data.rebuild=True")
    splits[s] = ids
  return splits
