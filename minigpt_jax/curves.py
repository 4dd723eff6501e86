"""Training curves of a run as one PNG (the `plot` command draws them).

Reads <run>/metrics.jsonl (train loss, periodic val loss, and the syntax-validity
rate where eval records carry "syntax_rate") and any <run>/eval_step<N>.json
written by `minigpt_jax.evaluate`, drawn as separate full-split points.
"""

import logging
import math
import pathlib

from minigpt_jax import report
from minigpt_jax.errors import UserError, first_line, parse_json

TRAIN, VAL, FULL = "tab:blue", "tab:orange", "tab:red"


def _pyplot():
  try:
    import matplotlib
  except ImportError:
    raise UserError("plotting needs matplotlib: pip install -e .[plot]  (or pip install matplotlib)")
  matplotlib.use("Agg")  # files only; no display needed
  import matplotlib.pyplot as plt
  return plt


def _full_evals(run_dir: pathlib.Path) -> list[dict]:
  """{"step", "val_loss", "syntax_rate"?} from the evaluate command's reports, by step."""
  out = []
  for path in run_dir.glob("eval_step*.json"):
    try:
      r = parse_json(path.read_text())
      row = {"step": r["step"], "val_loss": r["val"]["nats_per_char"]}
      if "syntax" in r:
        row["syntax_rate"] = r["syntax"]["rate"]
      problem = report.record_problem({**row, "kind": "evaluate"})  # numbers the plot can draw
    except (OSError, ValueError, KeyError, TypeError) as e:  # the curves do not depend on it
      problem = f"{type(e).__name__}: {first_line(e, 80)}"
    if problem:
      logging.warning("skipping %s: not a readable evaluate report (%s)", path, problem)
      continue
    out.append(row)
  return sorted(out, key=lambda r: r["step"])


def plot_run(run_dir, out=None) -> pathlib.Path:
  """Draws loss vs steps, loss vs tokens and (when logged) syntax validity vs steps of the
  run at `run_dir` into the PNG `out` (default: <run_dir>/curves.png). Returns the path."""
  run_dir = pathlib.Path(run_dir)
  metrics_path = run_dir / "metrics.jsonl"
  if not metrics_path.is_file():
    raise UserError(f"{metrics_path} does not exist: is {run_dir} a run directory?")
  try:
    records = report.read_metrics(metrics_path)
  except (OSError, ValueError) as e:
    raise UserError(f"{metrics_path} is unreadable: {e}")
  train = [r for r in records if r.get("kind") == "train" and "loss" in r]
  evals = [r for r in records if r.get("kind") == "eval" and "val_loss" in r]
  if not train and not evals:
    raise UserError(f"{metrics_path} holds no train or eval records yet")
  full = _full_evals(run_dir)
  syntax = [r for r in evals if "syntax_rate" in r], [r for r in full if "syntax_rate" in r]

  plt = _pyplot()
  panels = 3 if any(syntax) else 2
  fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), constrained_layout=True)
  fig.suptitle(f"{run_dir.name}: {len(train)} train / {len(evals)} eval records")
  _loss_panels(plt, axes[:2], train, evals, full)
  if panels == 3:
    _syntax_panel(plt, axes[2], *syntax)
  out = pathlib.Path(out) if out else run_dir / "curves.png"
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=110, format="png")  # the path as given, whatever its suffix
  plt.close(fig)
  return out


def _loss_panels(plt, axes, train: list, evals: list, full: list) -> None:
  """Loss against steps and against tokens, in nats (left axis) and bits (right)."""
  tokens_per_step = next((r["tokens"] / r["step"] for r in train + evals
                          if r.get("step") and r.get("tokens")), None)
  for ax, x, label in ((axes[0], "step", "step"), (axes[1], "tokens", "tokens (characters)")):
    ax.plot([r[x] for r in train if x in r], [r["loss"] for r in train if x in r],
            color=TRAIN, lw=1, label="train")
    ax.plot([r[x] for r in evals if x in r], [r["val_loss"] for r in evals if x in r],
            color=VAL, marker="o", ms=3, label="val (periodic, part of the split)")
    if full and (x == "step" or tokens_per_step):
      scale = 1 if x == "step" else tokens_per_step
      ax.plot([r["step"] * scale for r in full], [r["val_loss"] for r in full], ls="none",
              color=FULL, marker="D", ms=5, label="val (whole split, evaluate)")
    ax.set_xlabel(label)
    ax.set_ylabel("loss (nats/char)")
    ax.secondary_yaxis("right", functions=(lambda n: n / math.log(2), lambda b: b * math.log(2))
                       ).set_ylabel("bits/char")
    ax.grid(alpha=0.3)
    ax.legend()
  axes[0].xaxis.set_major_locator(plt.MaxNLocator(integer=True))
  axes[0].set_title("loss vs steps")
  axes[1].set_title("loss vs tokens")


def _syntax_panel(plt, ax, during: list, evaluated: list) -> None:
  """The share of samples that parse, during training and from evaluate's reports."""
  if during:
    ax.plot([r["step"] for r in during], [100 * r["syntax_rate"] for r in during],
            color=VAL, marker="o", ms=3, label="during training")
  if evaluated:
    ax.plot([r["step"] for r in evaluated], [100 * r["syntax_rate"] for r in evaluated],
            ls="none", color=FULL, marker="D", ms=5, label="evaluate")
  ax.set_ylim(-2, 102)
  ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
  ax.set_xlabel("step")
  ax.set_ylabel("samples that parse (%)")
  ax.set_title("syntax validity vs steps")
  ax.grid(alpha=0.3)
  ax.legend()
