"""One optimizer step as a pure function, and the state, loss and optimizer it needs.

`train_step(state, train_N) -> (state, metrics)` takes everything as arguments;
`jit_train_step` wires it to a mesh with shardings and donation, and
`compile_train_step` compiles that for the state before the first step.
"""

import functools

import flax.struct
import jax
import jax.numpy as jnp
import optax

from minigpt_jax import sharding
from minigpt_jax.model import MiniGPT, ModelConfig, init_params


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


def decay_mask(params, embeddings: bool = False):
  """Weight decay on matmul kernels, and on the embeddings with `embeddings` (as nanoGPT
  decays every matrix); never on biases or norms."""
  decayed = ("kernel", "embedding") if embeddings else ("kernel",)
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in decayed, params)


def lr_schedule(train_cfg) -> optax.Schedule:
  """Linear warmup from 0, then cosine decay to lr * min_lr_ratio at train.steps."""
  return optax.warmup_cosine_decay_schedule(
      0.0, train_cfg.lr, train_cfg.warmup_steps, max(train_cfg.steps, train_cfg.warmup_steps + 1),
      end_value=train_cfg.lr * train_cfg.min_lr_ratio)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  mask = functools.partial(decay_mask, embeddings=train_cfg.decay_embeddings)
  if train_cfg.optimizer == "adamw":
    step = optax.adamw(lr_schedule(train_cfg), b1=train_cfg.b1, b2=train_cfg.b2,
                       weight_decay=train_cfg.weight_decay, mask=mask)
  else:  # Muon on the blocks' matrices, AdamW (with train.lr) on the rest
    muon_lr = lambda n: lr_schedule(train_cfg)(n) * (train_cfg.muon_lr / train_cfg.lr)
    step = optax.contrib.muon(
        muon_lr, beta=0.95, weight_decay=train_cfg.weight_decay, weight_decay_mask=mask,
        adam_b1=train_cfg.b1, adam_b2=train_cfg.b2, adam_learning_rate=lr_schedule(train_cfg),
        adam_weight_decay=0.0, nesterov=True, muon_weight_dimension_numbers=muon_dims)
  return optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip), step)


def muon_dims(params):
  """The axes Muon orthogonalises in each block kernel (None: AdamW's): q, k and v each on
  their own (the fused kernel's axis 1 is a batch axis), heads x head width into the output
  projection."""
  def dims(path, x):
    names = [p.key for p in path]
    if names[-1] != "kernel" or not names[0].startswith("block_"):
      return None
    if names[-2] == "qkv":
      return optax.contrib.MuonDimensionNumbers(reduction_axis=0, output_axis=(2, 3))
    if names[-2] == "out":
      return optax.contrib.MuonDimensionNumbers(reduction_axis=(0, 1), output_axis=2)
    return optax.contrib.MuonDimensionNumbers(0, 1)
  return jax.tree_util.tree_map_with_path(dims, params)


def summed_nats(params, cfg: ModelConfig, inputs_BT, targets_BT, weights_BT):
  """Cross-entropy summed over the weighted targets (nats), and the sum of the weights:
  the one loss of training and evaluation."""
  logits_BTV, _ = MiniGPT(cfg).apply({"params": params}, inputs_BT)
  ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
  return (ce_BT * weights_BT).sum(), weights_BT.sum()


def loss_fn(params, cfg: ModelConfig, inputs_BT, targets_BT):
  """Mean cross-entropy in nats per token."""
  nats, count = summed_nats(params, cfg, inputs_BT, targets_BT, jnp.ones(targets_BT.shape))
  return nats / count


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
  params = init_params(cfg, key)
  return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


def get_batch(data_N: jax.Array, key: jax.Array, batch_size: int, context_len: int):
  """Random windows of `data_N`: inputs [B, T] and targets shifted by one. Jittable.

  The batch is a pure function of `key`, so a run that derives `key` from
  (seed, step) sees the same batches after a restart.
  """
  starts_B = jax.random.randint(key, (batch_size,), 0, data_N.shape[0] - context_len)
  window = lambda s: jax.lax.dynamic_slice(data_N, (s,), (context_len + 1,))
  windows_BW = jax.vmap(window)(starts_B).astype(jnp.int32)
  return windows_BW[:, :-1], windows_BW[:, 1:]


def train_step(state: TrainState, train_N: jax.Array, *, cfg: ModelConfig,
               tx: optax.GradientTransformation, batch_size: int, seed: int, batch_sharding,
               schedule: optax.Schedule):
  """One optimizer step on the batch fixed by (seed, step), split over the devices as
  `batch_sharding` says. Returns (state, metrics), with the learning rate (`schedule`, tx's)
  this step used: computed here, so the host reads it with the other metrics."""
  key = jax.random.fold_in(jax.random.key(seed), state.step)
  inputs_BT, targets_BT = jax.lax.with_sharding_constraint(
      get_batch(train_N, key, batch_size, cfg.context_len), batch_sharding)
  loss, grads = jax.value_and_grad(loss_fn)(state.params, cfg, inputs_BT, targets_BT)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # The loss is that of the old parameters; the update norm shows whether the new ones are finite.
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
             "update_norm": optax.tree.norm(updates), "lr": schedule(state.step)}
  return TrainState(state.step + 1, params, opt_state), metrics


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


def compile_train_step(config, cfg: ModelConfig, mesh, tx, state_sh, state: TrainState,
                       train_N: jax.Array) -> jax.stages.Compiled:
  """`jit_train_step` at config.train.batch_size, compiled for `state` and `train_N` before
  the first step, so that the caller knows its memory needs (`compiled.memory_analysis()`)."""
  step_fn = jit_train_step(config, cfg, mesh, tx, state_sh, config.train.batch_size)
  return step_fn.lower(state, train_N).compile()
