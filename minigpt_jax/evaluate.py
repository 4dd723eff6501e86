"""Evaluate a checkpoint: loss over the whole validation split (and any other folders of
Python), and the syntactic validity of samples.

  python -m minigpt_jax.evaluate --checkpoint checkpoints/small [--step N]
      [--extra_corpus DIR ...] [--num_samples 64] [--max_new_tokens 256] [--json_out PATH]

Loss is scored over non-overlapping context windows that cover the text, each
starting from an empty context, so it is deterministic and comparable across
runs with the same context length (the sliding-window loss would be lower).
"""

import functools
import json
import math
import pathlib
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from minigpt_jax import checkpoint, data, syntax, training
from minigpt_jax.errors import UserError, run_cli
from minigpt_jax.model import ModelConfig
from minigpt_jax.sampling import SamplingConfig
from minigpt_jax.tokenizer import EOS_ID, CharTokenizer, room_after_prompt

# Each prompt opens a top-level statement; samples cycle through them.
PROMPTS = ("def ", "class ", "import ", "for ", "if __name__")
SAMPLING = SamplingConfig(temperature=0.8, top_p=0.95)


def split_loss(params, cfg: ModelConfig, ids_N: np.ndarray, batch_size: int) -> dict:
  """Loss over all of `ids_N` (every token but the first is predicted once).

  Returns {"nats_per_char", "bits_per_char", "chars": tokens scored}.
  """
  if ids_N.size < 2:
    raise UserError(f"cannot score {ids_N.size} token(s): at least 2 are needed")
  eval_fn = jax.jit(functools.partial(training.eval_step, cfg=cfg))
  nats, count = training.evaluate_split(eval_fn, params, jnp.asarray(ids_N), cfg.context_len,
                                        batch_size, max_windows=None)
  return {"nats_per_char": nats, "bits_per_char": nats / math.log(2), "chars": count}


def encode_folder(folder: str, tok: CharTokenizer,
                  max_file_chars: int = 0) -> tuple[np.ndarray, int]:
  """Encodes the .py files under `folder` as `data.build_corpus` does, writing nothing.

  Files are walked in sorted order (skipping `data.SKIP_DIRS`), each taken or left out by
  `data.encode_file` (pass the run's `data.max_file_chars`), and each followed by `<eos>`.
  Returns (uint8 ids, number of files).
  """
  root = pathlib.Path(folder).expanduser()
  if not root.is_dir():
    raise UserError(f"--extra_corpus {folder!r} is not a directory")
  parts, n_files = [], 0
  for path in data.python_files(root):
    ids, _, _, skip = data.encode_file(path, tok, max_file_chars)
    if not skip:
      parts += [ids, np.array([EOS_ID], np.uint8)]
      n_files += 1
  if not parts:
    raise UserError(f"--extra_corpus {folder!r} holds no non-empty .py files")
  return np.concatenate(parts), n_files


def syntax_validity(params, cfg: ModelConfig, tok: CharTokenizer, num_samples: int,
                    max_new_tokens: int, seed: int = 0,
                    sampling: SamplingConfig = SAMPLING) -> dict:
  """Samples `num_samples` continuations of `PROMPTS` (in turn) and checks their syntax.

  Returns `syntax.sample_validity`'s dict plus "by_prompt" rates.
  """
  prompts = [PROMPTS[i % len(PROMPTS)] for i in range(num_samples)]
  result = syntax.sample_validity(params, cfg, tok, prompts, max_new_tokens=max_new_tokens,
                                  sampling=sampling, seed=seed)
  result["by_prompt"] = {}
  for p in PROMPTS:
    rows = [s["kept_chars"] for q, s in zip(prompts, result["samples"]) if q == p]
    if rows:
      result["by_prompt"][p] = {"n": len(rows), "rate": sum(k > 0 for k in rows) / len(rows)}
  return result


