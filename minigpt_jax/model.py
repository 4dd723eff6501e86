"""MiniGPT in flax.linen, built bottom-up: embeddings -> multi-head attention -> FFN ->
pre-norm block -> model.

Shape key, one meaning per letter across the package: B batch, T time (query slots),
W window (T + 1: inputs plus the last target), S cache slots, P prompt slots,
G generated tokens per row, C tokens of a decoded chunk, N tokens of a corpus split,
D model width, H heads, K head width, F FFN width, V vocabulary, L layers.

One definition serves training, prefill and decode. A batch row may start with
left padding: `start_B` is the slot of its first real token, positions count
from there, and keys before it are masked. With a `KVCache`, the T new tokens
go to slots `cache.index .. cache.index + T - 1`.
"""

import dataclasses
import math
from typing import Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Model hyperparameters: the config's `model` section (checked by `config.validate`, or
  for a saved run by `runs.check_readable`) plus the vocabulary size.

  `compute_dtype` and `attention_impl` may be "auto" until `hardware.resolve` picks them
  for the machine at hand; the model runs only on a resolved config.
  """

  vocab_size: int
  context_len: int  # tokens
  d_model: int
  n_layers: int
  n_heads: int
  d_ff: int
  vocab_pad_multiple: int  # LM head width is rounded up to this
  compute_dtype: str  # "auto", "float32", "bfloat16" or "float16"; parameters stay float32
  attention_impl: str  # "auto", "xla" or "cudnn" (for the causal, cache-free path)
  tie_embeddings: bool = False  # the LM head reuses the token embedding (as GPT-2, nanoGPT)

  @classmethod
  def from_section(cls, model_section, vocab_size: int) -> "ModelConfig":
    """From a config's `model` section (a ConfigDict or a dict, e.g. a run's config.json),
    once `config.model_problem` has found nothing wrong with it."""
    return cls(vocab_size=vocab_size, **dict(model_section))

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def padded_vocab(self) -> int:
    return -(-self.vocab_size // self.vocab_pad_multiple) * self.vocab_pad_multiple

  @property
  def dtype(self):
    return _DTYPES[self.compute_dtype]


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer, passed into and returned from `MiniGPT.__call__`.

  Slot j of row b holds the token at position j - start_B[b]; slots before start_B[b]
  are left padding and never attended to. Each layer has its own arrays (XLA:CPU copied a
  layer's slice of one stacked array whole for every token), head-major as attention reads.
  """

  k_BHSK: tuple[jax.Array, ...]  # one [B, H, S, K] array per layer
  v_BHSK: tuple[jax.Array, ...]
  start_B: jax.Array  # int32 [B]: slot of each row's first real token
  end_L: jax.Array  # int32 [L]: slots each layer has written (all equal between model calls)

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, slots: int, start_B=None) -> "KVCache":
    shape = (batch, cfg.n_heads, slots, cfg.head_dim)
    zeros = lambda: tuple(jnp.zeros(shape, cfg.dtype) for _ in range(cfg.n_layers))
    start_B = jnp.zeros((batch,), jnp.int32) if start_B is None else jnp.asarray(start_B, jnp.int32)
    return cls(zeros(), zeros(), start_B, jnp.zeros((cfg.n_layers,), jnp.int32))

  @property
  def slots(self) -> int:
    return self.k_BHSK[0].shape[2]

  @property
  def index(self) -> jax.Array:
    """The next slot to write."""
    return self.end_L[0]

  def append(self, layer: int, k_BTHK: jax.Array, v_BTHK: jax.Array):
    """Writes `layer`'s keys and values of T new tokens at its next T slots.

    Returns (cache, all keys [B, S, H, K], all values [B, S, H, K], the new slots [T])."""
    end = self.end_L[layer]
    write = lambda c_BHSK, x_BTHK: jax.lax.dynamic_update_slice(
        c_BHSK, jnp.swapaxes(x_BTHK, 1, 2).astype(c_BHSK.dtype), (0, 0, end, 0))
    keys, values = list(self.k_BHSK), list(self.v_BHSK)
    keys[layer] = write(keys[layer], k_BTHK)
    values[layer] = write(values[layer], v_BTHK)
    T = k_BTHK.shape[1]
    cache = self.replace(k_BHSK=tuple(keys), v_BHSK=tuple(values),
                         end_L=self.end_L.at[layer].add(T))
    return (cache, jnp.swapaxes(keys[layer], 1, 2), jnp.swapaxes(values[layer], 1, 2),
            end + jnp.arange(T))

  def grow(self, slots: int) -> "KVCache":
    """The same cache with `slots` slots; the new ones are empty (zeros)."""
    if slots < self.slots:
      raise ValueError(f"KVCache.grow: {slots} slots is fewer than the {self.slots} held")
    if slots == self.slots:
      return self
    pad = lambda c_BHSK: jnp.pad(c_BHSK, [(0, 0), (0, 0), (0, slots - self.slots), (0, 0)])
    return self.replace(k_BHSK=tuple(map(pad, self.k_BHSK)), v_BHSK=tuple(map(pad, self.v_BHSK)))


