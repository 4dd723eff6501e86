#!/usr/bin/env bash
# The GPU acceptance in three stages, in priority order. Each stage is one command planned
# to fit 8 minutes on one H100, writes into its own folder OUT_DIR/STAGE/, and exits
# non-zero when any of its steps failed:
#   headline  `pytest -m gpu` and the full config's benchmark (training at batch 64 and 128,
#             cached decode at batch 1 and 8, uncached at 64 tokens): the headline figures
#   levers    scripts/bench_levers.sh: one benchmark per lever, and their table
#   train     TRAIN_SECONDS (300 by default, corpus build and compile included) of
#             full-config training, stopped by SIGTERM (which saves a checkpoint), then
#             `evaluate` of the step it reached; no checkpoint by then fails the stage
# Every stage starts with scripts/gpu_backend_check.py: when JAX did not load its GPU
# backend (it falls back to the CPU) the stage stops at once with one line naming what JAX
# found, exit status 1. Runs from any directory; BENCHMARKS.md ("GPU") lists what each
# stage writes.
#
#   [CONFIG=configs/full.py] [TRAIN_SECONDS=300] scripts/gpu_acceptance.sh [--dry_run] STAGE OUT_DIR
#
# --dry_run runs the stage's commands on any machine, a CPU is enough, in seconds: the tiny
# config (CONFIG is ignored) with the least work the flags allow, training stopped by the
# same SIGTERM after DRY_TRAIN_SECONDS (45 by default: about three times the tiny run's
# corpus build and compile on a busy 2-core CPU), and the backend check's failure, expected
# without a GPU, reported and passed over. It checks the commands, their flags, the paths
# and the exit statuses, not the figures.
set -uo pipefail
usage="usage: [CONFIG=configs/full.py] [TRAIN_SECONDS=300] scripts/gpu_acceptance.sh [--dry_run] headline|levers|train OUT_DIR"
dry=0
if [[ ${1:-} == --dry_run ]]; then dry=1; shift; fi
if (( $# != 2 )); then echo "$usage" >&2; exit 2; fi
stage=$1
case $stage in headline|levers|train) ;; *) echo "$usage" >&2; exit 2 ;; esac
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# CONFIG is a path from the current directory or from the repository.
config=${CONFIG:-configs/full.py}
[[ $config == /* || ! -f $config ]] || config=$PWD/$config
[[ $config == /* ]] || config=$repo/$config
(( dry )) && config=$repo/configs/tiny.py
if [[ ! -f $config ]]; then echo "no config file $config" >&2; exit 2; fi
mkdir -p "$2/$stage" || exit 2
out=$(cd "$2/$stage" && pwd)
cd "$repo" || exit 2
python=${PYTHON:-python}

# The backend check: its one line is all a machine without a working GPU backend prints.
$python scripts/gpu_backend_check.py > "$out/backend.txt" 2> "$out/backend.log"
status=$?
if (( status != 0 )); then
  if (( ! dry )); then tail -n 1 "$out/backend.log" >&2; exit 1; fi
  echo "== dry run: the backend check exits $status, as it must without a GPU: $(tail -n 1 "$out/backend.log")" >&2
else
  cat "$out/backend.txt" >&2
fi

failed=()
step() { echo "== $(date -u +%H:%M:%S) $stage: $*" >&2; }
check() {  # check NAME STATUS [ACCEPTED_STATUS ...]: records NAME as failed unless STATUS is accepted
  local name=$1 status=$2 ok
  shift 2
  for ok in 0 "$@"; do (( status == ok )) && return 0; done
  echo "== $stage: $name failed (exit $status)" >&2
  failed+=("$name")
}

case $stage in
headline)
  step "pytest -m gpu"
  # One process: the GPU tests share one device.
  $python -m pytest -m gpu -q -n 0 -p no:cacheprovider tests/test_gpu.py > "$out/pytest_gpu.txt" 2>&1
  check "pytest -m gpu" $?
  tail -n 1 "$out/pytest_gpu.txt" >&2

  step "bench"
  bench=(--config "$config" --batch_sizes=64,128 --decode_batches=1,8 --uncached_tokens=64
         --long_tokens=0 --repeats=3)
  (( dry )) && bench+=(--batch_sizes=8 --decode_tokens=4 --uncached_tokens=4 --train_steps=1
                       --warmup=0 --repeats=1)
  $python -m minigpt_jax.bench "${bench[@]}" --json_out="$out/bench.json" > /dev/null 2> "$out/bench.log"
  check bench $?
  tail -n 12 "$out/bench.log" >&2
  ;;
levers)
  step "levers"
  levers=(--repeats=2)
  # Dry, each lever's command runs without training or decoding (the headline stage's dry run
  # runs both): its flags, its XLA_FLAGS and the table are checked.
  (( dry )) && levers+=(--batch_sizes= --decode_batches= --repeats=1)
  CONFIG=$config PYTHON=$python scripts/bench_levers.sh "$out" "${levers[@]}" > /dev/null 2> "$out/levers.log"
  check levers $?
  [[ -f $out/levers.md ]] && cat "$out/levers.md" >&2
  ;;
train)
  seconds=${TRAIN_SECONDS:-300} seconds_name=TRAIN_SECONDS
  train=(--config "$config" --workdir "$out/runs" --config.run_name=acceptance
         --config.train.eval_every=500 --config.train.ckpt_every=500)
  evaluate=(--checkpoint "$out/runs/acceptance" --num_samples 64 --json_out "$out/eval.json")
  if (( dry )); then  # more steps than it has time for: stopped by SIGTERM too
    seconds=${DRY_TRAIN_SECONDS:-45} seconds_name=DRY_TRAIN_SECONDS
    train+=(--config.data.dir="$out/data" --config.train.steps=1000000
            --config.sample.num_samples=1)
    evaluate+=(--num_samples 2 --max_new_tokens 8)
  fi
  # Stopped by time, not by step count: SIGTERM saves a checkpoint at the step reached (the
  # run may also finish first), and `evaluate` then scores it. A SIGTERM before the first
  # step (the corpus build and the compile took all the time) saves nothing: a failure.
  step "train for $seconds s"
  timeout --signal=TERM "$seconds" $python -m minigpt_jax.train "${train[@]}" > "$out/train.log" 2>&1
  check train $? 124  # 124: stopped by the timeout
  tail -n 3 "$out/train.log" >&2

  if ! ls "$out/runs/acceptance/ckpt" 2> /dev/null | grep -qx '[0-9][0-9]*'; then
    echo "== $stage: train failed: no checkpoint was written in $seconds s (the corpus build" \
         "and the compile are in them); raise $seconds_name" >&2
    failed+=("train (no checkpoint)")
  else
    step "evaluate"
    $python -m minigpt_jax.evaluate "${evaluate[@]}" > "$out/eval.txt" 2>&1
    check evaluate $?
    tail -n 12 "$out/eval.txt" >&2
  fi
  ;;
esac

if (( ${#failed[@]} )); then
  step "FAILED: ${failed[*]} (logs in $out)"
  exit 1
fi
step "done: $out"
