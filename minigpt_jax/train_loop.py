"""Training, top to bottom: `train(config)` opens the run (corpus, state), compiles the
step, runs the loop, and reports. The pure step is in `train_step`; what protects the run
directory (its lock, resuming, fine-tuning, saving, SIGTERM) is behind `runs.open_training`."""

import dataclasses
import pathlib

import jax
import ml_collections

from minigpt_jax import config as config_lib
from minigpt_jax import hardware, runs, scoring, sharding, train_step
from minigpt_jax.errors import out_of_memory_names
from minigpt_jax.generate import SamplingConfig
from minigpt_jax.model import ModelConfig
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
  say = log if jax.process_index() == 0 else (lambda *_: None)
  with runs.open_training(config, cfg, say) as run:
    step = run.start
    if step < run.end:
      train_N = sharding.put_replicated(run.mesh, run.splits["train"])
      step_fn = train_step.compile_train_step(config, cfg, run.mesh, run.tx, run.state_sh,
                                               run.initial_state, train_N)
      hardware.fit_host_memory_to(hardware.scratch_bytes(step_fn))
      evaluate = Evaluate(config, cfg, run)
      step = loop(run.initial_state, step_fn, train_N, run, config.train, evaluate)
  say(run.finished_message(step))
  return RunSummary(run.run_dir, run.start, step, run.reporter.train_losses,
                    run.reporter.val_losses)


def loop(state, step_fn, train_N, run: runs.Training, every, evaluate: "Evaluate") -> int:
  """Steps from `run.start` to `run.end`, logging, checkpointing and evaluating as `every`
  (config.train) says. Returns the last step. A SIGTERM from here on (even during step 1
  or its checkpoint) ends the loop at the next step boundary with a checkpoint, raising
  Preempted."""
  run.begin_loop()
  step, pending = run.start, None
  while step < run.end:
    state, metrics = step_fn(state, train_N)
    step += 1
    run.check_saves()  # a failed background save stops training now, not at the next save
    if pending is not None:  # fetched one step late: the device never waits for the host
      run.log(*pending)
      pending = None
    due = lambda period: step % period == 0 or step == run.end
    if due(every.log_every):
      pending = (step, metrics)
    if due(every.ckpt_every) or due(every.eval_every):
      run.log(step, metrics)  # also: never checkpoint non-finite parameters
      pending = None
      if due(every.ckpt_every):
        run.save(step, state)
      if due(every.eval_every):
        evaluate(step, state.params)
      run.reporter.restart_clock(step)  # evals and checkpoints are not training time
    if step < run.end and run.should_stop(step):
      run.preempt(step, state, pending)
  return step


class Evaluate:
  """The periodic evaluation: validation loss on part of the split, and samples (on every
  process: the parameters span them all)."""

  def __init__(self, config, cfg: ModelConfig, run: runs.Training):
    self.config, self.cfg, self.run = config, cfg, run
    self.val_N = sharding.put_replicated(run.mesh, run.splits["val"])
    self.eval_fn = scoring.jit_eval_step(cfg, run.mesh)  # compiled at the first eval

  def __call__(self, step: int, params) -> None:
    t, s = self.config.train, self.config.sample
    val, _ = scoring.evaluate_split(self.eval_fn, params, self.val_N, self.cfg.context_len,
                                    t.batch_size, t.eval_batches * t.batch_size)
    checked = None
    if s.num_samples > 0:
      with out_of_memory_names("sample.num_samples (or sample.max_new_tokens)"):
        checked = scoring.sample_validity(
            params, self.cfg, CharTokenizer(), [s.prompt] * s.num_samples,
            max_new_tokens=s.max_new_tokens, seed=step,
            sampling=SamplingConfig(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p))
    self.run.reporter.eval(step, val, checked)
