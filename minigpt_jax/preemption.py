"""Preemption: SIGTERM, which schedulers send before they take a machine back, stops
training at a step boundary with a checkpoint, on every process at the same step; before
the training loop starts there is nothing to save, and a single process ends at once."""

import contextlib
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

from minigpt_jax.errors import Stopped, sent_again_after_gc_callback


class Preempted(Stopped):
  """Training stopped on SIGTERM (how schedulers preempt a job), its checkpoint saved."""

  exit_status = 128 + signal.SIGTERM  # what a process that SIGTERM ended reports

  def __init__(self, step: int):
    super().__init__(f"preempted (SIGTERM) at step {step}: checkpoint saved; run the same "
                     "command to resume")
    self.step = step


class Terminated(Stopped):
  """SIGTERM before the training loop starts (preparing the corpus, compiling)."""

  exit_status = 128 + signal.SIGTERM
  abrupt = True  # it may cut short a compile

  def __init__(self):
    super().__init__("terminated (SIGTERM) before training started; nothing to save")


class StopFlag:
  """Set by SIGTERM, read by the loop at step boundaries. Until the loop starts (it sets
  `loop_started`), SIGTERM raises Terminated in a single process instead, which also ends
  a call that blocks (a read, an open).

  The processes of a multi-process run must stop (and save) at one step, so they agree on
  the flag every `period` steps, with one small all-gather; a single process reads it
  at every step. There SIGTERM only ever sets the flag: a process that raised would skip
  that step, and the others would wait for it in a collective for good.
  """

  def __init__(self, period: int = 1):
    self.requested, self.period, self.loop_started = False, max(1, period), False
    self.alone = jax.process_count() == 1  # known here: the handler must not start JAX

  def __call__(self, signum, frame) -> None:  # the signal handler
    if self.alone and not self.loop_started:
      if not sent_again_after_gc_callback(signum, frame):
        raise Terminated()
      return  # it comes again
    self.requested = True

  def should_stop(self, step: int) -> bool:
    if self.alone:
      return self.requested
    if step % self.period:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.requested))
    return bool(np.any(flags))


@contextlib.contextmanager
def stop_on_sigterm(period: int):
  """A StopFlag that SIGTERM sets during the block; the previous handler is back after it."""
  flag = StopFlag(period)
  if threading.current_thread() is not threading.main_thread():  # only it may set handlers
    yield flag
    return
  previous = signal.signal(signal.SIGTERM, flag)
  try:
    yield flag
  finally:  # None: a handler not set from Python, which cannot be restored; use the default
    signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