def check_shape(module: nn.Module, name: str, x: jax.Array, expected: tuple) -> None:
  """Raises at trace time if `x` does not match `expected` (None matches any size)."""
  ok = x.ndim == len(expected) and all(e is None or e == s for e, s in zip(expected, x.shape))
  if not ok:
    want = "(" + ", ".join("?" if e is None else str(e) for e in expected) + ")"
    where = f"{type(module).__name__} '{module.name}'" if module.name else type(module).__name__
    raise ValueError(f"{where}: {name} has shape {tuple(x.shape)}, expected {want}")


def _dense_init(scale: float = 1.0):
  return nn.initializers.normal(stddev=0.02 * scale)


def attention_mask(q_slots_T, k_slots_S, start_B=None):
  """[B or 1, 1, T, S] boolean: causal, no keys in the left padding (a pad query sees itself)."""
  causal_TS = k_slots_S[None, :] <= q_slots_T[:, None]
  if start_B is None:
    return causal_TS[None, None]
  real = k_slots_S[None, None, :] >= start_B[:, None, None]
  self_only = k_slots_S[None, :] == q_slots_T[:, None]
  return (causal_TS[None] & (real | self_only[None]))[:, None]


# With 16-bit inputs the scores' backward dots stay 16-bit, as in jax's own attention (a
# float32 cotangent would otherwise make them float32 matmuls: jax-ml/jax#24047).
_SCORES_PRECISION = {jnp.dtype(jnp.bfloat16): jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
                     jnp.dtype(jnp.float16): jax.lax.DotAlgorithmPreset.F16_F16_F32}


def attend(q_BTHK, k_BSHK, v_BSHK, mask_B1TS):
  """Softmax attention with float32 scores, computed head-major ([B, H, T, S]): on the
  CPU the training step runs faster this way than with `jax.nn.dot_product_attention`'s
  XLA path (BENCHMARKS.md); XLA:GPU gets the same einsums that path uses."""
  scale = 1.0 / math.sqrt(q_BTHK.shape[-1])
  s_BHTS = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK, preferred_element_type=jnp.float32,
                      precision=_SCORES_PRECISION.get(q_BTHK.dtype))
  s_BHTS = jnp.where(mask_B1TS, s_BHTS * scale, jnp.finfo(jnp.float32).min)
  p_BHTS = jax.nn.softmax(s_BHTS, axis=-1).astype(v_BSHK.dtype)
  return jnp.einsum("bhts,bshk->bthk", p_BHTS, v_BSHK)


