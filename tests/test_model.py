import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import SMALL_MODEL
from minigpt_jax import config as config_lib
from minigpt_jax import hardware
from minigpt_jax.config import base_config
from minigpt_jax.errors import UserError
from minigpt_jax.model import (KVCache, MiniGPT, ModelConfig, MultiHeadAttention, _dense_init,
                               attend, attention_mask, causal_attention, check_shape,
                               flops_per_token, init_params, param_count)

SMALL = SMALL_MODEL


@functools.partial(jax.jit, static_argnums=0)
def forward(cfg, params, tokens_BT, start_B=None):
  """The model's forward pass compiled as one program: op by op, each op would compile."""
  return MiniGPT(cfg).apply({"params": params}, tokens_BT, start_B)


def params_of(cfg):
  return jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))


def test_full_config_parameter_count_without_allocating():
  cfg = hardware.resolve(ModelConfig.from_section(base_config().model, 99), "cpu")
  shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
  D, F, L, T, V, Vp = 512, 2048, 8, 512, 99, 128
  per_layer = 2 * D + (D * 3 * D + 3 * D) + (D * D + D) + 2 * D + (D * F + F) + (F * D + D)
  expected = V * D + T * D + L * per_layer + 2 * D + D * Vp
  assert param_count(shapes) == expected
  assert 25.0e6 < expected < 26.0e6
  assert shapes["block_0"]["attn"]["qkv"]["kernel"].shape == (D, 3, 8, 64)


def test_flops_per_token_full_config():
  cfg = ModelConfig.from_section(base_config().model, 99)
  matmul = 8 * (4 * 512 * 512 + 2 * 512 * 2048) + 512 * 128
  assert flops_per_token(cfg) == 6 * matmul + 12 * 8 * 512 * 512
  assert flops_per_token(cfg) == pytest.approx(176e6, rel=0.01)


def test_output_shapes_and_float32_logits():
  params = params_of(SMALL)
  tokens = jnp.zeros((3, 20), jnp.int32)
  logits, cache = forward(SMALL, params, tokens)
  assert logits.shape == (3, 20, 99) and logits.dtype == jnp.float32 and cache is None
  bf16 = dataclasses.replace(SMALL, compute_dtype="bfloat16")
  logits16, _ = forward(bf16, params, tokens)
  assert logits16.dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_padded_vocab_is_sliced_off():
  cfg = dataclasses.replace(SMALL, vocab_pad_multiple=128)
  params = params_of(cfg)
  assert params["lm_head"]["kernel"].shape == (32, 128)
  logits, _ = forward(cfg, params, jnp.zeros((1, 4), jnp.int32))
  assert logits.shape == (1, 4, 99)


def test_causality():
  params = params_of(SMALL)
  a = jax.random.randint(jax.random.key(1), (2, 24), 0, 99)
  t = 10
  b = a.at[:, t + 1:].set(jax.random.randint(jax.random.key(2), (2, 24 - t - 1), 0, 99))
  la, _ = forward(SMALL, params, a)
  lb, _ = forward(SMALL, params, b)
  np.testing.assert_array_equal(la[:, :t + 1], lb[:, :t + 1])
  assert not np.allclose(la[:, t + 1:], lb[:, t + 1:])


