"""Training, top to bottom: `train(config)` prepares the corpus, initialises or restores
the state, runs the loop, and reports. The pure step is in `train_step`."""

import contextlib
import dataclasses
import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections

from minigpt_jax import config as config_lib
from minigpt_jax import checkpoints, data, preemption, hardware, report, runs, scoring, sharding, train_step
from minigpt_jax.errors import UserError, WriteFailed, cause, out_of_memory_names
from minigpt_jax.generate import SamplingConfig
from minigpt_jax.model import ModelConfig, flops_per_token, param_count
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
  # Before the corpus is prepared: a setting this machine cannot run is refused at once.
  cfg = hardware.resolve(ModelConfig.from_section(config.model, CharTokenizer().vocab_size))
  run_dir = pathlib.Path(config.workdir) / config.run_name
  say = log if jax.process_index() == 0 else (lambda *_: None)
  with runs.training_lock(run_dir), preemption.stop_on_sigterm(config.train.log_every) as stop:
    start, source, splits, train_sha256 = prepare_corpus(config, run_dir, say)
    mesh = check_fits(config, cfg, splits)
    state, tx, state_sh, start = init_or_restore(config, cfg, mesh, run_dir, start, say, source,
                                                 train_sha256)
    end = min(config.train.steps, config.train.stop_at_step or config.train.steps)
    step = start or 0
    with contextlib.ExitStack() as stack:  # what it enters is left bottom up, on errors too
      mngr = stack.enter_context(checkpoints.manager(run_dir, keep=config.train.keep))
      # A failed write of a run file (a full disk): one line, naming the last checkpoint.
      stack.enter_context(failed_writes_named(mngr))
      reporter = stack.enter_context(report.TrainReporter(
          run_dir, jax.process_index() == 0, step, config.train.steps,
          config.train.batch_size * cfg.context_len,
          mfu_fn=lambda tok_s: hardware.mfu(flops_per_token(cfg), tok_s)))
      hooks = Hooks(config, cfg, mesh, reporter, mngr,
                    sharding.put_replicated(mesh, splits["val"]), train_sha256, stop)
      stack.callback(hooks.finish_saves)  # the last save is finished, never left half-done
      stack.enter_context(out_of_memory_names("train.batch_size"))  # XLA allocates at 1st call
      if step < end:
        train_N = sharding.put_replicated(mesh, splits["train"])
        step_fn = train_step.compile_train_step(config, cfg, mesh, tx, state_sh, state, train_N)
        hardware.fit_host_memory_to(hardware.scratch_bytes(step_fn))
        step = loop(state, step_fn, train_N, step, end, config.train, hooks)
  say(finished_message(config, run_dir, start or 0, step))
  return RunSummary(run_dir, start or 0, step, reporter.train_losses, reporter.val_losses)


def prepare_corpus(config, run_dir: pathlib.Path, say):
  """The step to resume from (None: a new run), the checkpoint a new run fine-tunes
  (`finetune_source`; None: none), the corpus splits and the train split's sha256.

  Checkpoints record the train split they were trained on: a resume must load that corpus,
  and preparing the corpus (a rebuild, or one deleted) must not write another in its place.
  A resumed fine-tune run restores its own checkpoints: its source is not read again.
  """
  start, trained_sha256 = checkpoints.trained_on(run_dir) or (None, None)
  source = None
  if start is not None:  # a changed setting is named before any corpus work
    runs.check_resumable(run_dir, config)
  elif config.init_from:  # and so is a model that cannot load
    source = finetune_source(config)
  splits, manifest = data.load_corpus_everywhere(config.data, CharTokenizer(), say,
                                                 keep_train_sha256=trained_sha256)
  sha256 = manifest["splits"]["train"]["sha256"]
  if start is not None and trained_sha256 != sha256:
    raise UserError(f"the train corpus differs from the one step {start} of {run_dir} was "
                    "trained on; resume with that corpus, or start a new --run_name")
  return start, source, splits, sha256


# The model fields a fine-tune must share with its source: they fix the parameters' shapes
# and what they mean (n_heads splits the same kernels into heads). The compute dtype and the
# attention kernel may change: parameters are float32 either way.
SAME_AS_SOURCE = ("context_len", "d_model", "n_layers", "n_heads", "d_ff", "vocab_pad_multiple",
                  "tie_embeddings")


