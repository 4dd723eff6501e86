import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minigpt_jax.config import base_config
from minigpt_jax.errors import UserError
from minigpt_jax.model import (KVCache, MiniGPT, ModelConfig, MultiHeadAttention,
                               SingleHeadAttention, flops_per_token, init_params, param_count)

SMALL = ModelConfig(vocab_size=99, context_len=32, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                    vocab_pad_multiple=1)


def test_full_config_parameter_count_without_allocating():
  cfg = ModelConfig.from_config(base_config().model, vocab_size=99, platform="cpu")
  shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
  D, F, L, T, V, Vp = 512, 2048, 8, 512, 99, 128
  per_layer = 2 * D + (D * 3 * D + 3 * D) + (D * D + D) + 2 * D + (D * F + F) + (F * D + D)
  expected = V * D + T * D + L * per_layer + 2 * D + D * Vp
  assert param_count(shapes) == expected
  assert 25.0e6 < expected < 26.0e6
  assert shapes["block_0"]["attn"]["qkv"]["kernel"].shape == (D, 3, 8, 64)


def test_flops_per_token_full_config():
  cfg = ModelConfig(vocab_size=99)
  matmul = 8 * (4 * 512 * 512 + 2 * 512 * 2048) + 512 * 128
  assert flops_per_token(cfg) == 6 * matmul + 12 * 8 * 512 * 512
  assert flops_per_token(cfg) == pytest.approx(176e6, rel=0.01)


def test_output_shapes_and_float32_logits():
  params = init_params(SMALL, jax.random.key(0))
  tokens = jnp.zeros((3, 20), jnp.int32)
  logits, cache = MiniGPT(SMALL).apply({"params": params}, tokens)
  assert logits.shape == (3, 20, 99) and logits.dtype == jnp.float32 and cache is None
  bf16 = ModelConfig(**{**SMALL.__dict__, "compute_dtype": "bfloat16"})
  logits16, _ = MiniGPT(bf16).apply({"params": params}, tokens)
  assert logits16.dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_padded_vocab_is_sliced_off():
  cfg = ModelConfig(**{**SMALL.__dict__, "vocab_pad_multiple": 128})
  params = init_params(cfg, jax.random.key(0))
  assert params["lm_head"]["kernel"].shape == (32, 128)
  logits, _ = MiniGPT(cfg).apply({"params": params}, jnp.zeros((1, 4), jnp.int32))
  assert logits.shape == (1, 4, 99)


def test_causality():
  params = init_params(SMALL, jax.random.key(0))
  a = jax.random.randint(jax.random.key(1), (2, 24), 0, 99)
  t = 10
  b = a.at[:, t + 1:].set(jax.random.randint(jax.random.key(2), (2, 24 - t - 1), 0, 99))
  la, _ = MiniGPT(SMALL).apply({"params": params}, a)
  lb, _ = MiniGPT(SMALL).apply({"params": params}, b)
  np.testing.assert_array_equal(la[:, :t + 1], lb[:, :t + 1])
  assert not np.allclose(la[:, t + 1:], lb[:, t + 1:])


def test_fused_multi_head_equals_concatenated_single_heads():
  cfg = SMALL
  x = jax.random.normal(jax.random.key(0), (2, 12, cfg.d_model))
  mha = MultiHeadAttention(cfg)
  p = mha.init(jax.random.key(1), x)["params"]
  fused, _ = mha.apply({"params": p}, x)

  heads = []
  for h in range(cfg.n_heads):  # slice the fused [D, 3, H, K] projection into one head's weights
    hp = {name: {"kernel": p["qkv"]["kernel"][:, i, h], "bias": p["qkv"]["bias"][i, h]}
          for i, name in enumerate(["query", "key", "value"])}
    heads.append(SingleHeadAttention(cfg).apply({"params": hp}, x))
  concat_BTHK = jnp.stack(heads, axis=2)
  reference = jnp.einsum("bthk,hkd->btd", concat_BTHK, p["out"]["kernel"]) + p["out"]["bias"]
  np.testing.assert_allclose(fused, reference, atol=1e-5, rtol=1e-5)


def test_left_padding_is_invisible():
  params = init_params(SMALL, jax.random.key(0))
  real = jax.random.randint(jax.random.key(1), (1, 9), 2, 99)
  padded = jnp.concatenate([jnp.zeros((1, 5), jnp.int32), real], axis=1)
  plain, _ = MiniGPT(SMALL).apply({"params": params}, real)
  shifted, _ = MiniGPT(SMALL).apply({"params": params}, padded, start_B=jnp.array([5]))
  np.testing.assert_allclose(shifted[:, 5:], plain, atol=1e-5)


def test_shape_checks_name_the_layer():
  params = init_params(SMALL, jax.random.key(0))
  with pytest.raises(ValueError, match=r"MiniGPT: tokens has shape \(4,\), expected \(\?, \?\)"):
    MiniGPT(SMALL).apply({"params": params}, jnp.zeros((4,), jnp.int32))
  with pytest.raises(ValueError, match="exceed the context length 32"):
    MiniGPT(SMALL).apply({"params": params}, jnp.zeros((1, 33), jnp.int32))
  x = jnp.zeros((2, 5, 16))
  with pytest.raises(ValueError, match=r"MultiHeadAttention: x has shape \(2, 5, 16\), expected \(\?, \?, 32\)"):
    MultiHeadAttention(SMALL).init(jax.random.key(0), x)
  wrong = KVCache.init(ModelConfig(**{**SMALL.__dict__, "n_heads": 2}), 1, 8)
  with pytest.raises(ValueError, match="cached keys has shape"):
    MiniGPT(SMALL).apply({"params": params}, jnp.zeros((1, 3), jnp.int32), cache=wrong)


def test_auto_resolution(monkeypatch):
  from minigpt_jax import model
  m = base_config().model
  cpu = ModelConfig.from_config(m, 99, platform="cpu")
  assert (cpu.compute_dtype, cpu.attention_impl) == ("float32", "xla")
  monkeypatch.setattr(model, "_cudnn_attention_works", lambda dtype: True)
  gpu = ModelConfig.from_config(m, 99, platform="gpu")
  assert (gpu.compute_dtype, gpu.attention_impl) == ("bfloat16", "cudnn")
  monkeypatch.setattr(model, "_cudnn_attention_works", lambda dtype: False)
  assert ModelConfig.from_config(m, 99, platform="gpu").attention_impl == "xla"


def test_explicit_cudnn_attention_where_it_cannot_run_is_a_clear_error(monkeypatch):
  from minigpt_jax import model
  m = base_config().model
  m.attention_impl = "cudnn"
  with pytest.raises(UserError, match="needs an NVIDIA GPU.*here: cpu, float32"):
    ModelConfig.from_config(m, 99, platform="cpu")
  monkeypatch.setattr(model, "_cudnn_attention_works", lambda dtype: False)
  with pytest.raises(UserError, match="here: gpu, bfloat16"):
    ModelConfig.from_config(m, 99, platform="gpu")
  monkeypatch.setattr(model, "_cudnn_attention_works", lambda dtype: True)
  assert ModelConfig.from_config(m, 99, platform="gpu").attention_impl == "cudnn"
  m.compute_dtype = "float32"
  with pytest.raises(UserError, match="here: gpu, float32"):
    ModelConfig.from_config(m, 99, platform="gpu")
