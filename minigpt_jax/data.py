"""The Python-source corpus: build it once into `data/<name>/`, then load it.

Loading checks the manifest against the settings and the splits against their sha256, so a
stale or corrupt corpus is refused, not used. The folder itself (its files, writing it
atomically, putting it back after a killed rebuild) is `corpus_folder`'s.
"""

import codecs
import hashlib
import json
import os
import pathlib
import stat
import sys
import sysconfig
import time
from typing import Iterator

import jax
import numpy as np

from minigpt_jax import corpus_folder, sharding
from minigpt_jax.corpus_folder import SPLITS
from minigpt_jax.errors import UserError
from minigpt_jax.tokenizer import EOS_ID, CharTokenizer

FORMAT_VERSION = 1


def resolve_root(root: str) -> pathlib.Path:
  """"stdlib" and "site-packages" name the running interpreter's; anything else is a path."""
  if root == "stdlib":
    return pathlib.Path(sysconfig.get_paths()["stdlib"])
  if root == "site-packages":
    return pathlib.Path(sysconfig.get_paths()["purelib"])
  path = pathlib.Path(root).expanduser().resolve()  # recorded absolute in the manifest
  if not path.is_dir():
    raise UserError(f"corpus root {root!r} is not a directory")
  return path


# Never descended into below a root: installed packages belong to the "site-packages" root.
SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", ".git"}


def python_files(root: pathlib.Path, skip=()) -> Iterator[pathlib.Path]:
  """The *.py files below `root` in sorted order, outside `SKIP_DIRS` and the folders `skip`."""
  for dirpath, dirnames, filenames in os.walk(root):
    here = pathlib.Path(dirpath)
    dirnames[:] = sorted(d for d in dirnames if here / d not in skip and d not in SKIP_DIRS)
    for name in sorted(filenames):
      if name.endswith(".py"):
        yield here / name


READ_CHUNK = 1 << 20  # bytes read at a time: a file over the cap is never read whole


def open_regular(path: pathlib.Path):
  """`path` (after symlinks) opened for reading in binary if it is a regular file, else None:
  a FIFO, socket or device is never read (opening a FIFO waits for a writer, forever)."""
  if not stat.S_ISREG(os.stat(path).st_mode):
    return None
  # Non-blocking, and checked again once open, in case a FIFO took the file's place.
  f = os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb")
  if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
    return f
  f.close()
  return None


def first_sighting(path: pathlib.Path, seen: set) -> bool:
  """False for a file already in `seen` by its resolved path (a repeated or nested root, a
  symlink): a file listed twice could land in both splits. Adds it to `seen`."""
  real = os.path.realpath(path)
  if real in seen:
    return False
  seen.add(real)
  return True


def encode_file(path: pathlib.Path, tok: CharTokenizer, max_file_chars: int):
  """One source file as the corpus takes it, newlines normalised to \\n (tabs kept): (ids,
  non-ASCII characters dropped, other out-of-vocabulary characters dropped, skip), where
  `skip` says why the file is left out ("unreadable", "not_regular", "too_large", "empty")
  or is None. `max_file_chars` 0 means no limit.

  Read READ_CHUNK bytes at a time, stopping as soon as the ids pass `max_file_chars`: a
  huge file costs a chunk's memory and time, not its size; what is counted is the same as
  for the whole file at once."""
  try:
    f = open_regular(path)
    if f is None:
      return None, 0, 0, "not_regular"
    with f:
      ids, n_non_ascii, n_control = _encode_chunks(f, tok, max_file_chars)
  except OSError:
    return None, 0, 0, "unreadable"
  if ids is None:
    return None, 0, 0, "too_large"
  if ids.size == 0:
    return None, 0, 0, "empty"
  return ids, n_non_ascii, n_control, None


def _encode_chunks(f, tok: CharTokenizer, max_file_chars: int):
  """(ids, non-ASCII dropped, control dropped) of the open file `f`, or (None, 0, 0) once
  the ids pass `max_file_chars` (0: no limit)."""
  decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a split character waits
  parts, n_ids, n_non_ascii, n_control, held = [], 0, 0, 0, ""
  while True:
    raw = f.read(READ_CHUNK)
    text = held + decoder.decode(raw, final=not raw)
    held = "\r" if raw and text.endswith("\r") else ""  # may be the first half of "\r\n"
    text = text[:len(text) - len(held)].replace("\r\n", "\n").replace("\r", "\n")
    ascii_bytes = text.encode("ascii", errors="ignore")
    ids, control = tok.encode_bytes(ascii_bytes)
    n_ids += ids.size
    n_non_ascii += len(text) - len(ascii_bytes)
    n_control += control
    if max_file_chars and n_ids > max_file_chars:
      return None, 0, 0
    parts.append(ids)
    if not raw:
      return np.concatenate(parts), n_non_ascii, n_control


