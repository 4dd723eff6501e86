"""Continue prompts with a trained run:

  python -m minigpt_jax.sample --checkpoint checkpoints/small --prompt "def "
"""

import json
import pathlib
import sys
import time

from absl import flags

from minigpt_jax import cli, errors
from minigpt_jax.config import base_config

_DEFAULT = base_config().sample  # temperature, top-k, top-p: the default training and evaluate use
_CKPT = flags.DEFINE_string("checkpoint", None, "Run directory (latest step), or its ckpt/<step>; "
                            "default: the most recently saved run in checkpoints/.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt; repeat for several (default: 'def ').")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "File whose whole text is one more prompt.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 500, "Characters to generate per sample; "
                                "past the context the model keeps its most recent ones "
                                "(--interactive: default half the context).")
_TEMP = flags.DEFINE_float("temperature", _DEFAULT.temperature, "Softmax temperature (> 0).")
_TOP_K = flags.DEFINE_integer("top_k", _DEFAULT.top_k, "Keep the k most likely characters; 0 = off.")
_TOP_P = flags.DEFINE_float("top_p", _DEFAULT.top_p, "Nucleus sampling mass; 1.0 = off.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed: same seed and flags, same text.")
_NUM = flags.DEFINE_integer("num_samples", 1, "Samples per prompt.", lower_bound=1)
_GREEDY = flags.DEFINE_bool("greedy", False, "Always take the most likely character.")
_NO_CACHE = flags.DEFINE_bool("no_cache", False, "Rerun the full forward pass each step (reference).")
_STOP = flags.DEFINE_bool("stop_at_eos", True, "End a sample at <eos> (end of file).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of text.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: auto).")
_STREAM = flags.DEFINE_bool("stream", False, "Print the characters as they are produced (the same "
                            "text; several samples are printed one after another).")
_INTERACTIVE = flags.DEFINE_bool(
    "interactive", False, "Read prompts from stdin and stream each continuation: a line ending "
    "in \\ continues the prompt; an empty line or Ctrl-D exits. --max_new_tokens defaults to "
    "half the context.")


def read_prompts() -> list[str]:
  prompts = list(_PROMPT.value or [])
  if _PROMPT_FILE.value:
    try:
      prompts.append(pathlib.Path(_PROMPT_FILE.value).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
      raise errors.UserError(f"cannot read --prompt_file: {e}")
  return prompts or ["def "]


def check_streaming_flags() -> None:
  mode = "--interactive" if _INTERACTIVE.value else "--stream" if _STREAM.value else None
  if mode and _JSON.value:
    raise errors.UserError(f"{mode} prints text as it is produced; drop --json")
  if mode and _NO_CACHE.value:
    raise errors.UserError(f"{mode} decodes with the KV cache; drop --no_cache")
  if _INTERACTIVE.value and (_PROMPT.value or _PROMPT_FILE.value or _NUM.value != 1):
    raise errors.UserError("--interactive reads each prompt from stdin and answers it once; "
                           "drop --prompt, --prompt_file and --num_samples")


def main(_):
  cli.check_seed(_SEED.value)
  check_streaming_flags()
  prompts = read_prompts()
  from minigpt_jax import generate, interactive, runs  # after flag parsing: fast --help
  sampling = generate.SamplingConfig(temperature=_TEMP.value, top_k=_TOP_K.value,
                                     top_p=_TOP_P.value, greedy=_GREEDY.value)
  path = _CKPT.value or runs.most_recent()
  if not _CKPT.value:
    print(f"[sampling from {path}]", file=sys.stderr)
  run = runs.load_for_inference(path, _STEP.value, _DTYPE.value)
  max_new = _MAX_NEW.value
  if _INTERACTIVE.value:  # by default half the context: prompts of any length, one compile
    if not flags.FLAGS["max_new_tokens"].present:
      max_new = max(1, run.model_cfg.context_len // 2)
    with errors.out_of_memory_names("--max_new_tokens"):
      interactive.loop(run, max_new_tokens=max_new, sampling=sampling, seed=_SEED.value,
                       stop_at_eos=_STOP.value, tty=sys.stdin.isatty())
    return
  rows = [p for p in prompts for _ in range(_NUM.value)]
  t0 = time.perf_counter()
  with errors.out_of_memory_names("--num_samples (or the number of prompts, --max_new_tokens)"):
    if _STREAM.value:  # printed as it is made, a chunk at a time
      pieces = interactive.stream_text(run.params, run.model_cfg, run.tokenizer, rows,
                                       max_new_tokens=max_new, sampling=sampling,
                                       seed=_SEED.value, stop_at_eos=_STOP.value)
      texts = interactive.write_stream(pieces, rows, _NUM.value)
    else:
      texts = generate.generate_text(
          run.params, run.model_cfg, run.tokenizer, rows, max_new_tokens=max_new,
          sampling=sampling, seed=_SEED.value, use_cache=not _NO_CACHE.value,
          stop_at_eos=_STOP.value)
  seconds = time.perf_counter() - t0
  if _JSON.value:
    print(json.dumps({"checkpoint": path, "step": run.step, "seed": _SEED.value,
                      "cache": not _NO_CACHE.value, "seconds": seconds,
                      "samples": [{"prompt": p, "index": i % _NUM.value, "text": t}
                                  for i, (p, t) in enumerate(zip(rows, texts))]}, indent=1))
    return
  for i, (p, t) in enumerate(zip(rows, [] if _STREAM.value else texts)):  # streamed: printed
    if len(rows) > 1:
      print(f"=== prompt {i // _NUM.value}, sample {i % _NUM.value} ===")
    sys.stdout.write(p + t + "\n")
  print(f"[step {run.step}, {len(rows)} x {max_new} tokens in {seconds:.2f}s incl. compile, "
        f"{'no cache' if _NO_CACHE.value else 'KV cache'}]", file=sys.stderr)

if __name__ == "__main__":
  cli.run(main)
