"""Training and decoding throughput as JSON (see BENCHMARKS.md):

  python -m minigpt_jax.bench --config configs/full.py [--config.a.b=value ...] [flags]

A table goes to stderr and one JSON object to stdout (and to --json_out).
"""

import json
import sys

from absl import flags
from ml_collections import config_flags

from minigpt_jax import cli, errors
from minigpt_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/full.py; override fields with --config.a.b=value.",
    lock_config=True)
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", None, "Training batch sizes; default "
                                 "config.train.batch_size; empty = no training benchmark.")
_DECODE_BATCHES = flags.DEFINE_list("decode_batches", ["1", "8"],
                                    "Decode batch sizes; empty = no decoding benchmark.")
_DECODE_TOKENS = flags.DEFINE_integer("decode_tokens", 0, "New tokens per row; 0 = context_len - 1.")
_UNCACHED_TOKENS = flags.DEFINE_integer(
    "uncached_tokens", 0, "New tokens for the uncached path (slow: a full forward pass per "
    "token); 0 = --decode_tokens.")
_SKIP_UNCACHED = flags.DEFINE_bool("skip_uncached", False, "Skip the uncached path.")
_LONG_TOKENS = flags.DEFINE_integer(
    "long_tokens", 2000, "New tokens per row of the long-sample rows (past the context, timed "
    "alternately with a sample that fills it); 0 = none.")
_DECODE_SEGMENT = flags.DEFINE_integer(
    "decode_segment", None, "The cached decode's cache grows this many slots at a time "
    "(default: as when sampling); 0 = allocated whole at the start (every step reads every slot).")
_DECODE_UNROLL = flags.DEFINE_integer(
    "decode_unroll", None, "Decode steps per iteration of the compiled scan loop (default: as "
    "when sampling).")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 10, "Timed steps per repeat.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats; figures are medians.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the JSON here.")
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir", None, "Write a jax.profiler trace of the benchmark here (TensorBoard with "
    "tensorboard-plugin-profile, or the .trace.json.gz in ui.perfetto.dev).")


def main(_):
  config = cli.load_config(_CONFIG)
  json_out = _JSON_OUT.value
  if json_out:  # before the benchmark, not after it
    json_out = cli.check_output_path(json_out, "--json_out")
  from minigpt_jax import throughput  # after flag parsing: --help stays fast
  with errors.out_of_memory_names("--batch_sizes or --decode_batches"):
    result = throughput.run(
        config, batch_sizes=throughput.parse_sizes(_BATCH_SIZES.value, "batch_sizes"),
        decode_batches=throughput.parse_sizes(_DECODE_BATCHES.value, "decode_batches"),
        decode_tokens=_DECODE_TOKENS.value, uncached_tokens=_UNCACHED_TOKENS.value,
        skip_uncached=_SKIP_UNCACHED.value, long_tokens=_LONG_TOKENS.value,
        decode_segment=_DECODE_SEGMENT.value,
        decode_unroll=_DECODE_UNROLL.value, train_steps=_TRAIN_STEPS.value,
        repeats=_REPEATS.value, warmup=_WARMUP.value, profile_dir=_PROFILE_DIR.value,
        command="python -m minigpt_jax.bench " + " ".join(sys.argv[1:]))
  print(throughput.format_table(result), file=sys.stderr, flush=True)
  text = json.dumps(result, indent=1)
  try:
    print(text, flush=True)
  finally:  # also when stdout is closed (`| head`): the file keeps the benchmark
    if json_out:
      try:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text + "\n")
      except OSError as e:  # e.g. a full disk: the JSON is on stdout above
        raise UserError(f"cannot write --json_out {json_out}: {e.strerror or e}")


if __name__ == "__main__":
  cli.run(main)
