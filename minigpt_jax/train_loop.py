"""Training, top to bottom: `train(config)` prepares the corpus, initialises or restores
the state, runs the loop, and reports. The pure step is in `train_step`."""

import dataclasses
import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections

from minigpt_jax import config as config_lib
from minigpt_jax import data, hardware, report, runs, scoring, sharding, train_step
from minigpt_jax.errors import UserError
from minigpt_jax.generate import SamplingConfig
from minigpt_jax.model import ModelConfig, flops_per_token, param_count
from minigpt_jax.prompts import fit_new_tokens
from minigpt_jax.tokenizer import CharTokenizer


@dataclasses.dataclass
class RunSummary:
  run_dir: pathlib.Path
  first_step: int
  last_step: int
  train_losses: dict  # step -> loss, as logged
  val_losses: dict  # step -> loss


def train(config: ml_collections.ConfigDict, log=print) -> RunSummary:
  """Trains (or resumes) the run `config.workdir/config.run_name`."""
  config_lib.validate(config)
  if config.train.debug_recompiles:
    jax.config.update("jax_log_compiles", True)
  if config.mesh.distributed:
    sharding.initialize_distributed(config.mesh)
  run_dir = pathlib.Path(config.workdir) / config.run_name
  say = log if jax.process_index() == 0 else (lambda *_: None)
  with runs.training_lock(run_dir):
    start, splits, train_sha256 = prepare_corpus(config, run_dir, say)
    cfg = hardware.resolve(ModelConfig.from_section(config.model, CharTokenizer().vocab_size))
    mesh = check_fits(config, cfg, splits)
    state, tx, state_sh = init_or_restore(config, cfg, mesh, run_dir, start, say)
    end = min(config.train.steps, config.train.stop_at_step or config.train.steps)
    mngr = runs.manager(run_dir, keep=config.train.keep)
    reporter = report.TrainReporter(run_dir, jax.process_index() == 0, start or 0,
                                    config.train.steps, config.train.batch_size * cfg.context_len,
                                    mfu_fn=lambda tok_s: hardware.mfu(flops_per_token(cfg), tok_s))
    hooks = Hooks(config, cfg, mesh, reporter, mngr, sharding.put_replicated(mesh, splits["val"]),
                  train_sha256)
    step_fn = train_step.jit_train_step(config, cfg, mesh, tx, state_sh, config.train.batch_size)
    try:
      step = loop(state, step_fn, sharding.put_replicated(mesh, splits["train"]), start or 0,
                  end, config.train, hooks)
    finally:  # also on errors: finish the checkpoint being written, never leave it half-done
      mngr.wait_until_finished()
      mngr.close()
      reporter.progress.close()
  say(finished_message(config, run_dir, start or 0, step))
  return RunSummary(run_dir, start or 0, step, reporter.train_losses, reporter.val_losses)


def prepare_corpus(config, run_dir: pathlib.Path, say):
  """The step to resume from (None: a new run), the corpus splits and the train split's sha256.

  Checkpoints record the train split they were trained on: a resume must load that corpus,
  and preparing the corpus (a rebuild, or one deleted) must not write another in its place.
  """
  start, trained_sha256 = runs.trained_on(run_dir) or (None, None)
  if start is not None:  # a changed setting is named before any corpus work
    runs.check_resumable(run_dir, config)
  splits, manifest = data.load_corpus_everywhere(config.data, CharTokenizer(), say,
                                                 keep_train_sha256=trained_sha256)
  sha256 = manifest["splits"]["train"]["sha256"]
  if start is not None and trained_sha256 != sha256:
    raise UserError(f"the train corpus differs from the one step {start} of {run_dir} was "
                    "trained on; resume with that corpus, or start a new --run_name")
  return start, splits, sha256


def check_fits(config, cfg: ModelConfig, splits: dict):
  """The mesh, once the splits are known to hold a window and the batch to divide over it."""
  for s in data.SPLITS:
    if splits[s].size <= cfg.context_len + 1:
      raise UserError(f"the {s} split has {splits[s].size} tokens, fewer than one window of "
                      f"{cfg.context_len + 1}; add sources or lower model.context_len")
  mesh = sharding.make_mesh(config.mesh)
  if config.train.batch_size % mesh.size:
    raise UserError(f"train.batch_size {config.train.batch_size} is not divisible by the "
                    f"{mesh.size} devices of the mesh")
  return mesh


