"""Continue prompts with a trained run:

  python -m minigpt_jax.sample --checkpoint checkpoints/small --prompt "def "
"""

import json
import pathlib
import sys
import time

from absl import flags

from minigpt_jax.errors import UserError, run_cli

_CKPT = flags.DEFINE_string("checkpoint", None, "Run directory (latest step), or its ckpt/<step>; "
                            "default: the most recently saved run in checkpoints/.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt; repeat for several (default: 'def ').")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "File whose whole text is one more prompt.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Characters to generate per sample "
                                "(the default shrinks to fit the model's context).")
_TEMP = flags.DEFINE_float("temperature", 0.8, "Softmax temperature (> 0).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely characters; 0 = off.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass; 1.0 = off.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed: same seed and flags, same text.")
_NUM = flags.DEFINE_integer("num_samples", 1, "Samples per prompt.")
_GREEDY = flags.DEFINE_bool("greedy", False, "Always take the most likely character.")
_NO_CACHE = flags.DEFINE_bool("no_cache", False, "Rerun the full forward pass each step (reference).")
_STOP = flags.DEFINE_bool("stop_at_eos", True, "End a sample at <eos> (end of file).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of text.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: auto).")


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _NUM.value < 1:
    raise UserError(f"--num_samples must be >= 1, got {_NUM.value}")
  prompts = list(_PROMPT.value or [])
  if _PROMPT_FILE.value:
    try:
      prompts.append(pathlib.Path(_PROMPT_FILE.value).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
      raise UserError(f"cannot read --prompt_file: {e}")
  prompts = prompts or ["def "]

  from minigpt_jax import checkpoint, generate, sampling, tokenizer  # after flag parsing: --help stays fast
  try:
    cfg_sampling = sampling.SamplingConfig(temperature=_TEMP.value, top_k=_TOP_K.value,
                                           top_p=_TOP_P.value, greedy=_GREEDY.value)
  except ValueError as e:
    raise UserError(str(e))
  path = _CKPT.value or checkpoint.most_recent_run()
  if not _CKPT.value:
    print(f"[sampling from {path}]", file=sys.stderr)
  params, cfg, tok, _, step, _ = checkpoint.load_for_inference(path, _STEP.value, _DTYPE.value)
  rows = [p for p in prompts for _ in range(_NUM.value)]
  max_new = _MAX_NEW.value
  if not flags.FLAGS["max_new_tokens"].present:  # the default shrinks to fit small contexts
    room = tokenizer.room_after_prompt(max(len(p) for p in prompts), cfg.context_len)
    max_new = max(1, min(max_new, room))
  t0 = time.perf_counter()
  texts = generate.generate_text(
      params, cfg, tok, rows, max_new_tokens=max_new, sampling=cfg_sampling,
      seed=_SEED.value, use_cache=not _NO_CACHE.value, stop_at_eos=_STOP.value)
  seconds = time.perf_counter() - t0
  if _JSON.value:
    out = {"checkpoint": path, "step": step, "seed": _SEED.value,
           "cache": not _NO_CACHE.value, "seconds": seconds,
           "samples": [{"prompt": p, "index": i % _NUM.value, "text": t}
                       for i, (p, t) in enumerate(zip(rows, texts))]}
    print(json.dumps(out, indent=1))
    return
  for i, (p, t) in enumerate(zip(rows, texts)):
    if len(rows) > 1:
      print(f"=== prompt {i // _NUM.value}, sample {i % _NUM.value} ===")
    sys.stdout.write(p + t + "\n")
  print(f"[step {step}, {len(rows)} x {max_new} tokens in {seconds:.2f}s incl. compile, "
        f"{'no cache' if _NO_CACHE.value else 'KV cache'}]", file=sys.stderr)


if __name__ == "__main__":
  run_cli(main)