class SingleHeadAttention(nn.Module):
  """One causal attention head, written out step by step: the reference the fused
  `MultiHeadAttention` is tested against."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg
    check_shape(self, "x", x_BTD, (None, None, cfg.d_model))
    dense = lambda name: nn.Dense(cfg.head_dim, dtype=cfg.dtype, kernel_init=_dense_init(), name=name)
    q_BTK, k_BTK, v_BTK = dense("query")(x_BTD), dense("key")(x_BTD), dense("value")(x_BTD)
    scores_BTT = jnp.einsum("btk,bsk->bts", q_BTK, k_BTK) / math.sqrt(cfg.head_dim)
    T = x_BTD.shape[1]
    causal_TT = jnp.tril(jnp.ones((T, T), bool))
    scores_BTT = jnp.where(causal_TT, scores_BTT.astype(jnp.float32), -jnp.inf)
    out_BTK = jnp.einsum("bts,bsk->btk", jax.nn.softmax(scores_BTT, -1).astype(cfg.dtype), v_BTK)
    check_shape(self, "output", out_BTK, x_BTD.shape[:2] + (cfg.head_dim,))
    return out_BTK


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


def test_attention_and_its_gradients_equal_jaxs_own_attention():
  q, k, v, g = jax.random.normal(jax.random.key(0), (4, 2, 16, 4, 8))
  mask = attention_mask(jnp.arange(16), jnp.arange(16))
  ours = lambda q, k, v: (attend(q, k, v, mask) * g).sum()
  jaxs = lambda q, k, v: (jax.nn.dot_product_attention(q, k, v, is_causal=True) * g).sum()
  value_and_grads = lambda f: jax.jit(jax.value_and_grad(f, (0, 1, 2)))(q, k, v)  # one compile
  (ours_value, ours_grads), (jaxs_value, jaxs_grads) = value_and_grads(ours), value_and_grads(jaxs)
  for a, b in zip(ours_grads, jaxs_grads):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(ours_value, jaxs_value, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block", [16, 7, 40])  # even blocks, a short last block, one block
def test_blocked_causal_attention_equals_the_masked_whole(block):
  q, k, v, g = jax.random.normal(jax.random.key(1), (4, 2, 40, 4, 8))
  whole = lambda q, k, v: (jax.nn.dot_product_attention(q, k, v, is_causal=True) * g).sum()
  blocked = lambda q, k, v: (causal_attention(q, k, v, block) * g).sum()
  value_and_grads = lambda f: jax.jit(jax.value_and_grad(f, (0, 1, 2)))(q, k, v)  # one compile
  (blocked_value, blocked_grads), (whole_value, whole_grads) = map(value_and_grads, (blocked, whole))
  np.testing.assert_allclose(blocked_value, whole_value, atol=1e-4, rtol=1e-5)
  for a, b in zip(blocked_grads, whole_grads):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_left_padding_is_invisible():
  params = params_of(SMALL)
  real = jax.random.randint(jax.random.key(1), (1, 9), 2, 99)
  padded = jnp.concatenate([jnp.zeros((1, 5), jnp.int32), real], axis=1)
  plain, _ = forward(SMALL, params, real)
  shifted, _ = forward(SMALL, params, padded, jnp.array([5]))
  np.testing.assert_allclose(shifted[:, 5:], plain, atol=1e-5)


def test_shape_checks_name_the_layer():
  params = params_of(SMALL)
  with pytest.raises(ValueError, match=r"MiniGPT: tokens has shape \(4,\), expected \(\?, \?\)"):
    MiniGPT(SMALL).apply({"params": params}, jnp.zeros((4,), jnp.int32))
  with pytest.raises(ValueError, match="exceed the context length 32"):
    MiniGPT(SMALL).apply({"params": params}, jnp.zeros((1, 33), jnp.int32))
  x = jnp.zeros((2, 5, 16))
  with pytest.raises(ValueError, match=r"MultiHeadAttention: x has shape \(2, 5, 16\), expected \(\?, \?, 32\)"):
    MultiHeadAttention(SMALL).init(jax.random.key(0), x)
  wrong = KVCache.init(dataclasses.replace(SMALL, n_heads=2), 1, 8)
  with pytest.raises(ValueError, match="cached keys has shape"):
    MiniGPT(SMALL).apply({"params": params}, jnp.zeros((1, 3), jnp.int32), cache=wrong)


FULL = ModelConfig.from_section(base_config().model, 99)  # "auto" compute and attention


def test_auto_resolution(monkeypatch):
  cpu = hardware.resolve(FULL, platform="cpu")
  assert (cpu.compute_dtype, cpu.attention_impl) == ("float32", "xla")
  monkeypatch.setattr(hardware, "cudnn_attention_works", lambda *shape: True)
  gpu = hardware.resolve(FULL, platform="gpu")
  assert (gpu.compute_dtype, gpu.attention_impl) == ("bfloat16", "cudnn")
  monkeypatch.setattr(hardware, "cudnn_attention_works", lambda *shape: False)
  assert hardware.resolve(FULL, platform="gpu").attention_impl == "xla"


def test_explicit_cudnn_attention_where_it_cannot_run_is_a_clear_error(monkeypatch):
  cudnn = dataclasses.replace(FULL, attention_impl="cudnn")
  with pytest.raises(UserError, match="needs an NVIDIA GPU.*here: cpu, float32"):
    hardware.resolve(cudnn, platform="cpu")
  monkeypatch.setattr(hardware, "cudnn_attention_works", lambda *shape: False)
  with pytest.raises(UserError, match="here: gpu, bfloat16"):
    hardware.resolve(cudnn, platform="gpu")
  monkeypatch.setattr(hardware, "cudnn_attention_works", lambda *shape: True)
  assert hardware.resolve(cudnn, platform="gpu").attention_impl == "cudnn"
  with pytest.raises(UserError, match="here: gpu, float32"):
    hardware.resolve(dataclasses.replace(cudnn, compute_dtype="float32"), platform="gpu")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's missing float16 dot")
def test_a_compute_dtype_the_cpu_cannot_run_is_refused_in_one_line():
  """XLA:CPU has no float16 dot with float32 accumulation: refused before any work."""
  with pytest.raises(UserError, match=r"model.compute_dtype='float16' does not run on this "
                                      r"machine's cpu backend \(.*F16_F16_F32.*\); use 'auto'"):
    hardware.resolve(dataclasses.replace(FULL, compute_dtype="float16"))
  assert hardware.resolve(dataclasses.replace(FULL, compute_dtype="bfloat16")).compute_dtype == \
      "bfloat16"  # runs on the CPU: not refused


def test_a_compute_dtype_is_probed_only_on_the_backend_at_hand(monkeypatch):
  monkeypatch.setattr(hardware, "compute_dtype_problem", lambda dtype: "no such dot")
  other = "gpu" if jax.default_backend() == "cpu" else "cpu"
  assert hardware.resolve(dataclasses.replace(SMALL_MODEL, compute_dtype="float16"),
                          platform=other).compute_dtype == "float16"
  with pytest.raises(UserError, match=r"\(no such dot\)"):
    hardware.resolve(dataclasses.replace(SMALL_MODEL, compute_dtype="float16"))
  assert hardware.resolve(dataclasses.replace(SMALL_MODEL, compute_dtype="auto"))  # not probed


def test_the_cudnn_probe_runs_the_models_own_shape(monkeypatch):
  """A fixed probe shape could pass where the model's head width or length cannot run."""
  seen = []

  def attention(q, k, v, is_causal, implementation):
    seen.append((q.shape, q.dtype, is_causal, implementation))
    return q

  monkeypatch.setattr(jax.nn, "dot_product_attention", attention)
  hardware.cudnn_attention_works.cache_clear()
  cfg = dataclasses.replace(FULL, context_len=256, n_heads=4)  # head width 128
  assert hardware.resolve(cfg, platform="gpu").attention_impl == "cudnn"
  hardware.cudnn_attention_works.cache_clear()
  assert seen == [((1, 256, 4, 128), jnp.bfloat16, True, "cudnn")]


