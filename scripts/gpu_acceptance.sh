#!/usr/bin/env bash
# The whole GPU acceptance in one command (about 10 minutes on one H100): the GPU tests, the
# benchmark, the levers, and a short full-config training followed by `evaluate`. Writes
# into OUT_DIR everything BENCHMARKS.md's GPU section and README's "Full config on a GPU"
# need:
#   pytest_gpu.txt   `pytest -m gpu`
#   bench.json       train at batch 32/64/128, decode at batch 1 and 8 (cached and uncached)
#   levers/          one bench run per lever, and levers.md (the table)
#   train.log        the training run's console; runs/full/ holds its metrics and samples
#   eval.json        `evaluate` of that run
#
#   [CONFIG=configs/full.py] [TRAIN_SECONDS=180] scripts/gpu_acceptance.sh OUT_DIR
set -u
out=${1:?usage: [CONFIG=configs/full.py] [TRAIN_SECONDS=180] scripts/gpu_acceptance.sh OUT_DIR}
config=${CONFIG:-configs/full.py}
mkdir -p "$out"
step() { echo "== $(date -u +%H:%M:%S) $*" >&2; }

step "pytest -m gpu"
python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py > "$out/pytest_gpu.txt" 2>&1
tail -n 3 "$out/pytest_gpu.txt" >&2

step "bench"
python -m minigpt_jax.bench --config "$config" --batch_sizes=32,64,128 --decode_batches=1,8 \
    --uncached_tokens=64 --repeats=5 --json_out="$out/bench.json" > /dev/null \
  || echo "== bench failed" >&2

step "levers"
CONFIG=$config scripts/bench_levers.sh "$out/levers" --repeats=2 > /dev/null

# Stopped by time, not by step count: the run ends with a checkpoint at the step it reached
# (SIGTERM saves one) and the evaluation then scores that step.
step "train for ${TRAIN_SECONDS:-180} s"
timeout --signal=TERM "${TRAIN_SECONDS:-180}" python -m minigpt_jax.train --config "$config" \
    --workdir "$out/runs" --config.train.eval_every=500 --config.train.ckpt_every=500 \
    > "$out/train.log" 2>&1
tail -n 3 "$out/train.log" >&2

step "evaluate"
python -m minigpt_jax.evaluate --checkpoint "$out/runs/$(basename "$config" .py)" \
    --num_samples 64 --json_out "$out/eval.json" > "$out/eval.txt" 2>&1 \
  || echo "== evaluate failed" >&2
tail -n 12 "$out/eval.txt" >&2
step "done: $out"
