"""Console progress, the metrics log (JSONL, one object per line) and its TensorBoard copy."""

import json
import logging
import math
import os
import pathlib
import sys
import time

from minigpt_jax import runs
from minigpt_jax.errors import WriteFailed, first_line, parse_json


class TensorBoardLog:
  """The records of metrics.jsonl as TensorBoard event files in `folder`, when tensorboardX
  (the optional extra "tensorboard") is installed; metrics.jsonl stays the source of truth.

  Written in the calling thread, flushed every FLUSH_SECONDS and at `close`: a failed write
  (a full disk) raises OSError here, not in a writer thread whose queue would then block."""

  FLUSH_SECONDS = 30
  _noted = False  # the note that the writer is missing is logged once per process

  def __init__(self, folder: pathlib.Path, enabled: bool = True):
    self.writer = None
    if not enabled:
      return
    try:  # optional: training never needs it
      from tensorboardX import summary
      from tensorboardX.event_file_writer import EventsWriter
      from tensorboardX.proto.event_pb2 import Event
    except ImportError:
      if not TensorBoardLog._noted:
        TensorBoardLog._noted = True
        logging.info("no TensorBoard event files: tensorboardX is not installed "
                     "(pip install -e '.[tensorboard]')")
      return
    self.summary, self.event = summary, Event
    self.writer = EventsWriter(str(folder / "events"))  # events.out.tfevents.<time>.<host>
    self.flushed = time.monotonic()

  def write(self, record: dict) -> None:
    if self.writer is None:
      return
    step, kind, walltime = record["step"], record["kind"], record.get("time", time.time())
    add = lambda s: self.writer.write_event(self.event(summary=s, step=step, wall_time=walltime))
    for key, value in record.items():
      if key not in ("step", "kind", "time", "tokens") and isinstance(value, (int, float)):
        add(self.summary.scalar(f"{kind}/{key}", value))
    for i, text in enumerate(record.get("samples", ())):  # a code block keeps the indents
      add(self.summary.text(f"samples/{i}", f"```\n{text}\n```"))
    if time.monotonic() - self.flushed > self.FLUSH_SECONDS:
      self.writer.flush()
      self.flushed = time.monotonic()

  def close(self) -> None:
    if self.writer is not None:
      writer, self.writer = self.writer, None  # closed once, even if closing fails
      writer.close()


# The numbers a record's readers compute with (the plot: its axes, bits/char, percentages);
# each must be a real number, or the line is skipped.
NUMBERS = ("step", "tokens", "loss", "val_loss", "syntax_rate")
MAX_NUMBER = 1e100  # past any real metric; near the float range the plot's scaling overflows


def read_metrics(path: pathlib.Path) -> list[dict]:
  """Reads a metrics JSONL; for repeated (kind, step) pairs, e.g. after a resume, the last wins.

  A line that is not a record (one cut short by a killed process or a full disk, or one
  edited by hand) is skipped with a warning: the rest of the log stays usable.
  """
  rows = {}
  text = runs.read_text(pathlib.Path(path), errors="replace")
  for i, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      r = parse_json(line)
      problem = record_problem(r)
    except ValueError as e:  # cut short, or nested too deep
      problem = first_line(e, 80)
    if problem:
      logging.warning("%s line %d is not a metrics record (%s); skipped", path, i, problem)
      continue
    rows[(r["kind"], r["step"])] = r
  return sorted(rows.values(), key=lambda r: (r["step"], r["kind"]))


def record_problem(r) -> str | None:
  """Why `r` (a parsed line) is not a metrics record; None if it is one."""
  if not isinstance(r, dict):
    return "not a JSON object"
  if not isinstance(r.get("kind"), str):
    return f"its kind is {r.get('kind')!r:.40}"
  if isinstance(r.get("step"), bool) or not isinstance(r.get("step"), int):
    return f"its step is {r.get('step')!r:.40}, not an integer"
  for name in NUMBERS:
    value = r.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return f"its {name} is {value!r:.40}, not a number"
    if abs(value) > MAX_NUMBER and not (isinstance(value, float) and math.isinf(value)):
      return f"its {name} is past {MAX_NUMBER:g}"  # inf and nan stay: a diverged run's
  return None


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
  """A one-line bar with ETA on a terminal; plain lines when the output is a file."""

  def __init__(self, start: int, total: int, enabled: bool = True, stream=sys.stdout):
    self.start, self.total, self.enabled, self.stream = start, total, enabled, stream
    self.t0 = time.perf_counter()
    self.tty = stream.isatty()

  def update(self, step: int, text: str) -> None:
    if not self.enabled:
      return
    done = step - self.start
    elapsed = time.perf_counter() - self.t0
    eta = elapsed / done * (self.total - step) if done else float("inf")
    frac = step / max(1, self.total)
    bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
    line = f"[{bar}] {step}/{self.total} {text} | {_duration(elapsed)} elapsed, ETA {_duration(eta)}"
    if self.tty:
      self.stream.write("\r\033[K" + line)
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def message(self, text: str) -> None:
    """Prints a full line without mangling the bar."""
    if self.enabled:
      self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
      self.stream.flush()

  def close(self) -> None:
    if self.enabled and self.tty:
      self.stream.write("\n")
      self.stream.flush()


