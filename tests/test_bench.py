"""The benchmark: its pure helpers, and one tiny end-to-end run of the CLI (no timing thresholds)
in this process; a bad input's exit status in a fresh one."""

import json
import math
import statistics
import types

import jax
import jax.numpy as jnp
import pytest

from configs import tiny
from helpers import REPO, one_line_error, run_command, run_module
from minigpt_jax import hardware, throughput
from minigpt_jax.errors import UserError
from minigpt_jax.model import ModelConfig
from minigpt_jax.tokenizer import CharTokenizer

TINY = str(REPO / "configs" / "tiny.py")


def _fake_device(kind="cpu", stats=None):
  return types.SimpleNamespace(device_kind=kind, memory_stats=lambda: stats)


def test_timed_repeats_measures_each_call_with_the_clock():
  ticks = iter([10.0, 11.0, 20.0, 22.5, 30.0, 30.5])
  calls = []
  seconds = throughput.timed_repeats(lambda: calls.append(1), 3, clock=lambda: next(ticks))
  assert seconds == [1.0, 2.5, 0.5]
  assert len(calls) == 3


def test_rate_is_count_over_median_seconds():
  tok_s, each = throughput.rate(100, [1.0, 4.0, 2.0])
  assert tok_s == 50.0
  assert each == [100.0, 25.0, 50.0]


@pytest.mark.parametrize("kind, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12),
                                        ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
                                        ("NVIDIA H200 NVL", 835e12),
                                        ("NVIDIA A100-SXM4-80GB", 312e12), ("cpu", None),
                                        ("TPU v5 lite", None)])
def test_peak_flops_table(kind, peak):
  assert hardware.peak_flops(_fake_device(kind)) == peak


def test_mfu_is_achieved_over_peak_times_devices_and_none_when_unknown():
  h100 = _fake_device("NVIDIA H100 80GB HBM3")
  expected = 176.6e6 * 2.5e6 / (989e12 * jax.device_count())
  assert hardware.mfu(176.6e6, 2.5e6, h100) == pytest.approx(expected)
  assert hardware.mfu(176.6e6, 2.5e6, _fake_device("cpu")) is None


def test_peak_memory_bytes_is_none_when_the_backend_reports_nothing():
  assert throughput.peak_memory_bytes(_fake_device(stats=None)) is None
  assert throughput.peak_memory_bytes(_fake_device(stats={"bytes_in_use": 3})) is None
  assert throughput.peak_memory_bytes(_fake_device(stats={"peak_bytes_in_use": 7})) == 7


def test_compiled_memory_reports_buffer_sizes():
  compiled = jax.jit(lambda x: x @ x).lower(jnp.ones((8, 8), jnp.float32)).compile()
  mem = hardware.compiled_memory(compiled)
  assert set(mem) == {"argument_bytes", "output_bytes", "alias_bytes", "temp_bytes"}
  assert mem["argument_bytes"] == 8 * 8 * 4


def test_speedups_pair_only_rows_measured_both_ways():
  rows = [{"mode": "cached", "batch": 1, "new_tokens": 64, "tokens_per_s": 300.0},
          {"mode": "cached", "batch": 1, "new_tokens": 511, "tokens_per_s": 500.0},
          {"mode": "uncached", "batch": 1, "new_tokens": 64, "tokens_per_s": 100.0},
          {"mode": "uncached", "batch": 8, "new_tokens": 64, "tokens_per_s": 100.0}]
  assert throughput.speedups(rows) == [{"batch": 1, "new_tokens": 64, "cached_over_uncached": 3.0}]


def test_decode_plan_gives_every_uncached_run_a_cached_twin():
  assert throughput.decode_plan([1, 8], 511, 64, False) == [
      (True, 1, 64), (True, 1, 511), (True, 8, 64), (True, 8, 511), (False, 1, 64),
      (False, 8, 64)]
  assert throughput.decode_plan([1], 511, 511, False) == [(True, 1, 511), (False, 1, 511)]
  assert throughput.decode_plan([1, 8], 511, 64, True) == [(True, 1, 511), (True, 8, 511)]
  assert throughput.decode_plan([], 511, 64, False) == []


def test_parse_sizes():
  assert throughput.parse_sizes(["8", "32", "128"], "batch_sizes") == [8, 32, 128]
  assert throughput.parse_sizes([], "batch_sizes") == []
  assert throughput.parse_sizes(None, "batch_sizes") is None
  for bad in (["8", "x"], ["0"], ["-4"]):
    with pytest.raises(UserError, match="batch_sizes"):
      throughput.parse_sizes(bad, "batch_sizes")


