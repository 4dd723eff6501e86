"""What this machine can do: the settings "auto" resolves to, how host memory is reused,
XLA's buffer sizes, and peak FLOP/s for MFU."""

import ctypes
import dataclasses
import functools
import logging
import sys
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from minigpt_jax.errors import UserError, first_line
from minigpt_jax.model import ModelConfig, attend, attention_mask

# device_kind substring -> dense bf16 peak (FLOP/s), from NVIDIA's data sheets; first match
# wins, so the PCIe H100 (a lower clock) comes before the SXM one.
PEAK_BF16 = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12))

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -3, -4, -8  # glibc's malloc.h
# Bytes: the largest scratch buffer a heap that keeps freed memory serves; a choice between
# the small config's buffer, kept, and the full config's, whose heap grew (BENCHMARKS.md).
KEEP_LIMIT = 1 << 30
_kept = False  # whether keep_freed_host_memory took effect in this process


def resolve(cfg: ModelConfig, platform: Optional[str] = None) -> ModelConfig:
  """`cfg` with "auto" settings chosen for `platform` (default: JAX's backend): bfloat16
  compute on accelerators, cuDNN flash attention on GPUs where it runs the model's shape.
  An explicit compute dtype or "cudnn" that this backend cannot run is a UserError."""
  platform = platform or jax.default_backend()
  dtype = cfg.compute_dtype
  if dtype == "auto":
    dtype = "bfloat16" if platform in ("gpu", "cuda", "rocm", "tpu") else "float32"
  elif platform == jax.default_backend() and (problem := compute_dtype_problem(dtype)):
    raise UserError(f"model.compute_dtype={dtype!r} does not run on this machine's {platform} "
                    f"backend ({problem}); use 'auto' or 'float32'")
  resolved = dataclasses.replace(cfg, compute_dtype=dtype, attention_impl="xla")
  if cfg.attention_impl == "xla":
    return resolved
  cudnn_ok = platform in ("gpu", "cuda") and dtype != "float32" and cudnn_attention_works(
      resolved.context_len, resolved.n_heads, resolved.head_dim, dtype)
  if cfg.attention_impl == "cudnn" and not cudnn_ok:
    raise UserError(f"model.attention_impl='cudnn' needs an NVIDIA GPU whose cuDNN has flash "
                    f"attention for this model's shape, and 16-bit compute; here: {platform}, "
                    f"{dtype}. Use 'auto' or 'xla'")
  return dataclasses.replace(resolved, attention_impl="cudnn") if cudnn_ok else resolved


@functools.lru_cache(maxsize=None)
def compute_dtype_problem(dtype: str) -> Optional[str]:
  """Why the default backend cannot run the model's matmuls in `dtype`, or None if it can:
  runs a gradient of the model's attention once on a tiny input (XLA:CPU, for one, has no
  float16 dot with float32 accumulation)."""
  if dtype == "float32":
    return None
  try:
    q = jnp.zeros((1, 2, 1, 8), dtype)
    mask = attention_mask(jnp.arange(2), jnp.arange(2))
    loss = lambda q: attend(q, q, q, mask).astype(jnp.float32).sum()
    jax.block_until_ready(jax.jit(jax.grad(loss))(q))
    return None
  except Exception as e:  # XLA names what it lacks, e.g. a dot precision
    return first_line(e, 160)


@functools.lru_cache(maxsize=None)
def cudnn_attention_works(context_len: int, n_heads: int, head_dim: int, dtype: str) -> bool:
  """Runs cuDNN flash attention once on the model's own shape (it needs a recent cuDNN,
  a supported GPU, and supports only some head widths and lengths)."""
  try:
    x = jnp.zeros((1, context_len, n_heads, head_dim), dtype)
    jax.block_until_ready(jax.jit(lambda q: jax.nn.dot_product_attention(
        q, q, q, is_causal=True, implementation="cudnn"))(x))
    return True
  except Exception as e:  # any failure means: use XLA's attention instead
    logging.warning("cuDNN attention unavailable (%s); using XLA attention", first_line(e, 200))
    return False


def keep_freed_host_memory() -> bool:
  """Asks glibc to keep freed memory for reuse instead of handing it back to the kernel.

  XLA:CPU allocates each call's scratch buffer afresh; glibc serves a block that large with
  mmap and unmaps it when freed, so every step the kernel maps and zero-fills the working set
  again. One arena, no mmap and no trimming make the freed buffer the next call's. Must run
  before JAX starts its threads; GPU memory is unaffected. Returns whether glibc took the
  settings (False elsewhere, e.g. macOS or musl).
  """
  global _kept
  mallopt = _mallopt()
  # A trim threshold of -1 turns trimming off (mallopt(3)); any positive int caps at 2 GiB,
  # below the full config's 2.8 GiB buffer.
  _kept = bool(mallopt and mallopt(M_ARENA_MAX, 1) and mallopt(M_MMAP_MAX, 0)
               and mallopt(M_TRIM_THRESHOLD, -1))
  return _kept


def fit_host_memory_to(scratch_bytes: int) -> bool:
  """Keeps freed memory (see above) while one call's scratch buffer is at most KEEP_LIMIT
  bytes; past it, blocks over 32 MiB go back to mmap, which frees them to the kernel: a heap
  that keeps freed memory grows by a whole buffer whenever a step cannot reuse the last one's,
  and never shrinks. Acts only where `keep_freed_host_memory` took effect. Returns whether
  freed memory is kept now.
  """
  mallopt = _mallopt() if _kept else None
  if mallopt is None:
    return False
  if scratch_bytes <= KEEP_LIMIT:
    return bool(mallopt(M_MMAP_MAX, 0))
  # 32 MiB is glibc's largest mmap threshold (smaller blocks stay in the kept heap);
  # 65536 is its default M_MMAP_MAX.
  mallopt(M_MMAP_THRESHOLD, 32 << 20) and mallopt(M_MMAP_MAX, 65536)
  return False


def scratch_bytes(compiled: jax.stages.Compiled) -> int:
  """The host scratch buffer one call of `compiled` allocates: its temporaries on the CPU,
  0 on accelerators (their memory is not glibc's) or where XLA does not say."""
  memory = compiled_memory(compiled) if jax.default_backend() == "cpu" else None
  return memory["temp_bytes"] if memory else 0


def compiled_memory(compiled: jax.stages.Compiled) -> Optional[dict]:
  """XLA's static buffer sizes for a compiled executable (works on CPU too), or None."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # not every backend and version implements it
    return None
  names = ("argument", "output", "alias", "temp")
  return None if m is None else {f"{n}_bytes": int(getattr(m, f"{n}_size_in_bytes")) for n in names}


def _mallopt() -> Optional[Callable[[int, int], int]]:
  """glibc's mallopt, or None where there is none (macOS, musl)."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    return ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):
    return None


def peak_flops(device: Optional[jax.Device] = None) -> Optional[float]:
  """The table's peak for `device` (default: the first), or None if unknown (e.g. CPU)."""
  kind = (device or jax.devices()[0]).device_kind
  return next((peak for name, peak in PEAK_BF16 if name in kind), None)


def mfu(flops_per_token: float, tokens_per_s: float, device=None) -> Optional[float]:
  """Model FLOPs utilisation over all devices, or None for an unknown device."""
  peak = peak_flops(device)
  return None if peak is None else flops_per_token * tokens_per_s / (peak * jax.device_count())
