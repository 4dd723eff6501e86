"""What only a GPU runs: bf16 compute with cuDNN flash attention, the cuDNN probe, and the
benchmark's memory and MFU fields. `pytest -m gpu` on a machine with JAX's CUDA build;
elsewhere these are skipped (CI runs on CPUs)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from helpers import model_config
from minigpt_jax import generate, hardware, throughput, train_loop, train_step
from minigpt_jax.model import MiniGPT, init_params

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    jax.default_backend() != "gpu", reason="needs an NVIDIA GPU and JAX's CUDA build")]

# A model shape cuDNN's flash attention runs: head width 64, context a multiple of 64.
CFG = model_config(context_len=128, d_model=128, n_heads=2, d_ff=256, compute_dtype="bfloat16")


def test_auto_resolves_to_bf16_and_cudnn_here():
  cfg = hardware.resolve(dataclasses.replace(CFG, compute_dtype="auto", attention_impl="auto"))
  assert (cfg.compute_dtype, cfg.attention_impl) == ("bfloat16", "cudnn")


def test_cudnn_attention_equals_xla_forward_and_gradients():
  params = init_params(CFG, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (4, 128), 0, 99)
  targets = jnp.roll(tokens, -1, axis=1)
  out = {}
  for impl in ("xla", "cudnn"):
    cfg = dataclasses.replace(CFG, attention_impl=impl)
    logits = MiniGPT(cfg).apply({"params": params}, tokens)[0]
    grads = jax.grad(train_step.loss_fn)(params, cfg, tokens, targets)
    out[impl] = logits, grads
  np.testing.assert_allclose(out["cudnn"][0], out["xla"][0], atol=3e-2, rtol=3e-2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=3e-2, rtol=5e-2),
               out["cudnn"][1], out["xla"][1])


def test_bf16_cached_equals_uncached_greedy():
  params = init_params(CFG, jax.random.key(2))
  prompts = [np.arange(2, 2 + n) for n in (3, 17)]
  kw = dict(max_new_tokens=40, sampling=generate.SamplingConfig(greedy=True), stop_at_eos=False)
  a = generate.generate_tokens(params, CFG, prompts, **kw)
  b = generate.generate_tokens(params, CFG, prompts, use_cache=False, **kw)
  np.testing.assert_array_equal(a, b)


def test_short_bf16_training_loss_falls(tiny_config):
  tiny_config.train.steps = 40
  tiny_config.train.log_every = 5
  tiny_config.sample.num_samples = 1
  s = train_loop.train(tiny_config, log=lambda *_: None)
  first, last = s.train_losses[5], s.train_losses[40]
  assert last < first - 0.8, s.train_losses


def test_bench_reports_memory_and_mfu():
  c = tiny.get_config()
  result = throughput.run(c, batch_sizes=[8], decode_batches=[1], decode_tokens=8,
                          skip_uncached=True, train_steps=2, repeats=1, warmup=1,
                          log=lambda *_: None)
  row = result["train"]["results"][0]
  assert result["platform"] == "gpu" and result["compute_dtype"] == "bfloat16"
  assert row["peak_memory_bytes"] > 0 and row["tokens_per_s"] > 0
  if hardware.peak_flops() is not None:  # a GPU in the table (H100, H200, A100)
    assert 0 < row["mfu"] < 1
