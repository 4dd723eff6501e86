"""How good a model is: its loss over a whole split (or any folder of Python), and how
many of its samples parse; `evaluate_checkpoint` puts both into the evaluate report.

Loss is scored over non-overlapping context windows that cover the text, each starting
from an empty context, so it is deterministic and comparable across runs with the same
context length (the sliding-window loss would be lower).
"""

import functools
import json
import math
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from minigpt_jax import data, generate, runs, sharding, syntax
from minigpt_jax.config import base_config
from minigpt_jax.errors import UserError, out_of_memory_names
from minigpt_jax.generate import SamplingConfig
from minigpt_jax.model import ModelConfig
from minigpt_jax.tokenizer import EOS_ID, CharTokenizer
from minigpt_jax.train_step import summed_nats

# Each prompt opens a top-level statement; samples cycle through them.
PROMPTS = ("def ", "class ", "import ", "for ", "if __name__")


# --- loss over a split ----------------------------------------------------------------------

def eval_step(params, split_N: jax.Array, starts_B: jax.Array, *, cfg: ModelConfig,
              batch_sharding=None):
  """Summed nats and token count of the windows at `starts_B` (a window past the end scores 0)."""
  n = split_N.shape[0]
  idx_BW = starts_B[:, None] + jnp.arange(cfg.context_len + 1)
  if batch_sharding is not None:  # each device gathers and scores only its own windows
    idx_BW = jax.lax.with_sharding_constraint(idx_BW, batch_sharding)
  windows_BW = split_N[jnp.minimum(idx_BW, n - 1)].astype(jnp.int32)
  weights_BT = (idx_BW[:, 1:] < n).astype(jnp.float32)
  return summed_nats(params, cfg, windows_BW[:, :-1], windows_BW[:, 1:], weights_BT)


def jit_eval_step(cfg: ModelConfig, mesh=None):
  """`eval_step` jitted; on a mesh, the windows are split over its devices like a batch."""
  if mesh is None:
    return jax.jit(functools.partial(eval_step, cfg=cfg))
  batch_sh = jax.sharding.NamedSharding(mesh, sharding.BATCH)
  return jax.jit(functools.partial(eval_step, cfg=cfg, batch_sharding=batch_sh))


def eval_windows(n_tokens: int, context_len: int, max_windows: int | None = None) -> np.ndarray:
  """Start offsets of non-overlapping windows covering a split (evenly thinned to
  `max_windows`); each window scores the `context_len` tokens after its start."""
  starts = np.arange(0, n_tokens - 1, context_len)
  if max_windows is not None and starts.size > max_windows:
    starts = starts[np.linspace(0, starts.size - 1, max_windows).round().astype(int)]
  return starts


def evaluate_split(eval_fn, params, split_N: jax.Array, context_len: int, batch_size: int,
                   max_windows=None) -> tuple[float, int]:
  """Mean nats per token over non-overlapping windows of a split (all of it by default).

  Deterministic: the windows depend only on the split's length. Returns (nats, tokens).
  """
  starts = eval_windows(split_N.shape[0], context_len, max_windows)
  pad = -starts.size % batch_size
  starts = np.concatenate([starts, np.full(pad, split_N.shape[0], starts.dtype)])
  sums = [eval_fn(params, split_N, jnp.asarray(starts[i:i + batch_size], jnp.int32))
          for i in range(0, starts.size, batch_size)]  # dispatched without waiting
  total, count = np.asarray(jax.device_get(sums), np.float64).sum(axis=0)
  return float(total) / max(float(count), 1.0), int(count)


def split_loss(params, cfg: ModelConfig, ids_N: np.ndarray, batch_size: int) -> dict:
  """Loss over all of `ids_N` (every token but the first is predicted once).

  Returns {"nats_per_char", "bits_per_char", "chars": tokens scored}.
  """
  if ids_N.size < 2:
    raise UserError(f"cannot score {ids_N.size} token(s): at least 2 are needed")
  nats, count = evaluate_split(jit_eval_step(cfg), params, jnp.asarray(ids_N), cfg.context_len,
                               batch_size, max_windows=None)
  return {"nats_per_char": nats, "bits_per_char": nats / math.log(2), "chars": count}