def init_or_restore(config, cfg: ModelConfig, mesh, run_dir: pathlib.Path, start, say):
  """A new run's state (and its config.json and tokenizer.json), or the state of
  checkpoint `start`, laid out on `mesh`. Returns (state, optimizer, state shardings)."""
  run_dir.mkdir(parents=True, exist_ok=True)
  sharding.sync_processes("run dir checked")  # before the lead writes config.json
  tx, abstract, state_sh = train_step.state_layout(config, cfg, mesh)
  if start is None:
    if jax.process_index() == 0:
      runs.write_run_files(run_dir, config, CharTokenizer())
    state = train_step.fresh_state(config, cfg, tx, state_sh)
  else:
    with runs.reader(run_dir) as mngr:
      got = runs.restore(mngr, start, {
          "params": sharding.with_shardings(abstract.params, state_sh.params),
          "opt_state": sharding.with_shardings(abstract.opt_state, state_sh.opt_state)})
    state = train_step.TrainState(jax.device_put(jnp.asarray(start, jnp.int32), state_sh.step),
                                  got["params"], got["opt_state"])
    say(f"resuming {run_dir} from step {start}")
  say(f"model: {param_count(abstract.params):,} parameters, "
      f"{flops_per_token(cfg) / 1e6:.1f} MFLOP/token, compute {cfg.compute_dtype}, "
      f"attention {cfg.attention_impl}; devices: {jax.device_count()} x "
      f"{jax.devices()[0].device_kind}, mesh {dict(mesh.shape)}")
  return state, tx, state_sh


def loop(state, step_fn, train_N, start: int, end: int, every, hooks: "Hooks") -> int:
  """Steps from `start` to `end`; logs, checkpoints and evaluates as `every` (config.train)
  says. Returns the last step."""
  step, pending = start, None
  while step < end:
    state, metrics = step_fn(state, train_N)
    step += 1
    if pending is not None:  # fetched one step late: the device never waits for the host
      hooks.train_metrics(*pending)
      pending = None
    due = lambda period: step % period == 0 or step == end
    if due(every.log_every):
      pending = (step, metrics)
    if due(every.ckpt_every) or due(every.eval_every):
      hooks.train_metrics(step, metrics)  # also: never checkpoint non-finite parameters
      pending = None
      if due(every.ckpt_every):
        hooks.checkpoint(step, state)
      if due(every.eval_every):
        hooks.evaluate(step, state.params)
      hooks.reporter.restart_clock(step)  # evals and checkpoints are not training time
  return step


@dataclasses.dataclass
class Hooks:
  """What the loop does between steps: report metrics (stopping on NaN), save, evaluate."""

  config: ml_collections.ConfigDict
  cfg: ModelConfig
  mesh: jax.sharding.Mesh
  reporter: report.TrainReporter
  mngr: object  # the run's Orbax CheckpointManager
  val_N: jax.Array
  train_sha256: str

  @functools.cached_property
  def eval_fn(self):  # compiled once, at the first eval
    return scoring.jit_eval_step(self.cfg, self.mesh)

  def train_metrics(self, step: int, metrics) -> None:
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = next((k for k in ("loss", "update_norm") if not math.isfinite(metrics[k])), None)
    if bad:
      what = "loss" if bad == "loss" else "parameter update"
      last = self.mngr.latest_step()
      kept = ("no checkpoint was written" if last is None else
              f"the last checkpoint (step {last}) is intact; use a new --run_name to change train.lr")
      raise UserError(f"{what} is {metrics[bad]} at step {step}; stopped, {kept}. "
                      "Lower train.lr or check the data")
    self.reporter.train(step, metrics)

  def checkpoint(self, step: int, state) -> None:
    runs.save(self.mngr, step, state.params, state.opt_state,
              {"step": step, "corpus_sha256": self.train_sha256})

  def evaluate(self, step: int, params) -> None:
    """Validation loss on part of the split, and samples (on every process: the params
    span them all)."""
    t, s = self.config.train, self.config.sample
    val, _ = scoring.evaluate_split(self.eval_fn, params, self.val_N, self.cfg.context_len, t.batch_size,
                                    t.eval_batches * t.batch_size)
    checked = None
    if s.num_samples > 0:
      checked = scoring.sample_validity(
          params, self.cfg, CharTokenizer(), [s.prompt] * s.num_samples,
          max_new_tokens=fit_new_tokens(s.max_new_tokens, [len(s.prompt)], self.cfg.context_len),
          sampling=SamplingConfig(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p),
          seed=step)
    self.reporter.eval(step, val, checked)


def finished_message(config, run_dir: pathlib.Path, start: int, step: int) -> str:
  if step > start:
    return f"done: step {step}, checkpoints in {run_dir / 'ckpt'}"
  if config.train.stop_at_step and config.train.stop_at_step <= start:
    return (f"{run_dir} is already at step {start}, past train.stop_at_step "
            f"{config.train.stop_at_step}; raise it (or set it to 0) to train further")
  return f"{run_dir} is already at step {start}; raise --config.train.steps to train further"