def skipped_summary(skipped: dict, max_file_chars: int = 0, max_chars: int = 0) -> str:
  """The files left out, by why: "3 over data.max_file_chars 1000, 1 empty"."""
  why = {"too_large": f"over data.max_file_chars {max_file_chars}", "empty": "empty",
         "unreadable": "unreadable", "not_regular": "not regular files (FIFOs, devices)",
         "duplicate": "duplicates (reached twice, or the text of a file already taken)",
         "over_cap": f"past data.max_chars {max_chars}"}
  return ", ".join(f"{n} {why.get(k, k)}" for k, n in skipped.items() if n) or "none left out"


def is_val_file(relpath: str, val_fraction: float) -> bool:
  """Holds a file out by a hash of its path: stable, and independent of the other files."""
  h = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "little")
  return h / 2**64 < val_fraction


def spec_of(data_cfg) -> dict:
  """The settings a prepared corpus must match."""
  return {
      "format": FORMAT_VERSION,
      "roots": [str(resolve_root(r)) for r in data_cfg.roots],
      "max_chars": int(data_cfg.max_chars),
      "max_file_chars": int(data_cfg.max_file_chars),
      "val_fraction": float(data_cfg.val_fraction),
  }


def build_corpus(data_cfg, out_dir: pathlib.Path, tok: CharTokenizer, log=print,
                 keep_train_sha256: str | None = None) -> dict:
  """Walks the roots, encodes every .py file, and writes the split corpus atomically.

  Only an empty folder or a prepared corpus at `out_dir` is ever replaced. With
  `keep_train_sha256` (the train split a resumed run was trained on), a corpus whose train
  split differs is refused before anything is written.
  """
  corpus_folder.refuse_to_replace(out_dir)  # before the slow part; again before the swap
  spec = spec_of(data_cfg)
  parts, files, dropped, skipped = encode_roots(spec, tok, log)
  arrays = {s: np.concatenate(parts[s]) if parts[s] else np.zeros(0, np.uint8) for s in SPLITS}
  for s in SPLITS:
    if arrays[s].size < 2:
      left_out = skipped_summary(skipped, spec["max_file_chars"], spec["max_chars"])
      raise UserError(f"the corpus has no {s} text: roots {spec['roots']} hold too few usable "
                      f".py files (left out: {left_out})")
  train_sha256 = hashlib.sha256(arrays["train"].tobytes()).hexdigest()
  if keep_train_sha256 and train_sha256 != keep_train_sha256:
    raise UserError(f"the corpus prepared now has another train split than the one the run's "
                    f"checkpoints were trained on (its sources changed); {out_dir} was left as "
                    "it was. Resume from the same sources, or start a new --config.run_name")
  manifest = {
      "spec": spec,
      "python": sys.version.split()[0],
      "sources_fingerprint": _fingerprint(files),
      "splits": {s: {"files": len(files[s]), "chars": int(arrays[s].size),
                     "sha256": hashlib.sha256(arrays[s].tobytes()).hexdigest()} for s in SPLITS},
      "dropped_chars": {**dropped, "why": "non_ascii: outside ASCII; control: ASCII control "
                                         "characters other than newline and tab"},
      "skipped_files": skipped,
      "tokenizer": tok.to_dict(),
      "files": files,
  }
  corpus_folder.write_atomically(out_dir, arrays, manifest)
  return manifest