def finetune_source(config) -> tuple[pathlib.Path, int]:
  """(run directory, step) of the checkpoint `config.init_from` names, at
  `config.init_from_step` (0: the latest), once its model and tokenizer are known to be
  `config`'s. Only reads the source run."""
  try:
    src_dir, step = runs.locate(config.init_from, config.init_from_step or None)
    runs.read_tokenizer(src_dir)  # refuses any but this code's
    saved = runs.read_config(src_dir).model
  except UserError as e:
    raise UserError(f"cannot fine-tune from {config.init_from}: {e}") from None
  saved = {"tie_embeddings": False, **saved}  # a source saved before the field existed
  for name in SAME_AS_SOURCE:
    if saved.get(name) != config.model[name]:
      raise UserError(f"cannot fine-tune from {src_dir} step {step}: model.{name} is "
                      f"{config.model[name]!r} here but {saved.get(name)!r} in its config.json; "
                      f"a fine-tune keeps the model (drop --config.model.{name})")
  return src_dir, step


def check_fits(config, cfg: ModelConfig, splits: dict):
  """The mesh, once the splits are known to hold a window and the batch to divide over it."""
  for s in data.SPLITS:
    if splits[s].size <= cfg.context_len + 1:
      more = ("raise data.val_fraction (now {}) to hold out more files" if s == "val" else
              "lower data.val_fraction (now {})").format(config.data.val_fraction)
      raise UserError(f"the {s} split has {splits[s].size} chars, but a window of "
                      f"model.context_len {cfg.context_len} needs at least "
                      f"{cfg.context_len + 2}: add sources, {more}, or lower model.context_len")
  mesh = sharding.make_mesh(config.mesh)
  if config.train.batch_size % mesh.size:
    raise UserError(f"train.batch_size {config.train.batch_size} is not divisible by the "
                    f"{mesh.size} devices of the mesh")
  return mesh


def init_or_restore(config, cfg: ModelConfig, mesh, run_dir: pathlib.Path, start, say,
                    source=None, train_sha256=None):
  """A new run's state (and its config.json and tokenizer.json): fresh, or with the
  parameters of checkpoint `source` (run directory, step) to fine-tune and a fresh optimizer
  state (its schedule starts over too); or, resuming (`start` not None), the state of the
  newest intact checkpoint, laid out on `mesh`: `start`, or an older one if `start`'s
  arrays are damaged (it is set aside), trained on `train_sha256` all the same. Returns
  (state, optimizer, state shardings, the step restored: None for a new run)."""
  run_dir.mkdir(parents=True, exist_ok=True)
  sharding.sync_processes("run dir checked")  # before the lead writes config.json
  tx, abstract, state_sh = train_step.state_layout(config, cfg, mesh)
  target = sharding.with_shardings(abstract, state_sh)  # what Orbax restores onto
  if start is None:
    if jax.process_index() == 0:
      runs.write_run_files(run_dir, config, CharTokenizer())
    state = train_step.fresh_state(config, cfg, tx, state_sh)
    if source is not None:  # make_optimizer's fresh state: zero moments whatever the params
      with checkpoints.reader(source[0]) as mngr:
        params = checkpoints.restore(mngr, source[1], {"params": target.params})["params"]
      state = state.replace(params=params)
      say(f"fine-tuning from {source[0]} step {source[1]}: its parameters, a fresh optimizer")
  else:  # the one read of the arrays, checked against their checksums (`trained_on` read
    # only the newest intact "meta" item, the same in every step of a run)
    start, got = checkpoints.restore_newest(
        run_dir, {"params": target.params, "opt_state": target.opt_state}, holding_lock=True)
    if got["meta"].get("corpus_sha256", "") != train_sha256:
      raise UserError(f"the train corpus differs from the one step {start} of {run_dir} (the "
                      "newest intact step) was trained on; resume with that corpus, or start a "
                      "new --run_name")
    state = train_step.TrainState(jax.device_put(jnp.asarray(start, jnp.int32), state_sh.step),
                                  got["params"], got["opt_state"])
    say(f"resuming {run_dir} from step {start}")
  say(f"model: {param_count(abstract.params):,} parameters, "
      f"{flops_per_token(cfg) / 1e6:.1f} MFLOP/token, compute {cfg.compute_dtype}, "
      f"attention {cfg.attention_impl}; devices: {jax.device_count()} x "
      f"{jax.devices()[0].device_kind}, mesh {dict(mesh.shape)}")
  return state, tx, state_sh, start


