#!/usr/bin/env bash
# One `minigpt_jax.bench` run per lever of BENCHMARKS.md, on whatever device JAX finds,
# then a table of the results. Each run changes one thing from the baseline (the full
# config as `"auto"` resolves it: bf16 compute, cuDNN attention on GPU, vocab padded to
# 128, decode cache grown 128 slots at a time). A run that fails is reported and skipped.
#
#   [CONFIG=configs/full.py] scripts/bench_levers.sh OUT_DIR [extra bench flags ...]
#
# Writes OUT_DIR/<lever>.json for each run and OUT_DIR/levers.md (the table); exits 1 when
# a lever failed (the table then has the others). Runs from any directory.
set -u
out=${1:?usage: [CONFIG=configs/full.py] scripts/bench_levers.sh OUT_DIR [extra bench flags ...]}
shift
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
config=${CONFIG:-configs/full.py}  # a path from the current directory or from the repository
[[ $config == /* || ! -f $config ]] || config=$PWD/$config
[[ $config == /* ]] || config=$repo/$config
cd "$repo" || exit 2
python=${PYTHON:-python}
# No long-sample rows: the table has none, and they would take a third of the time.
common=(--config "$config" --batch_sizes=128 --decode_batches=1,8 --long_tokens=0
        --skip_uncached --train_steps=10 --warmup=2 --repeats=3 "$@")
failed=0

lever() {  # lever NAME EXTRA_XLA_FLAGS [bench flags ...]
  local name=$1 xla=$2
  shift 2
  echo "== $name: XLA_FLAGS+='$xla' $*" >&2
  rm -f "$out/$name.json"  # a failed run must not leave an older run's figures behind
  local flags
  flags=$(echo "${XLA_FLAGS:-} $xla" | xargs)  # XLA reads a value not starting with -- as a file
  env ${flags:+XLA_FLAGS="$flags"} $python -m minigpt_jax.bench "${common[@]}" "$@" \
      --json_out="$out/$name.json" > /dev/null
  local status=$?
  if (( status != 0 )); then echo "== $name failed (exit $status)" >&2; failed=1; fi
}

lever baseline ""
lever attention_xla "" --config.model.attention_impl=xla
lever float32 "" --config.model.compute_dtype=float32  # also XLA attention (cuDNN needs 16-bit)
lever vocab_unpadded "" --config.model.vocab_pad_multiple=1
lever decode_unsegmented "" --batch_sizes= --decode_segment=0
lever decode_unroll4 "" --batch_sizes= --decode_unroll=4  # fewer host round trips on GPU
lever decode_unroll16 "" --batch_sizes= --decode_unroll=16
lever no_command_buffers "--xla_gpu_enable_command_buffer="

$python - "$out" <<'PY' || exit 1
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = ["| lever | compute, attention | train batch | train tok/s | MFU | decode b1 tok/s | decode b8 tok/s |",
        "|---|---|---:|---:|---:|---:|---:|"]
for path in sorted(out.glob("*.json"), key=lambda p: (p.stem != "baseline", p.stem)):
  r = json.loads(path.read_text())
  train = max(r["train"]["results"], key=lambda t: t["batch_size"], default=None)
  dec = {d["batch"]: d["tokens_per_s"] for d in r["decode"]["results"] if d["mode"] == "cached"}
  fmt = lambda x: "-" if x is None else f"{x:,.0f}"
  rows.append(f"| {path.stem} | {r['compute_dtype']}, {r['attention_impl']} | "
              f"{fmt(train and train['batch_size'])} | {fmt(train and train['tokens_per_s'])} | "
              f"{'-' if not train or train['mfu'] is None else format(train['mfu'], '.1%')} | "
              f"{fmt(dec.get(1))} | {fmt(dec.get(8))} |")
if len(rows) == 2:
  sys.exit(f"no lever produced a result in {out}")
rows.append(f"\n{r['device_kind']}, jax {r['versions']['jax']}, {r['date']}")
(out / "levers.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
PY
exit $failed