def evaluate_checkpoint(path: str, step: int | None = None, extra_corpora=(),
                        num_samples: int = 64, max_new_tokens: int = 256,
                        batch_size: int | None = None, seed: int = 0,
                        compute_dtype: str | None = None, log=print) -> dict:
  """Loads a checkpoint and measures it. Returns the report `write_report` saves.

  Args:
    path: a run directory (latest step) or its ckpt/<step> folder.
    step: checkpoint step, overriding the one `path` names.
    extra_corpora: folders of .py files, each scored like the validation split.
    num_samples: samples for the syntax check (0 skips it).
    max_new_tokens: characters per sample, lowered to fit the context if needed.
    batch_size: windows per evaluation batch (default: the run's train.batch_size).
    seed: sampling seed.
    compute_dtype: "float32" or "bfloat16" (default: "auto" as in training, resolved here).
  """
  if num_samples < 0 or max_new_tokens < 1:
    raise UserError("num_samples must be >= 0 and max_new_tokens >= 1")
  for folder in extra_corpora:  # before the slow part
    if not pathlib.Path(folder).expanduser().is_dir():
      raise UserError(f"--extra_corpus {folder!r} is not a directory")
  params, cfg, tok, run_config, step, run_dir = checkpoint.load_for_inference(
      path, step, compute_dtype)
  batch_size = batch_size or run_config.train.batch_size
  corpora = {folder: encode_folder(folder, tok, run_config.data.max_file_chars)
             for folder in extra_corpora}

  t0 = time.perf_counter()
  splits, manifest = data.load_corpus(run_config.data, tok, log=log, build=False)  # never builds
  corpus = pathlib.Path(run_config.data.dir) / run_config.data.name
  if checkpoint.trained_on(run_dir, step)[1] != manifest["splits"]["train"]["sha256"]:
    raise UserError(f"{corpus} is not the corpus step {step} was trained on (rebuilt since?): "
                    "its val split may hold text the model trained on. Only the same sources "
                    f"with the data settings in {run_dir / 'config.json'} rebuild that corpus")
  out = {"run_dir": str(run_dir), "step": step, "batch_size": batch_size,
         "context_len": cfg.context_len, "compute_dtype": cfg.compute_dtype,
         "attention_impl": cfg.attention_impl}
  out["val"] = {"corpus": str(corpus),
                **split_loss(params, cfg, splits["val"], batch_size)}
  out["extra_corpora"] = {}
  for folder, (ids, n_files) in corpora.items():
    out["extra_corpora"][folder] = {"files": n_files, **split_loss(params, cfg, ids, batch_size)}
  out["loss_seconds"] = time.perf_counter() - t0

  if num_samples:
    fit = room_after_prompt(max(len(p) for p in PROMPTS), cfg.context_len)
    if fit < 1:
      raise UserError(f"context length {cfg.context_len} leaves no room to sample after "
                      f"the prompts {PROMPTS}")
    if max_new_tokens > fit:
      log(f"max_new_tokens {max_new_tokens} lowered to {fit} to fit the context")
    t0 = time.perf_counter()
    out["syntax"] = {"prompts": list(PROMPTS), "seed": seed,
                     "max_new_tokens": min(max_new_tokens, fit),
                     "temperature": SAMPLING.temperature, "top_p": SAMPLING.top_p,
                     **syntax_validity(params, cfg, tok, num_samples, min(max_new_tokens, fit),
                                       seed)}
    out["syntax_seconds"] = time.perf_counter() - t0
  return out


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
              f"{s['mean_kept_fraction']:.1%} of the sample"]
    for p, r in s["by_prompt"].items():
      lines.append(f"  {p!r:<14} {r['rate']:>6.1%} of {r['n']}")
  return "\n".join(lines)


def write_report(out: dict, json_out: str | None = None) -> pathlib.Path:
  """Writes the result as JSON (default: <run_dir>/eval_step<step>.json)."""
  path = pathlib.Path(json_out or pathlib.Path(out["run_dir"]) / f"eval_step{out['step']}.json")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(out, indent=1))
  return path


def main(argv):
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.batch_size < 0:
    raise UserError(f"--batch_size must be >= 0, got {FLAGS.batch_size}")
  if FLAGS.json_out and pathlib.Path(FLAGS.json_out).is_dir():
    raise UserError(f"--json_out {FLAGS.json_out} is a folder; give a file path")
  path = FLAGS.checkpoint or checkpoint.most_recent_run()
  out = evaluate_checkpoint(
      path, FLAGS.step, extra_corpora=FLAGS.extra_corpus or (),
      num_samples=FLAGS.num_samples, max_new_tokens=FLAGS.max_new_tokens,
      batch_size=FLAGS.batch_size or None, seed=FLAGS.seed, compute_dtype=FLAGS.dtype)
  print(format_report(out))
  print(f"\nwrote {write_report(out, FLAGS.json_out)}")


def define_flags() -> None:
  """The CLI's flags; defined only when run as a program, so that importing this
  module next to `minigpt_jax.sample` (same flag names) does not clash."""
  flags.DEFINE_string("checkpoint", None, "Run directory (latest step), or its ckpt/<step>.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_multi_string("extra_corpus", None, "Folder of .py files to score too; repeatable.")
  flags.DEFINE_integer("num_samples", 64, "Samples for the syntax check; 0 = skip it.")
  flags.DEFINE_integer("max_new_tokens", 256, "Characters per sample (lowered to fit the context).")
  flags.DEFINE_integer("batch_size", 0, "Windows per eval batch; 0 = the run's train.batch_size.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: auto).")
  flags.DEFINE_string("json_out", None, "JSON report path (default: <run>/eval_step<step>.json).")


if __name__ == "__main__":
  define_flags()
  run_cli(main)