class TrainReporter:
  """Everything a training run tells the world: the progress bar, metrics.jsonl (and its
  TensorBoard copy), and the samples folder. Every process calls it; only the lead one
  writes."""

  def __init__(self, run_dir: pathlib.Path, lead: bool, start: int, total: int,
               tokens_per_step: int, mfu_fn):
    self.run_dir, self.lead = pathlib.Path(run_dir), lead
    self.tokens_per_step, self.mfu_fn = tokens_per_step, mfu_fn
    with WriteFailed.naming(f"the TensorBoard events in {self.run_dir}", start):
      self.tensorboard = TensorBoardLog(self.run_dir, enabled=lead)
    self.progress = Progress(start, total, enabled=lead)
    self.train_losses, self.val_losses = {}, {}
    self.last_step = start  # of the last record written
    self.restart_clock(start)

  def write(self, record: dict) -> None:
    if self.lead:  # metrics.jsonl, one JSON object per line: the source of truth
      path = self.run_dir / "metrics.jsonl"
      with WriteFailed.naming(path, record["step"]):
        with runs.open_own(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, "a") as f:
          f.write(json.dumps(record) + "\n")
    with WriteFailed.naming(f"the TensorBoard events in {self.run_dir}", record["step"]):
      self.tensorboard.write(record)
    self.last_step = record["step"]

  def close(self) -> None:
    """Ends the progress bar and flushes the event files (also after an error)."""
    try:
      self.progress.close()
    finally:
      with WriteFailed.naming(f"the TensorBoard events in {self.run_dir}", self.last_step):
        self.tensorboard.close()

  def __enter__(self) -> "TrainReporter":
    return self

  def __exit__(self, error_type, *_) -> None:
    """Closes; while an error is on its way, a failed close (a full disk fails every write)
    is dropped: it must not replace that error."""
    try:
      self.close()
    except Exception:
      if error_type is None:
        raise

  def restart_clock(self, step: int) -> None:
    """Starts a new tokens/s interval (after evals and checkpoints, which are not training)."""
    self.t_mark, self.step_mark = time.perf_counter(), step

  def train(self, step: int, metrics: dict) -> None:
    now = time.perf_counter()
    tok_s = (step - self.step_mark) * self.tokens_per_step / max(now - self.t_mark, 1e-9)
    self.t_mark, self.step_mark = now, step
    util = self.mfu_fn(tok_s)
    self.write({"kind": "train", "step": step, "tokens": step * self.tokens_per_step,
                "loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
                "lr": metrics.get("lr"), "tokens_per_s": tok_s, "mfu": util,
                "time": time.time()})
    self.train_losses[step] = metrics["loss"]
    mfu_text = f" mfu {util:.1%}" if util is not None else ""
    self.progress.update(step, f"loss {metrics['loss']:.4f} | {tok_s:,.0f} tok/s{mfu_text}")

  def eval(self, step: int, val_loss: float, checked: dict | None) -> None:
    """Records a validation loss and, if given, `scoring.sample_validity`'s result."""
    bpc = val_loss / math.log(2)
    self.val_losses[step] = val_loss
    record = {"kind": "eval", "step": step, "tokens": step * self.tokens_per_step,
              "val_loss": val_loss, "val_bpc": bpc}
    self.progress.message(f"step {step}: val loss {val_loss:.4f} nats/char ({bpc:.3f} bits/char)")
    if checked is not None:
      texts = [s["text"] for s in checked["samples"]]
      record.update(syntax_rate=checked["rate"], syntax_kept_chars=checked["mean_kept_chars"],
                    samples=texts)
      self.progress.message(f"step {step}: {checked['valid']}/{checked['n']} samples parse "
                            f"(kept {checked['mean_kept_chars']:.0f} chars on average)")
      shown = "".join(f"--- sample {i} at step {step} ---\n{t}\n" for i, t in enumerate(texts))
      self.progress.message(shown + "---")
      if self.lead:
        path = self.run_dir / "samples" / f"step_{step:07d}.txt"
        with WriteFailed.naming(path, step):
          runs.own_folder(path.parent)
          with runs.open_own(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "w") as f:
            f.write(shown)
    self.write(record)