def test_the_cudnn_probe_falls_back_when_only_the_backward_pass_fails(monkeypatch):
  """Training differentiates attention: a cuDNN whose forward kernel runs but whose backward
  does not must give XLA attention, not a failed compile of the training step."""
  calls = []

  @jax.custom_vjp
  def forward_only(q, k, v):
    return q

  def fwd(q, k, v):
    calls.append("forward")
    return q, None

  def bwd(_, g):
    calls.append("backward")
    raise RuntimeError("cuDNN: no backward kernel for this shape")

  forward_only.defvjp(fwd, bwd)
  monkeypatch.setattr(jax.nn, "dot_product_attention",
                      lambda q, k, v, is_causal, implementation: forward_only(q, k, v))
  hardware.cudnn_attention_works.cache_clear()
  try:
    assert hardware.resolve(FULL, platform="gpu").attention_impl == "xla"
  finally:
    hardware.cudnn_attention_works.cache_clear()
  assert calls == ["forward", "backward"]


def test_bad_model_settings_name_the_field():
  good = {f: getattr(SMALL, f) for f in (*config_lib.MODEL_SIZES, *config_lib.MODEL_CHOICES)}
  assert config_lib.model_problem(good) is None
  for field, value, message in [
      ("vocab_pad_multiple", 0, "model.vocab_pad_multiple must be a positive integer, got 0"),
      ("n_heads", 3, "model.d_model 32 is not divisible by model.n_heads 3"),
      ("d_ff", None, "model.d_ff must be a positive integer, got None"),
      ("n_layers", True, "model.n_layers must be a positive integer, got True"),
      ("compute_dtype", "int8", "model.compute_dtype must be auto, float32, bfloat16 or float16"),
      ("attention_impl", "flash", "model.attention_impl must be auto, xla or cudnn, got 'flash'"),
      ("tie_embeddings", 1, "model.tie_embeddings must be true or false, got 1")]:
    assert message in config_lib.model_problem({**good, field: value})
  no_d_model = {k: v for k, v in base_config().model.items() if k != "d_model"}
  assert "unknown or missing fields: d_model" in config_lib.model_problem(no_d_model)


