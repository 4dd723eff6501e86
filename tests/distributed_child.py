"""The child process of test_distributed: trains the runs it is given, spies on what
`checkpoints.save` / `checkpoints.restore` see (the live training arrays), and prints one JSON line.

  python tests/distributed_child.py '{"runs": [{config overrides}], ...}'

The number of CPU devices and the distributed runtime are fixed when JAX starts, so each
multi-device case runs in a process of its own; the assertions live in test_distributed.
"""

import json, sys
import jax, numpy as np
from configs import tiny
from minigpt_jax import checkpoints, hardware, runs, scoring, sharding, train_loop, train_step

args = json.loads(sys.argv[1])
out = {"devices": jax.device_count()} if not args.get("distributed") else {}

def flat(tree):
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {jax.tree_util.keystr(p): x for p, x in leaves}

def layout(params):  # spec and local shard shapes of every parameter
  spec = lambda x: str(getattr(x.sharding, "spec", x.sharding))
  return {k: [spec(x), [list(s.data.shape) for s in x.addressable_shards]]
          for k, x in flat(params).items()}

def dump(params, path):
  np.savez(path, **{k: np.asarray(jax.device_get(x)) for k, x in flat(params).items()})

spied = {}
save, restore = checkpoints.save, checkpoints.restore
def spy_save(mngr, step, params, opt_state, meta):
  spied.setdefault("saved", {})[step] = layout(params)
  if args.get("dump_saved_at") == step:
    dump(params, args["dump_to"])
  save(mngr, step, params, opt_state, meta)
def spy_restore(mngr, step, abstract):
  got = restore(mngr, step, abstract)
  if "params" not in got:  # only the metadata
    return got
  spied["restored"] = layout(got["params"])
  if args.get("dump_restored_to"):
    dump(got["params"], args["dump_restored_to"])
  return got
checkpoints.save, checkpoints.restore = spy_save, spy_restore

def config(overrides):
  c = tiny.get_config()
  for key, value in overrides.items():
    *path, last = key.split(".")
    node = c
    for p in path:
      node = node[p]
    node[last] = tuple(value) if isinstance(value, list) else value
  return c

out["runs"] = []
for overrides in args.get("runs", []):
  spied.clear()
  s = train_loop.train(config(overrides), log=lambda *a: print(*a, file=sys.stderr))
  out["runs"].append({"train": s.train_losses, "val": s.val_losses, **spied})

if args.get("hlo"):  # the compiled step training runs: does any device hold the whole batch?
  from minigpt_jax.model import ModelConfig
  from minigpt_jax.tokenizer import CharTokenizer
  c = config(args["hlo"])
  cfg = hardware.resolve(ModelConfig.from_section(c.model, CharTokenizer().vocab_size))
  mesh = sharding.make_mesh(c.mesh)
  tx, abstract, sh = train_step.state_layout(c, cfg, mesh)
  step = train_step.jit_train_step(c, cfg, mesh, tx, sh, c.train.batch_size)
  corpus = jax.ShapeDtypeStruct((10_000,), np.uint8, sharding=sharding.replicated(mesh))
  out["hlo"] = step.lower(abstract, corpus).compile().as_text()
  starts = jax.ShapeDtypeStruct((c.train.batch_size,), np.int32)  # the periodic eval's step
  params = sharding.with_shardings(abstract.params, sh.params)
  out["eval_hlo"] = scoring.jit_eval_step(cfg, mesh).lower(params, corpus, starts).compile().as_text()

if args.get("inference"):  # a checkpoint loaded onto one device, and sampled from
  from minigpt_jax.generate import SamplingConfig, generate_text
  inf = args["inference"]
  run = runs.load_for_inference(inf["path"], inf["step"])
  params, cfg, tok, step = run.params, run.model_cfg, run.tokenizer, run.step
  dump(params, inf["dump_to"])
  saved = dict(np.load(inf["compare_with"]))
  like_saved = jax.tree_util.tree_map_with_path(
      lambda p, _: saved[jax.tree_util.keystr(p)], params)
  kw = dict(max_new_tokens=12, sampling=SamplingConfig(temperature=1.0, top_k=0, top_p=1.0),
            seed=3, stop_at_eos=False)
  out["inference"] = {"step": step, "devices": [str(d) for d in params["lm_head"]["kernel"].devices()],
                      "text": generate_text(params, cfg, tok, ["def "], **kw)[0],
                      "text_from_saved": generate_text(like_saved, cfg, tok, ["def "], **kw)[0]}

if args.get("distributed"):
  out.update(process=jax.process_index(), processes=jax.process_count(), devices=jax.device_count())
print("RESULT " + json.dumps(out), flush=True)
jax.distributed.shutdown()  # a no-op in a single process
