"""What the checkpoints' integrity check costs: a save and a restore of a config's whole
train state (parameters and Adam state, fresh: no training), with the checksums and
without, alternated A B A B in one process.

  python scripts/checkpoint_integrity_cost.py configs/small.py configs/full.py [--rounds 5]

"with": `checkpoints.save` / `checkpoints.restore` (CRC-32 of every array recorded in the
"meta" item, recomputed and compared at restore). "without": the same Orbax calls with the
same items and no checksums (as before the check). A save is timed until it is on disk
(`wait_until_finished`); "blocking" is the part the training loop waits for (the checksums
are taken there, before Orbax's background write). Each restore reads the step the round
saved last, from the page cache alike for both.
"""

import argparse
import importlib.util
import pathlib
import statistics
import tempfile
import time

import jax
import orbax.checkpoint as ocp

from minigpt_jax import checkpoints, hardware, sharding, train_step
from minigpt_jax.model import ModelConfig, param_count
from minigpt_jax.tokenizer import CharTokenizer

parser = argparse.ArgumentParser()
parser.add_argument("configs", nargs="+")
parser.add_argument("--rounds", type=int, default=5)
args = parser.parse_args()


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def save_without(mngr, step, params, opt_state, meta):
  mngr.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
      meta=ocp.args.JsonSave(meta)), force=True)


def restore_without(mngr, step, abstract):
  args = {k: ocp.args.StandardRestore(v) for k, v in abstract.items()}
  return dict(mngr.restore(step, args=ocp.args.Composite(**args, meta=ocp.args.JsonRestore())))


def timed(fn):
  t0 = time.perf_counter()
  out = fn()
  jax.block_until_ready(out)
  return time.perf_counter() - t0


for path in args.configs:
  c = load_config(path)
  cfg = hardware.resolve(ModelConfig.from_section(c.model, CharTokenizer().vocab_size))
  mesh = sharding.make_mesh(c.mesh)
  tx, abstract, state_sh = train_step.state_layout(c, cfg, mesh)
  state = train_step.fresh_state(c, cfg, tx, state_sh)
  target = sharding.with_shardings(abstract, state_sh)
  items = {"params": target.params, "opt_state": target.opt_state}
  n_bytes = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
  times = {k: [] for k in ("save with", "save without", "blocking with", "blocking without",
                           "restore with", "restore without", "checksums alone")}
  with tempfile.TemporaryDirectory() as tmp:
    mngr = ocp.CheckpointManager(pathlib.Path(tmp) / "ckpt",
                                 options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    meta = {"step": 0, "corpus_sha256": "0" * 64}
    step = 0
    for r in range(args.rounds + 1):  # round 0 warms up (first save, first restore)
      for kind, save in (("with", checkpoints.save), ("without", save_without)):
        step += 1
        t0 = time.perf_counter()
        save(mngr, step, state.params, state.opt_state, meta)
        blocking = time.perf_counter() - t0
        mngr.wait_until_finished()
        total = time.perf_counter() - t0
        restore = timed(lambda: (checkpoints.restore(mngr, step, items) if kind == "with"
                                 else restore_without(mngr, step, items)))
        if r:
          times[f"save {kind}"].append(total)
          times[f"blocking {kind}"].append(blocking)
          times[f"restore {kind}"].append(restore)
      if r:
        times["checksums alone"].append(timed(
            lambda: [checkpoints.checksums(state.params), checkpoints.checksums(state.opt_state)]))
    mngr.close()
  med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
  print(f"{path}: {param_count(state.params):,} parameters, {n_bytes / 2**20:.1f} MiB of "
        f"parameters and Adam state, {args.rounds} rounds (median ms; min-max)")
  for k, v in times.items():
    print(f"  {k:17s} {med[k]:8.1f}   ({min(v) * 1e3:.1f}-{max(v) * 1e3:.1f})")
  for what in ("save", "blocking", "restore"):
    print(f"  {what} with / without: {med[what + ' with'] / med[what + ' without']:.2f}x "
          f"(+{med[what + ' with'] - med[what + ' without']:.0f} ms)")
