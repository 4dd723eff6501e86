"""Console progress and the metrics log (JSONL, one object per line)."""

import json
import math
import pathlib
import sys
import time


class MetricsLog:
  """Appends one JSON object per line; the source of truth for plots and reports."""

  def __init__(self, path: pathlib.Path, enabled: bool = True):
    self.path, self.enabled = pathlib.Path(path), enabled

  def write(self, record: dict) -> None:
    if self.enabled:
      with self.path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: pathlib.Path) -> list[dict]:
  """Reads a metrics JSONL; for repeated (kind, step) pairs, e.g. after a resume, the last wins."""
  rows = {}
  for line in pathlib.Path(path).read_text().splitlines():
    if line.strip():
      r = json.loads(line)
      rows[(r.get("kind"), r.get("step"))] = r
  return sorted(rows.values(), key=lambda r: (r.get("step", 0), r.get("kind", "")))


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
