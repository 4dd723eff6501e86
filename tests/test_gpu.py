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
from minigpt_jax import generate, hardware, reference, throughput, train_loop, train_step
from minigpt_jax.model import MiniGPT, init_params
from minigpt_jax.prompts import pad_prompts

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


# How far below its row's maximum (uncached logits) a bf16 greedy pick of the cached decode
# may be. The two paths multiply different shapes (one query against the cache, a whole
# window at once), so bf16 rounds differently in each: their logits agree within 2e-2
# (tests/test_generate.py, measured 2e-3 on the CPU), and a pick that is the cached path's
# maximum is then within 2 x 2e-2 of the uncached one's, which on a near-tie is another token.
PICK_TOL = 4e-2


def greedy_picks_and_full_forward(cfg, params, prompts, new_tokens):
  """The cached path's greedy tokens, and the logits of one uncached forward pass over the
  prompt and those tokens (teacher-forced) that predict each of them: [B, new_tokens, V]."""
  kw = dict(max_new_tokens=new_tokens, sampling=generate.SamplingConfig(greedy=True),
            stop_at_eos=False)
  picks = generate.generate_tokens(params, cfg, prompts, **kw)
  tokens_BP, start_B = pad_prompts(prompts, new_tokens, cfg.context_len)
  P = tokens_BP.shape[1]
  assert P + new_tokens <= cfg.context_len  # one window: no restarts
  seq = jnp.asarray(np.concatenate([tokens_BP, picks], axis=1))
  logits, _ = MiniGPT(cfg).apply({"params": generate.compute_params(params, cfg)}, seq,
                                 start_B=jnp.asarray(start_B))
  return picks, np.asarray(logits[:, P - 1:-1, :cfg.vocab_size], np.float32)


def test_bf16_cached_greedy_picks_are_the_uncached_maximum_within_rounding():
  params = init_params(CFG, jax.random.key(2))
  prompts = [np.arange(2, 2 + n) for n in (3, 17)]
  picks, logits = greedy_picks_and_full_forward(CFG, params, prompts, 40)
  picked = np.take_along_axis(logits, picks[..., None], axis=-1)[..., 0]
  below = logits.max(-1) - picked
  assert below.max() <= PICK_TOL, below
  # Not vacuous: a row's logits spread far wider than the tolerance.
  assert (logits.max(-1) - logits.min(-1)).min() > 10 * PICK_TOL


def test_float32_cached_equals_uncached_greedy():
  """In float32, with float32 matmuls (not TF32, JAX's default on recent GPUs), the two
  paths' logits agree to ~1e-6: the same tokens."""
  cfg = dataclasses.replace(CFG, compute_dtype="float32", attention_impl="xla")
  params = init_params(cfg, jax.random.key(2))
  prompts = [np.arange(2, 2 + n) for n in (3, 17)]
  kw = dict(max_new_tokens=40, sampling=generate.SamplingConfig(greedy=True), stop_at_eos=False)
  with jax.default_matmul_precision("float32"):
    a = generate.generate_tokens(params, cfg, prompts, **kw)
    b = reference.generate_tokens(params, cfg, prompts, **kw)
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