def check_extra_corpus(folder: str) -> pathlib.Path:
  """The folder `folder`, once it is known to be a folder this process can list."""
  root = pathlib.Path(folder).expanduser()
  if not root.is_dir():
    raise UserError(f"--extra_corpus {folder!r} is not a directory")
  try:
    with os.scandir(root):
      pass
  except OSError as e:  # os.walk would skip it silently: "found no .py files"
    raise UserError(f"cannot read --extra_corpus {folder!r}: {e.strerror or e}")
  return root


def encode_folder(folder: str, tok: CharTokenizer,
                  max_file_chars: int = 0) -> tuple[np.ndarray, int]:
  """Encodes the .py files under `folder` with the corpus encoder (`data.encode_roots`: each
  file once, by path and by text, each followed by `<eos>`; the run's `data.max_file_chars`
  applies), writing nothing. Returns (uint8 ids, number of files)."""
  spec = {"roots": [str(check_extra_corpus(folder))], "max_chars": 0, "val_fraction": 0.0,
          "max_file_chars": max_file_chars}
  parts, files, _, skipped = data.encode_roots(spec, tok, log=lambda *_: None)
  if not parts["train"]:  # say what was there: a cap too low reads differently from none
    n = sum(skipped.values())
    found = (f"{n} .py file{'s' * (n != 1)}: {data.skipped_summary(skipped, max_file_chars)}"
             if n else "no .py files")
    raise UserError(f"--extra_corpus {folder!r} holds no non-empty .py files to score "
                    f"(found {found})")
  return np.concatenate(parts["train"]), len(files["train"])


# --- samples that parse --------------------------------------------------------------------

def default_sampling() -> SamplingConfig:
  """The documented default for every command: `config.sample`'s temperature and top-p."""
  s = base_config().sample
  return SamplingConfig(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)


def sample_validity(params, cfg, tok, prompts: list[str], *, max_new_tokens: int, sampling,
                    seed: int = 0) -> dict:
  """Continues each prompt once and checks the syntax of prompt + continuation.

  A sample that stopped at `<eos>` (end of file) may keep its last line; one
  that ran into `max_new_tokens` keeps only statements followed by another
  top-level line. Returns `validity`'s dict plus "samples": [{"text",
  "kept_chars", "ended_at_eos"}].
  """
  # One batch per distinct prompt: rows of other lengths would restart their windows at
  # other steps, each restart a prefill of every row (the text of a row is the same).
  new_BG = np.zeros((len(prompts), max_new_tokens), np.int32)
  for prompt in dict.fromkeys(prompts):
    rows = [i for i, p in enumerate(prompts) if p == prompt]
    new_BG[rows] = generate.generate_tokens(params, cfg, [tok.encode(prompt)] * len(rows),
                                            max_new_tokens=max_new_tokens, sampling=sampling,
                                            seed=seed)
  texts = [p + tok.decode(row, stop_at_eos=True) for p, row in zip(prompts, new_BG)]
  truncated = [not (row == EOS_ID).any() for row in new_BG]
  result = syntax.validity(texts, truncated)
  kept = result.pop("kept_chars")
  result["samples"] = [{"text": t, "kept_chars": k, "ended_at_eos": not tr}
                       for t, k, tr in zip(texts, kept, truncated)]
  return result


# --- the evaluate report --------------------------------------------------------------------

