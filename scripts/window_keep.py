"""How many characters a full window should keep (generate.KEEP_FRACTION), measured on a
trained run: the val bits/char a sample's characters get under each window rule, and the
decode speed of a long sample with it, side by side in one process.

  python scripts/window_keep.py checkpoints/small [--tokens 2000]

Bits/char: the mean per-position loss over val windows, averaged over the positions a
window rule predicts from (keep .. context), i.e. what the characters after a restart and
until the next one cost; "first" is the first character after a restart.
"""

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from minigpt_jax import data, generate, runs
from minigpt_jax.generate import SamplingConfig
from minigpt_jax.model import MiniGPT

parser = argparse.ArgumentParser()
parser.add_argument("run")
parser.add_argument("--tokens", type=int, default=2000)
parser.add_argument("--windows", type=int, default=4096)
parser.add_argument("--repeats", type=int, default=2)
args = parser.parse_args()

run = runs.load_for_inference(args.run)
cfg, C = run.model_cfg, run.model_cfg.context_len
splits, _ = data.load_corpus(run.config.data, run.tokenizer, log=lambda *_: None, build=False)
val = np.asarray(splits["val"])
starts = np.linspace(0, len(val) - C - 2, args.windows).astype(int)


@jax.jit
def position_nats(params, windows_BW):
  logits_BTV, _ = MiniGPT(cfg).apply({"params": params}, windows_BW[:, :-1])
  logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
  return -jnp.take_along_axis(logp_BTV, windows_BW[:, 1:, None], axis=-1)[..., 0].sum(0)


nats_T = np.zeros(C)
for i in range(0, len(starts), 256):
  windows = np.stack([val[s:s + C + 1] for s in starts[i:i + 256]]).astype(np.int32)
  nats_T += np.asarray(position_nats(run.params, jnp.asarray(windows)))
bits_T = nats_T / len(starts) / math.log(2)  # bits_T[w - 1]: predicted from w characters

print(f"{args.run} step {run.step}: context {C}, {len(starts)} val windows")
print(f"in-context mean (positions 1..{C}): {bits_T.mean():.3f} bits/char")
print("by characters of context: " + ", ".join(
    f"{w}: {bits_T[w - 1]:.3f}" for w in sorted({1, 2, 4, 8, 16, 32, C // 2, 3 * C // 4, C - 1, C})))
print("mean over context ranges: " + ", ".join(
    f"{a}-{b}: {bits_T[a - 1:b].mean():.3f}" for a, b in
    [(1, C // 4), (C // 4 + 1, C // 2), (C // 2 + 1, 3 * C // 4), (3 * C // 4 + 1, C)]))
prompt = [run.tokenizer.encode("def ")]
sampling = SamplingConfig(temperature=0.8, top_p=0.95)
keeps = sorted({generate.window_keep(C), *(round(C * f) for f in (0.25, 0.5, 0.75, 0.875)),
                C - 1})
print(f"{'keep':>5} {'restart every':>13} {'bits/char':>9} {'first':>6} "
      + " ".join(f"{'tok/s B' + str(b):>10}" for b in (1, 8)))
timings = {}
for _ in range(args.repeats):  # alternated: every keep once per round
  for keep in keeps:
    for b in (1, 8):
      generate.generate_tokens(run.params, cfg, prompt * b, max_new_tokens=args.tokens,
                               sampling=sampling, keep=keep, stop_at_eos=False)  # compile
      t0 = time.perf_counter()
      generate.generate_tokens(run.params, cfg, prompt * b, max_new_tokens=args.tokens,
                               sampling=sampling, keep=keep, stop_at_eos=False)
      timings.setdefault((keep, b), []).append(b * args.tokens / (time.perf_counter() - t0))
for keep in keeps:
  speeds = " ".join(f"{max(timings[keep, b]):>10,.0f}" for b in (1, 8))
  print(f"{keep:>5} {C - keep + 1:>13} {bits_T[keep - 1:].mean():>9.3f} "
        f"{bits_T[keep - 1]:>6.3f} {speeds}")