def encode_roots(spec: dict, tok: CharTokenizer, log) -> tuple[dict, dict, dict, dict]:
  """Each distinct .py file below the roots, once, in the split its name picks. A file is
  taken once by its resolved path, and once by its text (as encoded): a hard link or a copy
  of a file already taken is a duplicate, so one text never lands in both splits.

  Returns (per split: arrays to concatenate, [name, chars] of each file), dropped character
  counts, and skipped file counts by why.
  """
  roots = [pathlib.Path(r) for r in spec["roots"]]
  parts = {s: [] for s in SPLITS}
  files = {s: [] for s in SPLITS}
  dropped = {"non_ascii": 0, "control": 0}
  skipped = {"too_large": 0, "over_cap": 0, "unreadable": 0, "empty": 0, "not_regular": 0,
             "duplicate": 0}
  seen, texts, total, t0 = set(), set(), 0, time.time()
  for i, root in enumerate(roots):
    nested = [r for r in roots if r != root and root in r.parents]  # walked as their own root
    for path in python_files(root, nested):
      if not first_sighting(path, seen):  # kept where first reached: its split stays put
        skipped["duplicate"] += 1
        continue
      rel = f"{i}:{path.relative_to(root).as_posix()}"
      ids, n_non_ascii, n_control, skip = encode_file(path, tok, spec["max_file_chars"])
      if skip:
        skipped[skip] += 1
        continue
      text = hashlib.sha256(ids.tobytes()).digest()
      if text in texts:  # kept where first reached, like a file listed twice
        skipped["duplicate"] += 1
        continue
      if spec["max_chars"] and total + ids.size + 1 > spec["max_chars"]:
        skipped["over_cap"] += 1
        continue
      texts.add(text)
      dropped["non_ascii"] += n_non_ascii
      dropped["control"] += n_control
      split = "val" if is_val_file(rel, spec["val_fraction"]) else "train"
      parts[split] += [ids, np.array([EOS_ID], np.uint8)]
      files[split].append([rel, int(ids.size)])
      total += ids.size + 1
    log(f"corpus: {root}: {total:,} chars so far ({time.time() - t0:.1f}s)")
  return parts, files, dropped, skipped


def _fingerprint(files: dict) -> str:
  return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


# --- loading -------------------------------------------------------------------------------

def load_corpus(data_cfg, tok: CharTokenizer, log=print, build: bool = True,
                keep_train_sha256: str | None = None) -> tuple[dict, dict]:
  """Returns ({"train": ids, "val": ids}, manifest), preparing the corpus on first use
  (or, with `build=False`, refusing to). `keep_train_sha256`: see `build_corpus`."""
  out_dir = pathlib.Path(data_cfg.dir) / data_cfg.name
  corpus_folder.put_back_and_clean(out_dir, log, clean=build)  # a reader removes nothing
  manifest_path = out_dir / "manifest.json"
  if not build and not manifest_path.exists():
    raise UserError(f"no prepared corpus at {out_dir} (the run's data.dir/data.name)")
  if build and (data_cfg.rebuild or not manifest_path.exists()):
    log(f"corpus: preparing {out_dir} from {list(data_cfg.roots)}")
    manifest = build_corpus(data_cfg, out_dir, tok, log, keep_train_sha256)
    log(f"corpus: {manifest['splits']['train']['chars']:,} train / "
        f"{manifest['splits']['val']['chars']:,} val chars from "
        f"{manifest['splits']['train']['files'] + manifest['splits']['val']['files']} files "
        f"({manifest['skipped_files']['duplicate']} duplicates left out)")
  manifest = corpus_folder.read_manifest(out_dir)
  recorded = manifest["spec"]
  # A reader (build=False) takes the corpus as recorded; a builder checks it is current.
  if build and recorded != (wanted := spec_of(data_cfg)):
    diff = ", ".join(f"{k}: prepared {recorded.get(k)!r} vs config {wanted[k]!r}"
                     for k in wanted if recorded.get(k) != wanted[k])
    raise UserError(f"prepared corpus {out_dir} is stale ({diff}); rebuild it with "
                    "--config.data.rebuild=True or choose another --config.data.name")
  if manifest.get("tokenizer") != tok.to_dict():
    raise UserError(f"prepared corpus {out_dir} used another tokenizer; rebuild with "
                    "--config.data.rebuild=True")
  return corpus_folder.read_splits(out_dir, manifest), manifest


def load_corpus_everywhere(data_cfg, tok: CharTokenizer, log=print,
                          keep_train_sha256: str | None = None) -> tuple[dict, dict]:
  """`load_corpus` in a multi-process run: process 0 prepares the corpus while the others
  wait, then they load it (hosts without a shared filesystem need a copy each), and all
  check they hold the same one."""
  result, error = None, None
  if jax.process_index() == 0:
    try:
      result = load_corpus(data_cfg, tok, log, keep_train_sha256=keep_train_sha256)
    except Exception as e:  # raised on every process by the barrier below
      error = e
  sharding.raise_if_lead_failed(error, "preparing the corpus")
  splits, manifest = result or load_corpus(data_cfg, tok, log, build=False)
  sharding.check_same_on_all_processes(
      "".join(manifest["splits"][s]["sha256"] for s in SPLITS), "corpora")
  return splits, manifest