def loop(state, step_fn, train_N, start: int, end: int, every, hooks: "Hooks") -> int:
  """Steps from `start` to `end`; logs, checkpoints and evaluates as `every` (config.train)
  says, and stops with a checkpoint (raising Preempted) on SIGTERM, from now on: one during
  step 1, its eval or its checkpoint too. Returns the last step."""
  hooks.stop.loop_started = True
  step, pending = start, None
  while step < end:
    state, metrics = step_fn(state, train_N)
    step += 1
    hooks.check_saves()  # a failed background save stops training now, not at the next save
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
    if step < end and hooks.stop.should_stop(step):
      hooks.preempt(step, state, pending)
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
  stop: preemption.StopFlag = dataclasses.field(default_factory=preemption.StopFlag)
  saving: int | None = None  # the step of the save that may still be running

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
    self.finish_saves()  # Orbax waits for it anyway; an error must name that save's step
    self.saving = step
    try:
      checkpoints.save(self.mngr, step, state.params, state.opt_state,
                {"step": step, "corpus_sha256": self.train_sha256})
    except Exception as e:  # Orbax raises OSErrors and its own types alike
      raise UserError(f"cannot save checkpoint step {step} in {self.mngr.directory}: "
                      f"{cause(e)}; training stopped ({self.kept()})") from e

  def kept(self) -> str:
    return kept(self.mngr)

  def check_saves(self) -> None:
    """Raises if the last (background) save has failed; never waits for one still running."""
    if self.saving is not None and not self.mngr.is_saving_in_progress():
      self.finish_saves()

  def finish_saves(self) -> None:
    """Waits for the last save; a failed one is a UserError naming its step and the cause."""
    step, self.saving = self.saving, None
    try:
      self.mngr.wait_until_finished()
    except Exception as e:  # Orbax has forgotten the failed step by now
      raise UserError(f"saving checkpoint step {step} in {self.mngr.directory} failed: "
                      f"{cause(e)}; training stopped ({self.kept()})") from e

  def preempt(self, step: int, state, pending) -> None:
    """Logs what is pending, saves step `step` (unless it was just saved) and raises Preempted."""
    if pending is not None:
      self.train_metrics(*pending)
    if self.mngr.latest_step() != step:
      self.checkpoint(step, state)
    self.finish_saves()
    raise preemption.Preempted(step)

  def evaluate(self, step: int, params) -> None:
    """Validation loss on part of the split, and samples (on every process: the params
    span them all)."""
    t, s = self.config.train, self.config.sample
    val, _ = scoring.evaluate_split(self.eval_fn, params, self.val_N, self.cfg.context_len, t.batch_size,
                                    t.eval_batches * t.batch_size)
    checked = None
    if s.num_samples > 0:
      with out_of_memory_names("sample.num_samples (or sample.max_new_tokens)"):
        checked = scoring.sample_validity(
            params, self.cfg, CharTokenizer(), [s.prompt] * s.num_samples,
            max_new_tokens=s.max_new_tokens, seed=step,
            sampling=SamplingConfig(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p))
    self.reporter.eval(step, val, checked)


def kept(mngr) -> str:
  """The last complete checkpoint of the run `mngr` saves, in words."""
  last = mngr.latest_step()
  return "no checkpoint is complete" if last is None else f"step {last} is the last complete one"


@contextlib.contextmanager
def failed_writes_named(mngr):
  """Turns a WriteFailed of the block (metrics, samples, event files) into a UserError
  that names the last complete checkpoint of `mngr`."""
  try:
    yield
  except WriteFailed as e:
    raise UserError(f"{e}; training stopped ({kept(mngr)})") from e


def finished_message(config, run_dir: pathlib.Path, start: int, step: int) -> str:
  if step > start:
    return f"done: step {step}, checkpoints in {run_dir / 'ckpt'}"
  if config.train.stop_at_step and config.train.stop_at_step <= start:
    return (f"{run_dir} is already at step {start}, past train.stop_at_step "
            f"{config.train.stop_at_step}; raise it (or set it to 0) to train further")
  return f"{run_dir} is already at step {start}; raise --config.train.steps to train further"
