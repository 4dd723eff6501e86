"""TensorBoard event files next to metrics.jsonl, read back the way TensorBoard reads them."""

import logging
import sys

import numpy as np

from minigpt_jax import report, train_loop

quiet = lambda *_: None


def read_events(run_dir) -> tuple[dict, dict]:
  """({tag: {step: value}} of the scalars, {tag: {step: text}} of the texts) in `run_dir`."""
  from tensorboard.backend.event_processing import event_accumulator  # in the test extra
  ea = event_accumulator.EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
  ea.Reload()
  scalars = {t: {e.step: e.value for e in ea.Scalars(t)} for t in ea.Tags()["scalars"]}
  texts = {t: {e.step: e.tensor_proto.string_val[0].decode() for e in ea.Tensors(t)}
           for t in ea.Tags()["tensors"]}
  return scalars, texts


def test_training_writes_event_files_with_the_values_of_metrics_jsonl(tiny_config):
  tiny_config.train.steps, tiny_config.train.log_every = 20, 5
  s = train_loop.train(tiny_config, log=quiet)
  rows = report.read_metrics(s.run_dir / "metrics.jsonl")
  scalars, texts = read_events(s.run_dir)
  train = [r for r in rows if r["kind"] == "train"]
  evals = [r for r in rows if r["kind"] == "eval"]
  assert [r["step"] for r in train] == [5, 10, 15, 20] and [r["step"] for r in evals] == [10, 20]
  close = lambda tag, records, key: np.testing.assert_allclose(
      [scalars[tag][r["step"]] for r in records], [r[key] for r in records], rtol=1e-6)
  for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
    assert sorted(scalars[f"train/{key}"]) == [r["step"] for r in train]
    close(f"train/{key}", train, key)
  for key in ("val_loss", "val_bpc", "syntax_rate"):
    assert sorted(scalars[f"eval/{key}"]) == [r["step"] for r in evals]
    close(f"eval/{key}", evals, key)
  for r in evals:
    assert len(r["samples"]) == 1
    assert r["samples"][0] in texts["samples/0/text_summary"][r["step"]]


def test_without_the_writer_training_still_writes_metrics_jsonl(tiny_config, monkeypatch,
                                                                 caplog):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # `import tensorboardX` now fails
  tiny_config.train.steps, tiny_config.sample.num_samples = 10, 0
  with caplog.at_level(logging.INFO):
    s = train_loop.train(tiny_config, log=quiet)
  rows = report.read_metrics(s.run_dir / "metrics.jsonl")
  assert [r["step"] for r in rows if r["kind"] == "train"] == [5, 10]
  assert not list(s.run_dir.glob("events.out.tfevents.*"))
  notes = [r for r in caplog.records if "tensorboard" in r.getMessage().lower()]
  assert len(notes) <= 1 and all(r.levelno <= logging.INFO for r in notes)


def test_only_the_lead_process_writes_event_files(tmp_path):
  for lead, name in ((True, "lead"), (False, "other")):
    (tmp_path / name).mkdir()
    r = report.TrainReporter(tmp_path / name, lead, 0, 10, 100, mfu_fn=lambda _: None)
    r.train(5, {"loss": 1.0, "grad_norm": 2.0, "lr": 1e-3})
    r.close()
  assert list((tmp_path / "lead").glob("events.out.tfevents.*"))
  assert not list((tmp_path / "other").glob("*"))
