"""The Python-source corpus: build it once into `data/<name>/`, then load and batch it.

A prepared corpus is `train.bin` and `val.bin` (uint8 token ids, files separated
by `<eos>`) and `manifest.json` (settings, sources, sizes, sha256, dropped
characters). Loading checks the manifest against the settings and the files
against their sha256, so a stale or corrupt corpus is refused, not used.
"""

import hashlib
import json
import os
import pathlib
import sys
import sysconfig
import tempfile
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from minigpt_jax import sharding
from minigpt_jax.errors import UserError
from minigpt_jax.tokenizer import EOS_ID, CharTokenizer

FORMAT_VERSION = 1
SPLITS = ("train", "val")


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


def encode_source(raw: bytes, tok: CharTokenizer) -> tuple[np.ndarray, int, int]:
  """Source bytes -> token ids, with newlines normalised to \\n (tabs kept).

  Returns (ids, non-ASCII characters dropped, other out-of-vocabulary characters dropped).
  """
  text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
  ascii_bytes = text.encode("ascii", errors="ignore")
  ids, n_control = tok.encode_bytes(ascii_bytes)
  return ids, len(text) - len(ascii_bytes), n_control


def encode_file(path: pathlib.Path, tok: CharTokenizer, max_file_chars: int):
  """One source file as the corpus takes it: (ids, non-ASCII dropped, others dropped, skip),
  where `skip` says why the file is left out ("unreadable", "too_large", "empty") or is None.
  `max_file_chars` 0 means no limit."""
  try:
    ids, n_non_ascii, n_control = encode_source(path.read_bytes(), tok)
  except OSError:
    return None, 0, 0, "unreadable"
  if max_file_chars and ids.size > max_file_chars:
    return None, 0, 0, "too_large"
  if ids.size == 0:
    return None, 0, 0, "empty"
  return ids, n_non_ascii, n_control, None


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

  With `keep_train_sha256` (the train split a resumed run was trained on), a corpus whose
  train split differs is refused before anything is written.
  """
  spec = spec_of(data_cfg)
  roots = [pathlib.Path(r) for r in spec["roots"]]
  parts = {s: [] for s in SPLITS}
  files = {s: [] for s in SPLITS}
  dropped = {"non_ascii": 0, "control": 0}
  skipped = {"too_large": 0, "over_cap": 0, "unreadable": 0, "empty": 0}
  total, t0 = 0, time.time()
  for i, root in enumerate(roots):
    nested = [r for r in roots if r != root and root in r.parents]  # walked as their own root
    for path in python_files(root, nested):
      rel = f"{i}:{path.relative_to(root).as_posix()}"
      ids, n_non_ascii, n_control, skip = encode_file(path, tok, spec["max_file_chars"])
      if skip:
        skipped[skip] += 1
        continue
      if spec["max_chars"] and total + ids.size + 1 > spec["max_chars"]:
        skipped["over_cap"] += 1
        continue
      dropped["non_ascii"] += n_non_ascii
      dropped["control"] += n_control
      split = "val" if is_val_file(rel, spec["val_fraction"]) else "train"
      parts[split] += [ids, np.array([EOS_ID], np.uint8)]
      files[split].append([rel, int(ids.size)])
      total += ids.size + 1
    log(f"corpus: {root}: {total:,} chars so far ({time.time() - t0:.1f}s)")
  arrays = {s: np.concatenate(parts[s]) if parts[s] else np.zeros(0, np.uint8) for s in SPLITS}
  for s in SPLITS:
    if arrays[s].size < 2:
      raise UserError(f"the corpus has no {s} text: roots {spec['roots']} hold too few .py files")
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
  _write_atomically(out_dir, arrays, manifest)
  return manifest


def _fingerprint(files: dict) -> str:
  return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _write_atomically(out_dir: pathlib.Path, arrays: dict, manifest: dict) -> None:
  """Writes into a fresh folder, then swaps it in: a crash leaves the old corpus intact."""
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
  for s in SPLITS:
    arrays[s].tofile(tmp / f"{s}.bin")
  (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
  old = None
  if out_dir.exists():
    old = out_dir.with_name(f".{out_dir.name}.old.{os.getpid()}")
    out_dir.rename(old)
  tmp.rename(out_dir)
  if old is not None:
    for f in old.iterdir():
      f.unlink()
    old.rmdir()


def load_corpus(data_cfg, tok: CharTokenizer, log=print, build: bool = True,
                keep_train_sha256: str | None = None) -> tuple[dict, dict]:
  """Returns ({"train": ids, "val": ids}, manifest), preparing the corpus on first use
  (or, with `build=False`, refusing to). `keep_train_sha256`: see `build_corpus`."""
  out_dir = pathlib.Path(data_cfg.dir) / data_cfg.name
  manifest_path = out_dir / "manifest.json"
  if not build and not manifest_path.exists():
    raise UserError(f"no prepared corpus at {out_dir} (the run's data.dir/data.name)")
  if build and (data_cfg.rebuild or not manifest_path.exists()):
    if out_dir.exists() and not manifest_path.exists() and any(out_dir.iterdir()):
      raise UserError(f"{out_dir} exists but has no manifest.json; move it away or pick "
                      "another --config.data.name")
    log(f"corpus: preparing {out_dir} from {list(data_cfg.roots)}")
    manifest = build_corpus(data_cfg, out_dir, tok, log, keep_train_sha256)
    log(f"corpus: {manifest['splits']['train']['chars']:,} train / "
        f"{manifest['splits']['val']['chars']:,} val chars from "
        f"{manifest['splits']['train']['files'] + manifest['splits']['val']['files']} files")
  try:
    manifest = json.loads(manifest_path.read_text())
    recorded = manifest["spec"]
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f"{manifest_path} is unreadable ({e}); rebuild with --config.data.rebuild=True")
  # A reader (build=False) takes the corpus as recorded; a builder checks it is current.
  if build and recorded != (wanted := spec_of(data_cfg)):
    diff = ", ".join(f"{k}: prepared {recorded.get(k)!r} vs config {wanted[k]!r}"
                     for k in wanted if recorded.get(k) != wanted[k])
    raise UserError(f"prepared corpus {out_dir} is stale ({diff}); rebuild it with "
                    "--config.data.rebuild=True or choose another --config.data.name")
  if manifest.get("tokenizer") != tok.to_dict():
    raise UserError(f"prepared corpus {out_dir} used another tokenizer; rebuild with "
                    "--config.data.rebuild=True")
  splits = {}
  for s in SPLITS:
    path = out_dir / f"{s}.bin"
    ids = np.fromfile(path, np.uint8) if path.exists() else np.zeros(0, np.uint8)
    if hashlib.sha256(ids.tobytes()).hexdigest() != manifest["splits"][s]["sha256"]:
      raise UserError(f"{path} does not match its sha256 in the manifest (corrupt or edited); "
                      "rebuild with --config.data.rebuild=True")
    splits[s] = ids
  return splits, manifest


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


def get_batch(data_N: jax.Array, key: jax.Array, batch_size: int, context_len: int):
  """Random windows of `data_N`: inputs [B, T] and targets shifted by one. Jittable.

  The batch is a pure function of `key`, so a run that derives `key` from
  (seed, step) sees the same batches after a restart.
  """
  starts_B = jax.random.randint(key, (batch_size,), 0, data_N.shape[0] - context_len)
  window = lambda s: jax.lax.dynamic_slice(data_N, (s,), (context_len + 1,))
  seq_BT1 = jax.vmap(window)(starts_B).astype(jnp.int32)
  return seq_BT1[:, :-1], seq_BT1[:, 1:]


def eval_windows(n_tokens: int, context_len: int, max_windows: int | None = None) -> np.ndarray:
  """Start offsets of non-overlapping windows covering a split (evenly thinned to
  `max_windows`); each window scores the `context_len` tokens after its start."""
  starts = np.arange(0, n_tokens - 1, context_len)
  if max_windows is not None and starts.size > max_windows:
    starts = starts[np.linspace(0, starts.size - 1, max_windows).round().astype(int)]
  return starts
