"""Training: the optimizer, a pure `train_step`, evaluation, and the loop that wires
them to the mesh, the checkpoints and the logs."""

import dataclasses
import functools
import json
import math
import pathlib
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from minigpt_jax import checkpoint, data, hardware, report, sharding, syntax
from minigpt_jax import config as config_lib
from minigpt_jax.errors import UserError
from minigpt_jax.model import MiniGPT, ModelConfig, flops_per_token, init_params, param_count
from minigpt_jax.sampling import SamplingConfig
from minigpt_jax.tokenizer import CharTokenizer, room_after_prompt

# Config fields a resumed run may change; any other difference is refused.
RESUMABLE_CHANGES = ("workdir", "run_name", "data.dir", "data.rebuild", "train.steps",
                     "train.stop_at_step", "train.log_every", "train.eval_every",
                     "train.eval_batches", "train.ckpt_every", "train.keep",
                     "train.debug_recompiles", "sample", "mesh")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


def decay_mask(params):
  """Weight decay on matmul kernels only; not on biases, norms or embeddings."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def lr_schedule(train_cfg) -> optax.Schedule:
  """Linear warmup from 0, then cosine decay to lr * min_lr_ratio at train.steps."""
  return optax.warmup_cosine_decay_schedule(
      0.0, train_cfg.lr, train_cfg.warmup_steps, max(train_cfg.steps, train_cfg.warmup_steps + 1),
      end_value=train_cfg.lr * train_cfg.min_lr_ratio)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(train_cfg.grad_clip),
      optax.adamw(lr_schedule(train_cfg), b1=train_cfg.b1, b2=train_cfg.b2,
                  weight_decay=train_cfg.weight_decay, mask=decay_mask))


def loss_fn(params, cfg: ModelConfig, inputs_BT, targets_BT, weights_BT=None):
  """Mean cross-entropy in nats per token (weighted if `weights_BT` is given)."""
  logits_BTV, _ = MiniGPT(cfg).apply({"params": params}, inputs_BT)
  ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
  if weights_BT is None:
    return ce_BT.mean()
  return (ce_BT * weights_BT).sum() / jnp.maximum(weights_BT.sum(), 1)


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
  params = init_params(cfg, key)
  return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


def train_step(state: TrainState, train_N: jax.Array, *, cfg: ModelConfig,
               tx: optax.GradientTransformation, batch_size: int, seed: int, batch_sharding=None,
               schedule: Optional[optax.Schedule] = None):
  """One optimizer step on the batch fixed by (seed, step). Returns (state, metrics);
  with `schedule` (tx's learning rate), metrics include the rate this step used."""
  key = jax.random.fold_in(jax.random.key(seed), state.step)
  inputs_BT, targets_BT = data.get_batch(train_N, key, batch_size, cfg.context_len)
  if batch_sharding is not None:
    inputs_BT = jax.lax.with_sharding_constraint(inputs_BT, batch_sharding)
    targets_BT = jax.lax.with_sharding_constraint(targets_BT, batch_sharding)
  loss, grads = jax.value_and_grad(loss_fn)(state.params, cfg, inputs_BT, targets_BT)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  norm = lambda tree: jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))
  # The loss is that of the old parameters; the update norm shows whether the new ones are finite.
  metrics = {"loss": loss, "grad_norm": norm(grads), "update_norm": norm(updates)}
  if schedule is not None:  # computed here, so the host reads it with the other metrics
    metrics["lr"] = schedule(state.step)
  return TrainState(state.step + 1, params, opt_state), metrics


def eval_step(params, split_N: jax.Array, starts_B: jax.Array, *, cfg: ModelConfig):
  """Summed nats and token count of the windows at `starts_B` (a window past the end scores 0)."""
  n = split_N.shape[0]
  idx_BT1 = starts_B[:, None] + jnp.arange(cfg.context_len + 1)
  valid_BT1 = idx_BT1 < n
  seq_BT1 = split_N[jnp.minimum(idx_BT1, n - 1)].astype(jnp.int32)
  logits_BTV, _ = MiniGPT(cfg).apply({"params": params}, seq_BT1[:, :-1])
  ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, seq_BT1[:, 1:])
  w_BT = valid_BT1[:, 1:].astype(jnp.float32)
  return (ce_BT * w_BT).sum(), w_BT.sum()