def causal_attention(q_BTHK, k_BTHK, v_BTHK, block: Optional[int] = None):
  """`attend` with a causal mask, a block of `block` queries at a time, each over only the
  keys up to its block's end: the same softmax rows without the masked upper triangle
  ((n + 1) / 2n of the scores for n blocks). The default, at most 4 blocks of at least 64
  rows, measured fastest on the CPU (BENCHMARKS.md); smaller blocks lose more to smaller
  matmuls than they save."""
  T = q_BTHK.shape[1]
  block = block or max(64, T // 4)
  ends = [*range(block, T, block), T]
  out = []
  for start, end in zip([0, *ends], ends):
    mask_11TS = attention_mask(jnp.arange(start, end), jnp.arange(end))
    out.append(attend(q_BTHK[:, start:end], k_BTHK[:, :end], v_BTHK[:, :end], mask_11TS))
  return jnp.concatenate(out, axis=1)


class Embeddings(nn.Module):
  """Token embedding plus learned position embedding; `attend` is the tied LM head."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.token = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=_dense_init())
    self.position = nn.Embed(cfg.context_len, cfg.d_model, embedding_init=_dense_init())

  def __call__(self, tokens_BT, pos_BT):
    check_shape(self, "tokens", tokens_BT, (None, None))
    check_shape(self, "positions", pos_BT, tokens_BT.shape)
    x_BTD = self.token(tokens_BT) + self.position(pos_BT)
    return x_BTD.astype(self.cfg.dtype)

  def attend(self, x_BTD):
    """Logits [B, T, vocab_size]: `x` against every token's embedding, in float32."""
    return self.token.attend(x_BTD.astype(jnp.float32))


class MultiHeadAttention(nn.Module):
  """All heads in one fused projection; `attend`, or cuDNN's flash attention for training."""

  cfg: ModelConfig
  layer: int = 0  # which slice of the KV cache this layer owns

  @nn.compact
  def __call__(self, x_BTD, start_B=None, cache: Optional[KVCache] = None):
    cfg = self.cfg
    B, T, _ = x_BTD.shape
    check_shape(self, "x", x_BTD, (None, None, cfg.d_model))
    qkv_BT3HK = nn.DenseGeneral((3, cfg.n_heads, cfg.head_dim), dtype=cfg.dtype,
                                kernel_init=_dense_init(), name="qkv")(x_BTD)
    q_BTHK, k_BTHK, v_BTHK = qkv_BT3HK[:, :, 0], qkv_BT3HK[:, :, 1], qkv_BT3HK[:, :, 2]

    if cache is None and start_B is None and cfg.attention_impl == "cudnn":  # GPU training
      out_BTHK = jax.nn.dot_product_attention(
          q_BTHK, k_BTHK, v_BTHK, is_causal=True, implementation="cudnn")
    elif cache is None and start_B is None:  # training and scoring
      out_BTHK = causal_attention(q_BTHK, k_BTHK, v_BTHK)
    else:
      if cache is None:  # left-padded rows
        keys_BSHK, values_BSHK, q_slots_T = k_BTHK, v_BTHK, jnp.arange(T)
      else:
        check_shape(self, "cached keys", cache.k_BHSK[self.layer],
                    (B, cfg.n_heads, None, cfg.head_dim))
        cache, keys_BSHK, values_BSHK, q_slots_T = cache.append(self.layer, k_BTHK, v_BTHK)
        start_B = cache.start_B
      mask_B1TS = attention_mask(q_slots_T, jnp.arange(keys_BSHK.shape[1]), start_B)
      out_BTHK = attend(q_BTHK, keys_BSHK, values_BSHK, mask_B1TS)

    y_BTD = nn.DenseGeneral(cfg.d_model, axis=(-2, -1), dtype=cfg.dtype, name="out",
                            kernel_init=_dense_init(1 / math.sqrt(2 * cfg.n_layers)))(out_BTHK)
    return y_BTD, cache


class FeedForward(nn.Module):
  """Dense -> GELU -> Dense."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg
    check_shape(self, "x", x_BTD, (None, None, cfg.d_model))
    h_BTF = nn.Dense(cfg.d_ff, dtype=cfg.dtype, kernel_init=_dense_init(), name="up")(x_BTD)
    h_BTF = jax.nn.gelu(h_BTF)
    y_BTD = nn.Dense(cfg.d_model, dtype=cfg.dtype, name="down",
                     kernel_init=_dense_init(1 / math.sqrt(2 * cfg.n_layers)))(h_BTF)
    return y_BTD


class Block(nn.Module):
  """Pre-norm residual block: x + attn(ln(x)), then x + ffn(ln(x))."""

  cfg: ModelConfig
  layer: int = 0

  @nn.compact
  def __call__(self, x_BTD, start_B=None, cache: Optional[KVCache] = None):
    cfg = self.cfg
    check_shape(self, "x", x_BTD, (None, None, cfg.d_model))
    h_BTD, cache = MultiHeadAttention(cfg, self.layer, name="attn")(
        nn.LayerNorm(dtype=cfg.dtype, name="ln1")(x_BTD), start_B, cache)
    x_BTD = x_BTD + h_BTD
    x_BTD = x_BTD + FeedForward(cfg, name="ffn")(nn.LayerNorm(dtype=cfg.dtype, name="ln2")(x_BTD))
    return x_BTD, cache


class MiniGPT(nn.Module):
  """Decoder-only transformer. Returns float32 logits [B, T, V] and the updated cache."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT, start_B=None, cache: Optional[KVCache] = None):
    cfg = self.cfg
    check_shape(self, "tokens", tokens_BT, (None, None))
    B, T = tokens_BT.shape
    if cache is None:
      if T > cfg.context_len:
        raise ValueError(f"MiniGPT: {T} tokens exceed the context length {cfg.context_len}")
      slots_T = jnp.arange(T)
    else:  # positions count from each row's start, so a cache may outgrow the context
      # by a row's left padding; `generate.decode` keeps every row's tokens within it.
      if not len(cache.k_BHSK) == len(cache.v_BHSK) == cfg.n_layers:
        raise ValueError(f"MiniGPT: a cache of {len(cache.k_BHSK)} layers for a model of "
                         f"{cfg.n_layers}")
      slots_T, start_B = cache.index + jnp.arange(T), cache.start_B
    if start_B is None:
      pos_BT = jnp.broadcast_to(slots_T, (B, T))
    else:  # left padding sits at position 0; it is masked out of every real row's attention
      check_shape(self, "start", start_B, (B,))
      pos_BT = jnp.maximum(slots_T[None, :] - start_B[:, None], 0)

    embed = Embeddings(cfg, name="embed")
    x_BTD = embed(tokens_BT, pos_BT)
    for i in range(cfg.n_layers):
      x_BTD, cache = Block(cfg, layer=i, name=f"block_{i}")(x_BTD, start_B, cache)
    x_BTD = nn.LayerNorm(dtype=cfg.dtype, name="ln_f")(x_BTD)
    # The head runs in float32 even with 16-bit compute: its logits feed the loss and the
    # sampling probabilities, which bf16 (8 bits of mantissa) would round.
    if cfg.tie_embeddings:
      return embed.attend(x_BTD), cache
    logits_BTV = nn.Dense(cfg.padded_vocab, use_bias=False, dtype=jnp.float32,
                          kernel_init=_dense_init(), name="lm_head")(x_BTD.astype(jnp.float32))
    return logits_BTV[..., :cfg.vocab_size], cache


def init_params(cfg: ModelConfig, key: jax.Array):
  """Float32 parameters for `cfg`."""
  tokens = jnp.zeros((1, min(8, cfg.context_len)), jnp.int32)
  return MiniGPT(cfg).init(key, tokens)["params"]


def param_count(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


def flops_per_token(cfg: ModelConfig) -> float:
  """Training FLOPs per token: 6 * (non-embedding matmul params incl. LM head) + 12 * L * D * T,
  the attention term counted whole, as PaLM's MFU does, though causal attention (cuDNN's
  flash kernel, `causal_attention`) skips the masked half of it."""
  per_layer = 4 * cfg.d_model * cfg.d_model + 2 * cfg.d_model * cfg.d_ff
  head = cfg.vocab_size if cfg.tie_embeddings else cfg.padded_vocab  # a tied head is not padded
  matmul = cfg.n_layers * per_layer + cfg.d_model * head
  return 6.0 * matmul + 12.0 * cfg.n_layers * cfg.d_model * cfg.context_len