def test_bfloat16_compute_keeps_float32_precision_in_the_lm_head():
  """With 16-bit compute the logits must be the float32 product of the final hidden state
  and the head, not a bf16 product cast up afterwards (8 bits of mantissa)."""
  params = params_of(SMALL)
  bf16 = dataclasses.replace(SMALL, compute_dtype="bfloat16")
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 99)
  (logits, _), state = MiniGPT(bf16).apply({"params": params}, tokens,
                                           capture_intermediates=True)
  hidden = state["intermediates"]["ln_f"]["__call__"][0]
  assert hidden.dtype == jnp.bfloat16
  want = hidden.astype(jnp.float32) @ params["lm_head"]["kernel"]
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)


def test_a_cache_for_another_number_of_layers_is_refused():
  params = params_of(SMALL)
  other = KVCache.init(dataclasses.replace(SMALL, n_layers=SMALL.n_layers + 1), 1, 8)
  with pytest.raises(ValueError, match="a cache of 3 layers for a model of 2"):
    MiniGPT(SMALL).apply({"params": params}, jnp.ones((1, 4), jnp.int32), cache=other)


def test_tied_embeddings_make_the_lm_head_the_token_embedding():
  """Tied: no lm_head, and a token's embedding row moves its own logit (it is the head's
  row for that token) and no other; untied, a row of a token not in the input moves none."""
  tied = dataclasses.replace(SMALL_MODEL, tie_embeddings=True)
  params = params_of(tied)
  untied_params = params_of(SMALL_MODEL)
  assert "lm_head" not in params
  head_size = SMALL_MODEL.vocab_size * SMALL_MODEL.d_model
  assert param_count(untied_params) - param_count(params) == head_size
  tokens = jnp.array([[1, 2, 3, 4]])  # token 50 is not among them

  def logits_after_moving_row(cfg, p):
    moved = jax.tree.map(lambda x: x, p)  # a copy of the nested dicts
    moved["embed"]["token"]["embedding"] = p["embed"]["token"]["embedding"].at[50].add(
        jax.random.normal(jax.random.key(1), (cfg.d_model,)))  # not constant: ln_f centres x
    before, _ = forward(cfg, p, tokens)
    after, _ = forward(cfg, moved, tokens)
    return np.abs(np.asarray(after - before)).max(axis=(0, 1))  # [V]

  change_V = logits_after_moving_row(tied, params)
  assert change_V[50] > 1e-3 and np.delete(change_V, 50).max() == 0
  assert logits_after_moving_row(SMALL_MODEL, untied_params).max() == 0


def test_a_run_saved_before_tie_embeddings_existed_loads_untied():
  section = {f: getattr(SMALL_MODEL, f) for f in ("context_len", "d_model", "n_layers", "n_heads",
                                                  "d_ff", "vocab_pad_multiple", "compute_dtype",
                                                  "attention_impl")}
  assert config_lib.model_problem(section) is None
  assert ModelConfig.from_section(section, 99).tie_embeddings is False
  no_d_ff = {k: v for k, v in section.items() if k != "d_ff"}
  assert "unknown or missing fields: d_ff" in config_lib.model_problem(no_d_ff)
  assert "unknown or missing fields: bias" in config_lib.model_problem({**section, "bias": True})