def evaluate_split(eval_fn, params, split_N: jax.Array, context_len: int, batch_size: int,
                   max_windows=None) -> tuple[float, int]:
  """Mean nats per token over non-overlapping windows of a split (all of it by default).

  Deterministic: the windows depend only on the split's length. Returns (nats, tokens).
  """
  starts = data.eval_windows(split_N.shape[0], context_len, max_windows)
  pad = -starts.size % batch_size
  starts = np.concatenate([starts, np.full(pad, split_N.shape[0], starts.dtype)])
  sums = [eval_fn(params, split_N, jnp.asarray(starts[i:i + batch_size], jnp.int32))
          for i in range(0, starts.size, batch_size)]  # dispatched without waiting
  total, count = np.asarray(jax.device_get(sums), np.float64).sum(axis=0)
  return float(total) / max(float(count), 1.0), int(count)


def state_layout(config, cfg: ModelConfig, mesh):
  """The optimizer, the abstract train state, and the state's shardings on `mesh`."""
  tx = make_optimizer(config.train)
  abstract = jax.eval_shape(lambda k: init_state(cfg, tx, k), jax.random.key(config.seed))
  state_sh = TrainState(sharding.replicated(mesh), sharding.state_shardings(mesh, abstract.params),
                        sharding.state_shardings(mesh, abstract.opt_state))
  return tx, abstract, state_sh


def fresh_state(config, cfg: ModelConfig, tx, state_sh) -> TrainState:
  """A newly initialised train state, created directly in its shardings."""
  init = jax.jit(lambda k: init_state(cfg, tx, k), out_shardings=state_sh)
  return init(jax.random.key(config.seed))


def jit_train_step(config, cfg: ModelConfig, mesh, tx, state_sh, batch_size: int):
  """`train_step` jitted for `mesh`: batch split over all devices, state donated."""
  batch_sh = jax.sharding.NamedSharding(mesh, sharding.BATCH)
  return jax.jit(
      functools.partial(train_step, cfg=cfg, tx=tx, batch_size=batch_size, seed=config.seed,
                        batch_sharding=batch_sh, schedule=lr_schedule(config.train)),
      in_shardings=(state_sh, sharding.replicated(mesh)),
      out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)


def _flat(cfg: ml_collections.ConfigDict) -> dict:
  out = {}
  def walk(d, prefix):
    for k, v in d.items():
      if isinstance(v, dict):
        walk(v, f"{prefix}{k}.")
      else:
        out[f"{prefix}{k}"] = list(v) if isinstance(v, (list, tuple)) else v
  walk(cfg.to_dict(), "")
  return out


def check_resumable(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict, run_dir):
  old, new = _flat(saved), _flat(config)
  free = lambda k: any(k == f or k.startswith(f + ".") for f in RESUMABLE_CHANGES)
  diffs = [k for k in sorted(set(old) | set(new)) if not free(k) and old.get(k) != new.get(k)]
  if diffs:
    shown = "; ".join(f"{k}: run has {old.get(k)!r}, config has {new.get(k)!r}" for k in diffs[:3])
    raise UserError(f"{run_dir} holds a run with another config ({shown}); resume it with its "
                    "own config or pick another --config.run_name")


@dataclasses.dataclass
class RunSummary:
  run_dir: pathlib.Path
  first_step: int
  last_step: int
  train_losses: dict  # step -> loss, as logged
  val_losses: dict  # step -> loss