def test_bench_cli_on_tiny_config(tmp_path):
  out = tmp_path / "not" / "yet" / "bench.json"  # folders are made, as by evaluate
  proc = run_command("minigpt_jax.bench", "--config", TINY, "--batch_sizes=4,2",
                     "--decode_batches=2", "--decode_tokens=4", "--long_tokens=70",
                     "--train_steps=2", "--repeats=2", "--warmup=1", f"--json_out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout)
  assert json.loads(out.read_text()) == result
  assert "cached/uncached" in proc.stderr  # the table

  cfg = hardware.resolve(ModelConfig.from_section(tiny.get_config().model, CharTokenizer().vocab_size), "cpu")
  assert result["schema"] == throughput.SCHEMA
  assert result["platform"] == "cpu" and result["device_count"] >= 1
  assert set(result["versions"]) >= {"jax", "jaxlib", "flax", "optax"}
  # configs/tiny.py: D 32, F 64, L 2, T 32, V 99 (unpadded, untied head). Training FLOPs
  # 6 * (L * (4 D^2 + 2 D F) + D V) + 12 L D T = 6 * (2 * 8192 + 3168) + 24576;
  # parameters V D + T D + L * 8544 (two norms, qkv, proj, ffn) + 2 D + D V.
  tiny_flops = 141_888
  assert result["flops_per_token"] == tiny_flops
  assert result["param_count"] == 24_512  # what training prints for it (test_cli)
  assert (result["compute_dtype"], result["attention_impl"]) == ("float32", "xla")
  assert result["peak_flops_per_device"] is None

  train = result["train"]["results"]
  assert [r["batch_size"] for r in train] == [2, 4]  # run smallest first
  for r in train:
    assert r["tokens_per_step"] == r["batch_size"] * cfg.context_len
    assert r["tokens_per_s"] > 0 and len(r["tokens_per_s_repeats"]) == 2
    assert r["compile_s"] > 0 and r["lower_s"] > 0
    assert r["tflops_per_s"] == pytest.approx(r["tokens_per_s"] * tiny_flops / 1e12)
    assert r["mfu"] is None  # unknown peak on CPU
    assert r["peak_memory_bytes"] is None or r["peak_memory_bytes"] > 0
    # Random weights on uniformly random ids: the loss sits at ln(vocab).
    assert abs(r["final_loss"] - math.log(cfg.vocab_size)) < 0.3

  decode = result["decode"]["results"]
  got = sorted((r["mode"], r["batch"], r["new_tokens"]) for r in decode)
  assert got == [("cached", 2, 4), ("uncached", 2, 4)]
  for r in decode:
    assert r["tokens_per_s"] > 0
    assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["new_tokens"] / r["seconds"])
  speed = {(s["batch"], s["new_tokens"]): s["cached_over_uncached"]
           for s in result["decode"]["speedups"]}
  assert list(speed) == [(2, 4)] and speed[2, 4] > 0
  assert result["decode"]["cache_segment"] == throughput.generate.DECODE_SEGMENT  # as when sampling
  [long] = result["decode"]["long"]  # 70 tokens: past the tiny context of 32, twice
  assert (long["batch"], long["new_tokens"], long["in_context_tokens"]) == (2, 70, 31)
  assert len(long["long_over_in_context_repeats"]) == 2
  assert long["long_over_in_context"] == pytest.approx(
      statistics.median(long["long_over_in_context_repeats"]))
  assert "long" in proc.stderr


def test_bench_cli_refuses_too_many_decode_tokens():
  """In a fresh process: the exit status a shell sees (the cases below run in this one)."""
  proc = run_module("minigpt_jax.bench", "--config", TINY, "--decode_tokens=32", timeout=60)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: decode tokens must be in [1, 31]")


@pytest.mark.parametrize("args,fragments", [
    (["--config.model.n_heads=3"], ["model.d_model 32", "model.n_heads 3"]),
    (["--json_out=/"], ["cannot write /", "it is a folder", "--json_out"]),
    (["--decode_segment=-1"], ["--decode_segment", "got -1"]),
    (["--decode_segment=4"], ["--decode_segment", ">= 16", "got 4"]),
    (["--decode_unroll=0"], ["--decode_unroll must be >= 1"]),
])
def test_bench_cli_config_mistakes_are_one_line_errors(args, fragments):
  one_line_error(run_command("minigpt_jax.bench", "--config", TINY, *args), *fragments)
