import json
import logging
import sys

import pytest

from helpers import run_command, run_module
from minigpt_jax import curves
from minigpt_jax.errors import UserError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(run_dir, syntax_rate: bool):
  run_dir.mkdir(parents=True, exist_ok=True)
  rows = []
  for step in range(10, 101, 10):
    rows.append({"kind": "train", "step": step, "tokens": step * 256, "loss": 4.0 - step / 50,
                 "grad_norm": 1.0, "lr": 1e-3})
    if step % 50 == 0:
      rec = {"kind": "eval", "step": step, "tokens": step * 256, "val_loss": 4.1 - step / 50,
             "val_bpc": (4.1 - step / 50) / 0.693}
      if syntax_rate:
        rec["syntax_rate"] = step / 200
      rows.append(rec)
  (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return run_dir


def test_plot_command_writes_a_png(tmp_path):
  run_dir = _write_run(tmp_path / "run", syntax_rate=True)
  r = run_command("minigpt_jax.plot", str(run_dir))
  assert r.returncode == 0, r.stderr
  png = (run_dir / "curves.png").read_bytes()
  assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def test_plot_run_reads_evaluate_reports_and_honours_out(tmp_path, caplog):
  run_dir = _write_run(tmp_path / "run", syntax_rate=False)
  (run_dir / "eval_step100.json").write_text(json.dumps(
      {"step": 100, "val": {"nats_per_char": 2.2}, "syntax": {"rate": 0.4}}))
  (run_dir / "eval_stepjunk.json").write_text("{not json")  # skipped with a warning, not fatal
  with caplog.at_level(logging.WARNING):
    assert [r["step"] for r in curves._full_evals(run_dir)] == [100]
  assert "skipping" in caplog.text and "eval_stepjunk.json" in caplog.text
  out = curves.plot_run(run_dir, tmp_path / "sub" / "c.png")
  assert out == tmp_path / "sub" / "c.png"
  assert out.read_bytes().startswith(PNG_MAGIC)
  assert not (run_dir / "curves.png").exists()


def test_missing_metrics_is_a_one_line_error(tmp_path):
  with pytest.raises(UserError, match="metrics.jsonl does not exist"):
    curves.plot_run(tmp_path)
  r = run_module("minigpt_jax.plot", str(tmp_path / "nowhere"))  # the exit status a shell sees
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:") and "metrics.jsonl" in lines[0]


def test_empty_metrics_is_an_error(tmp_path):
  (tmp_path / "metrics.jsonl").write_text("\n")
  with pytest.raises(UserError, match="no train or eval records"):
    curves.plot_run(tmp_path)


def test_missing_matplotlib_gives_the_install_hint(tmp_path, monkeypatch):
  run_dir = _write_run(tmp_path / "run", syntax_rate=False)
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
  with pytest.raises(UserError, match=r"pip install -e \.\[plot\]"):
    curves.plot_run(run_dir)
  assert not (run_dir / "curves.png").exists()


@pytest.mark.parametrize("bad,problem", [
    ({"kind": "eval", "step": 60, "val_loss": 3.0, "syntax_rate": {}}, "its syntax_rate is {}, not a number"),
    ({"kind": "train", "step": 60, "loss": 1e308}, "its loss is past 1e+100"),
    ({"kind": "train", "step": 60, "tokens": 10**400, "loss": 1.0}, "its tokens is past 1e+100"),
    ({"kind": "train", "step": 60, "loss": "low"}, "its loss is 'low', not a number"),
    ({"kind": ["train"], "step": 60, "loss": 1.0}, "its kind is ['train']"),
    ({"kind": "train", "step": True, "loss": 1.0}, "its step is True, not an integer"),
])
def test_a_metrics_line_with_a_value_the_plot_cannot_draw_is_skipped(tmp_path, caplog, bad, problem):
  run_dir = _write_run(tmp_path / "run", syntax_rate=True)
  with open(run_dir / "metrics.jsonl", "a") as f:
    f.write(json.dumps(bad) + "\n")
  with caplog.at_level(logging.WARNING):
    out = curves.plot_run(run_dir)
  assert out.read_bytes().startswith(PNG_MAGIC)
  assert f"line 13 is not a metrics record ({problem}); skipped" in caplog.text


def test_a_metrics_line_nested_too_deep_is_skipped(tmp_path, caplog):
  run_dir = _write_run(tmp_path / "run", syntax_rate=False)
  with open(run_dir / "metrics.jsonl", "a") as f:
    f.write('{"kind": "train", "step": 60, "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
  with caplog.at_level(logging.WARNING):
    assert curves.plot_run(run_dir).read_bytes().startswith(PNG_MAGIC)
  assert "line 13 is not a metrics record (JSON nested more than 32 deep)" in caplog.text


def test_a_diverged_runs_infinite_or_nan_loss_is_still_drawn(tmp_path, caplog):
  run_dir = _write_run(tmp_path / "run", syntax_rate=False)
  with open(run_dir / "metrics.jsonl", "a") as f:
    f.write('{"kind": "train", "step": 110, "loss": Infinity}\n'
            '{"kind": "train", "step": 120, "loss": NaN}\n')
  with caplog.at_level(logging.WARNING):
    assert curves.plot_run(run_dir).read_bytes().startswith(PNG_MAGIC)
  assert "skipped" not in caplog.text


@pytest.mark.parametrize("report", [
    {"step": 100, "val": {"nats_per_char": 2.2}, "syntax": {"rate": {}}},
    {"step": 100, "val": {"nats_per_char": 1e308}},
    {"step": 100, "val": {"nats_per_char": 2.2}, "syntax": []},
    {"step": "100", "val": {"nats_per_char": 2.2}},
])
def test_an_evaluate_report_with_a_value_the_plot_cannot_draw_is_skipped(tmp_path, caplog, report):
  run_dir = _write_run(tmp_path / "run", syntax_rate=True)
  (run_dir / "eval_step100.json").write_text(json.dumps(report))
  with caplog.at_level(logging.WARNING):
    assert curves.plot_run(run_dir).read_bytes().startswith(PNG_MAGIC)
  assert "skipping" in caplog.text and "eval_step100.json" in caplog.text