def train(config: ml_collections.ConfigDict, log=print) -> RunSummary:
  """Trains (or resumes) the run `config.workdir/config.run_name`.

  Process 0 holds the run directory's lock throughout, so a second training of the same
  run (started by mistake, or without `mesh.distributed`) stops at once with an error. A new
  run that fails before writing anything removes the folder it made for itself.
  """
  config_lib.validate(config)
  if config.train.debug_recompiles:
    jax.config.update("jax_log_compiles", True)
  if config.mesh.distributed:
    sharding.initialize_distributed(config.mesh)
  run_dir = pathlib.Path(config.workdir) / config.run_name
  lock, error, made_dir = None, None, False
  if jax.process_index() == 0:
    made_dir = not run_dir.exists()
    try:
      lock = checkpoint.lock_run_dir(run_dir)
    except Exception as e:  # raised below on every process
      error = e
  try:
    sharding.raise_if_lead_failed(error, f"locking {run_dir}")
    return _train(config, run_dir, log)
  except BaseException:
    if lock is not None and made_dir:  # a run that failed before writing leaves no folder
      checkpoint.remove_if_only_lock(run_dir)
    raise
  finally:  # on errors too: a failed run must not keep its run locked
    if lock is not None:
      lock.close()


def _train(config: ml_collections.ConfigDict, run_dir: pathlib.Path, log) -> RunSummary:
  lead = jax.process_index() == 0
  say = log if lead else (lambda *_: None)

  tok = CharTokenizer()
  error = None
  # Checkpoints record the train split they were trained on: a resume must load that corpus,
  # and preparing the corpus (a rebuild, or one deleted) must not write another in its place.
  start, trained_on = checkpoint.trained_on(run_dir) or (None, None)  # None: a new run
  if start is not None:  # a resume: a changed setting is named before any corpus work
    check_resumable(checkpoint.read_run_config(run_dir), config, run_dir)
  if lead:  # one process prepares the corpus, the others wait and then load it
    try:
      splits, manifest = data.load_corpus(config.data, tok, log=say, keep_train_sha256=trained_on)
    except Exception as e:  # raised below on every process
      error = e
  sharding.raise_if_lead_failed(error, "preparing the corpus")
  if not lead:  # hosts without a shared filesystem need a copy of data.dir/data.name each
    splits, manifest = data.load_corpus(config.data, tok, log=say, build=False)
  sharding.check_same_on_all_processes(
      "".join(manifest["splits"][s]["sha256"] for s in data.SPLITS), "corpora")
  if start is not None and trained_on != manifest["splits"]["train"]["sha256"]:
    raise UserError(f"the train corpus differs from the one step {start} of {run_dir} was "
                    "trained on; resume with that corpus, or start a new --run_name")
  cfg = ModelConfig.from_config(config.model, tok.vocab_size)
  for s in data.SPLITS:
    if splits[s].size <= cfg.context_len + 1:
      raise UserError(f"the {s} split has {splits[s].size} tokens, fewer than one window of "
                      f"{cfg.context_len + 1}; add sources or lower model.context_len")
  mesh = sharding.make_mesh(config.mesh)
  if config.train.batch_size % mesh.size:
    raise UserError(f"train.batch_size {config.train.batch_size} is not divisible by the "
                    f"{mesh.size} devices of the mesh")

  run_dir.mkdir(parents=True, exist_ok=True)
  mngr = checkpoint.manager(run_dir, keep=config.train.keep)
  saved_cfg_path = run_dir / "config.json"
  sharding.sync_processes("run dir checked")  # before the lead writes config.json
  if start is None and lead:
    saved = config.copy_and_resolve_references()
    saved.data.dir = str(pathlib.Path(config.data.dir).absolute())  # evaluate finds the corpus
    saved_cfg_path.write_text(saved.to_json(indent=1))
    (run_dir / "tokenizer.json").write_text(json.dumps(tok.to_dict()))

  tx, abstract, state_sh = state_layout(config, cfg, mesh)
  if start is None:
    state = fresh_state(config, cfg, tx, state_sh)
    start = 0
  else:
    with_sh = lambda t, s: jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), t, s)
    got = checkpoint.restore(mngr, start, {"params": with_sh(abstract.params, state_sh.params),
                                           "opt_state": with_sh(abstract.opt_state, state_sh.opt_state)})
    state = TrainState(jax.device_put(jnp.asarray(start, jnp.int32), state_sh.step),
                       got["params"], got["opt_state"])
    say(f"resuming {run_dir} from step {start}")

  n_params = param_count(abstract.params)
  fpt = flops_per_token(cfg)
  say(f"model: {n_params:,} parameters, {fpt / 1e6:.1f} MFLOP/token, compute {cfg.compute_dtype}, "
      f"attention {cfg.attention_impl}; devices: {jax.device_count()} x "
      f"{jax.devices()[0].device_kind}, mesh {dict(mesh.shape)}")

  train_N = sharding.put_replicated(mesh, splits["train"])
  val_N = sharding.put_replicated(mesh, splits["val"])
  step_fn = jit_train_step(config, cfg, mesh, tx, state_sh, config.train.batch_size)
  eval_fn = jax.jit(functools.partial(eval_step, cfg=cfg))

  end = min(config.train.steps, config.train.stop_at_step or config.train.steps)
  tokens_per_step = config.train.batch_size * cfg.context_len
  reporter = report.TrainReporter(run_dir, lead, start, config.train.steps, tokens_per_step,
                                  mfu_fn=lambda tok_s: hardware.mfu(fpt, tok_s))
  sampling = SamplingConfig(temperature=config.sample.temperature, top_k=config.sample.top_k,
                            top_p=config.sample.top_p)
  sample_tokens = min(config.sample.max_new_tokens,
                      room_after_prompt(len(config.sample.prompt), cfg.context_len))

  def record_train(step, metrics):
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = next((k for k in ("loss", "update_norm") if not math.isfinite(metrics[k])), None)
    if bad:
      what = "loss" if bad == "loss" else "parameter update"
      last = mngr.latest_step()
      kept = ("no checkpoint was written" if last is None else
              f"the last checkpoint (step {last}) is intact; use a new --run_name to change train.lr")
      raise UserError(f"{what} is {metrics[bad]} at step {step}; stopped, {kept}. "
                      "Lower train.lr or check the data")
    reporter.train(step, metrics)

  def evaluate_and_sample(step):
    val, _ = evaluate_split(eval_fn, state.params, val_N, cfg.context_len, config.train.batch_size,
                            config.train.eval_batches * config.train.batch_size)
    checked = None
    if config.sample.num_samples > 0:  # on every process: the params span them all
      checked = syntax.sample_validity(
          state.params, cfg, tok, [config.sample.prompt] * config.sample.num_samples,
          max_new_tokens=sample_tokens, sampling=sampling, seed=step)
    reporter.eval(step, val, checked)

  step, pending = start, None
  try:
    while step < end:
      state, metrics = step_fn(state, train_N)
      step += 1
      if pending is not None:  # fetched one step late: the device never waits for the host
        record_train(*pending)
        pending = None
      periodic = lambda every: step % every == 0 or step == end
      if periodic(config.train.log_every):
        pending = (step, metrics)
      if periodic(config.train.eval_every) or periodic(config.train.ckpt_every):
        record_train(step, metrics)  # also: never checkpoint non-finite parameters
        pending = None
        if periodic(config.train.ckpt_every):
          checkpoint.save(mngr, step, state.params, state.opt_state,
                          {"step": step, "corpus_sha256": manifest["splits"]["train"]["sha256"]})
        if periodic(config.train.eval_every):
          evaluate_and_sample(step)
        reporter.restart_clock(step)
  finally:  # also on errors: finish the checkpoint being written, never leave it half-done
    mngr.wait_until_finished()
    mngr.close()
    reporter.progress.close()
  if start >= end:
    say(f"{run_dir} is already at step {start}; raise --config.train.steps to train further")
  else:
    say(f"done: step {step}, checkpoints in {run_dir / 'ckpt'}")
  return RunSummary(run_dir, start, step, reporter.train_losses, reporter.val_losses)