def evaluate_checkpoint(path: str, step: int | None = None, extra_corpora=(),
                        num_samples: int = 64, max_new_tokens: int | None = None,
                        batch_size: int | None = None, seed: int = 0,
                        compute_dtype: str | None = None, log=print) -> dict:
  """Loads checkpoint `path` (a run directory, or its ckpt/<step>; `step` overrides) and
  measures it: the val split and each of `extra_corpora` (folders of .py files) scored
  whole, and `num_samples` samples (0: none) of up to `max_new_tokens` (None: the run's
  sample.max_new_tokens) checked for syntax. `batch_size` None: the run's train.batch_size;
  `compute_dtype` None: "auto", resolved here. Returns the report `write_report` saves."""
  if num_samples < 0 or (max_new_tokens is not None and max_new_tokens < 1):
    raise UserError("num_samples must be >= 0 and max_new_tokens >= 1")
  for folder in extra_corpora:  # before the slow part
    check_extra_corpus(folder)
  run = runs.load_for_inference(path, step, compute_dtype)
  cfg, data_cfg = run.model_cfg, run.config.data
  batch_size = batch_size or run.config.train.batch_size
  corpora = {folder: encode_folder(folder, run.tokenizer, data_cfg.max_file_chars)
             for folder in extra_corpora}

  t0 = time.perf_counter()
  splits, manifest = data.load_corpus(data_cfg, run.tokenizer, log=log, build=False)
  corpus = pathlib.Path(data_cfg.dir) / data_cfg.name
  if run.corpus_sha256 != manifest["splits"]["train"]["sha256"]:
    raise UserError(f"{corpus} is not the corpus step {run.step} was trained on (rebuilt "
                    "since?): its val split may hold text the model trained on. Only the same "
                    f"sources with the data settings in {run.run_dir / 'config.json'} rebuild it")
  with out_of_memory_names("--batch_size"):
    out = {"run_dir": str(run.run_dir), "step": run.step, "batch_size": batch_size,
           "context_len": cfg.context_len, "compute_dtype": cfg.compute_dtype,
           "attention_impl": cfg.attention_impl,
           "val": {"corpus": str(corpus), **split_loss(run.params, cfg, splits["val"], batch_size)},
           "extra_corpora": {folder: {"files": n, **split_loss(run.params, cfg, ids, batch_size)}
                             for folder, (ids, n) in corpora.items()},
           "loss_seconds": time.perf_counter() - t0}
  if num_samples:
    t0 = time.perf_counter()
    with out_of_memory_names("--num_samples (or --max_new_tokens)"):
      out["syntax"] = syntax_report(run, num_samples,
                                    max_new_tokens or run.config.sample.max_new_tokens, seed)
    out["syntax_seconds"] = time.perf_counter() - t0
  return out


def syntax_report(run: runs.LoadedRun, num_samples: int, max_new_tokens: int,
                  seed: int) -> dict:
  """The report's "syntax" section: `sample_validity` of `num_samples` continuations of
  `PROMPTS` (in turn), with its settings and the rate per prompt."""
  cfg, sampling = run.model_cfg, default_sampling()
  prompts = [PROMPTS[i % len(PROMPTS)] for i in range(num_samples)]
  result = sample_validity(run.params, cfg, run.tokenizer, prompts,
                           max_new_tokens=max_new_tokens, sampling=sampling, seed=seed)
  kept = {p: [s["kept_chars"] for q, s in zip(prompts, result["samples"]) if q == p]
          for p in PROMPTS}
  return {"prompts": list(PROMPTS), "seed": seed, "max_new_tokens": max_new_tokens,
          "temperature": sampling.temperature, "top_p": sampling.top_p, **result,
          "by_prompt": {p: {"n": len(k), "rate": sum(c > 0 for c in k) / len(k)}
                        for p, k in kept.items() if k}}


def format_report(out: dict) -> str:
  """A plain-text table of `evaluate_checkpoint`'s result."""
  rows = [("val (" + out["val"]["corpus"] + ")", out["val"])]
  rows += [(folder, r) for folder, r in out["extra_corpora"].items()]
  width = max(len(name) for name, _ in rows)
  lines = [f"{out['run_dir']} at step {out['step']}", "",
           f"{'corpus':<{width}}  {'chars':>12}  {'nats/char':>9}  {'bits/char':>9}"]
  for name, r in rows:
    lines.append(f"{name:<{width}}  {r['chars']:>12,}  {r['nats_per_char']:>9.4f}  "
                 f"{r['bits_per_char']:>9.4f}")
  s = out.get("syntax")
  if s:
    lines += ["", f"syntax validity: {s['valid']}/{s['n']} = {s['rate']:.1%} of samples parse "
                  f"(up to {s['max_new_tokens']} new chars, T={s['temperature']}, "
                  f"top_p={s['top_p']}, seed {s['seed']})",
              f"  kept per sample: {s['mean_kept_chars']:.1f} chars, "
              f"{s['mean_kept_fraction']:.1%} of the sample; whole def/class blocks kept: "
              f"{s['blocks']} ({s['samples_with_blocks']} samples hold one)"]
    for p, r in s["by_prompt"].items():
      lines.append(f"  {p!r:<14} {r['rate']:>6.1%} of {r['n']}")
  return "\n".join(lines)


def write_report(out: dict, json_out: str | None = None) -> pathlib.Path:
  """Writes the result as JSON (default: <run_dir>/eval_step<step>.json)."""
  path = pathlib.Path(json_out or pathlib.Path(out["run_dir"]) / f"eval_step{out['step']}.json")
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
  except OSError as e:  # e.g. a full disk; the evaluate command checks the path beforehand
    raise UserError(f"cannot write the report {path}: {e.strerror or e}; give another "
                    "--json_out PATH")
  return path


