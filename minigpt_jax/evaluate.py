"""Evaluate a checkpoint: loss over the whole validation split (and any other folders of
Python), and the syntactic validity of samples.

  python -m minigpt_jax.evaluate --checkpoint checkpoints/small [--step N]
      [--extra_corpus DIR ...] [--num_samples 64] [--max_new_tokens N] [--json_out PATH]
"""


from absl import flags

from minigpt_jax import cli
from minigpt_jax.errors import UserError

_CKPT = flags.DEFINE_string("checkpoint", None, "Run directory (latest step), or its ckpt/<step>; "
                            "default: the most recently saved run in checkpoints/.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_EXTRA = flags.DEFINE_multi_string("extra_corpus", None,
                                   "Folder of .py files to score too; repeatable.")
_NUM = flags.DEFINE_integer("num_samples", 64, "Samples for the syntax check; 0 = skip it.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "Characters per sample (default: "
                                "the run's sample.max_new_tokens; configs/small.py: 600).")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Windows per eval batch; 0 = the run's "
                              "train.batch_size.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: auto).")
_JSON_OUT = flags.DEFINE_string("json_out", None,
                                "JSON report path (default: <run>/eval_step<step>.json).")


def main(_):
  if _BATCH.value < 0:
    raise UserError(f"--batch_size must be >= 0, got {_BATCH.value}")
  if _JSON_OUT.value:
    cli.check_output_path(_JSON_OUT.value, "--json_out")
  cli.check_seed(_SEED.value)
  from minigpt_jax import runs, scoring  # after flag parsing: --help stays fast
  path = _CKPT.value or runs.most_recent()
  if not _JSON_OUT.value:  # the default, <run>/eval_step<step>.json: writable? Now, not after
    run_dir, step = runs.locate(path, _STEP.value)
    cli.check_output_path(run_dir / f"eval_step{step}.json", "--json_out")
  out = scoring.evaluate_checkpoint(
      path, _STEP.value, extra_corpora=_EXTRA.value or (),
      num_samples=_NUM.value, max_new_tokens=_MAX_NEW.value, batch_size=_BATCH.value or None,
      seed=_SEED.value, compute_dtype=_DTYPE.value)
  try:
    print(scoring.format_report(out))
  finally:  # also when stdout is closed (`| head`): the report file keeps the evaluation
    # Named after the step evaluated, which may be older than the newest (a damaged one skipped).
    print(f"\nwrote {scoring.write_report(out, _JSON_OUT.value)}")


if __name__ == "__main__":
  cli.run(main)
