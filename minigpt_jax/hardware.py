"""What this machine can do: the settings "auto" resolves to, how host memory is reused,
XLA's buffer sizes, and peak FLOP/s for MFU."""

import ctypes
import dataclasses
import functools
import importlib.metadata
import logging
import os
import sys
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from minigpt_jax.errors import UserError, first_line
from minigpt_jax.model import ModelConfig, attend, attention_mask

# device_kind substring -> dense bf16 peak (FLOP/s), from NVIDIA's data sheets (which print
# twice these, "with sparsity"); first match wins, so the NVL and PCIe cards (lower clocks
# and power) come before the SXM ones of the same name.
PEAK_BF16 = (("H200 NVL", 835e12), ("H200", 989e12), ("H100 NVL", 835e12),
             ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12))

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
  """Runs cuDNN flash attention once on the model's own shape, forward and backward, as
  training does (it needs a recent cuDNN, a supported GPU, and supports only some head
  widths and lengths; the backward kernel is a separate one that can fail on its own)."""
  try:
    x = jnp.zeros((1, context_len, n_heads, head_dim), dtype)
    loss = lambda q: jax.nn.dot_product_attention(
        q, q, q, is_causal=True, implementation="cudnn").astype(jnp.float32).sum()
    jax.block_until_ready(jax.jit(jax.grad(loss))(x))
    return True
  except Exception as e:  # any failure means: use XLA's attention instead
    logging.warning("cuDNN attention unavailable (%s); using XLA attention", first_line(e, 200))
    return False


# JAX's accelerator plugins (pip packages) and the device files their hardware shows up as.
_ACCELERATORS = (("jax-cuda", ("/dev/nvidiactl",)), ("jax-rocm", ("/dev/kfd",)),
                 ("libtpu", ("/dev/accel0", "/dev/vfio/0")))


def cpu_backend_expected(platforms: Optional[str] = None,
                         accelerators: Optional[list[str]] = None) -> bool:
  """Whether JAX will run on the CPU, decided without starting it (JAX's backends start at
  the first computation, and the host memory settings must come before). `platforms`:
  JAX_PLATFORMS (default: JAX's setting, which reads it); its first entry is JAX's default
  backend. Unset, JAX takes an accelerator whose plugin is installed and whose device is
  present: `accelerators` (default: those found here, as `installed_accelerators` says)."""
  platforms = jax.config.jax_platforms if platforms is None else platforms
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not (installed_accelerators() if accelerators is None else accelerators)


def installed_accelerators() -> list[str]:
  """The accelerator plugins installed here whose device files exist, e.g. ["jax-cuda"]."""
  names = {(d.metadata["Name"] or "").lower() for d in importlib.metadata.distributions()}
  return [prefix for prefix, devices in _ACCELERATORS
          if any(n.startswith(prefix) for n in names) and any(map(os.path.exists, devices))]


def keep_freed_host_memory() -> bool:
  """Asks glibc to keep freed memory for reuse instead of handing it back to the kernel.

  XLA:CPU allocates each call's scratch buffer afresh; glibc serves a block that large with
  mmap and unmaps it when freed, so every step the kernel maps and zero-fills the working set
  again. One arena, no mmap and no trimming make the freed buffer the next call's. Must run
  before JAX starts its threads. Only for the CPU backend (`cpu_backend_expected`): on an
  accelerator the scratch buffers are device memory, and one arena would only serialise the
  host's allocations (compile threads, checkpoint writers). Returns whether glibc took the
  settings (False on accelerators, and elsewhere than glibc, e.g. macOS or musl).
  """
  global _kept
  mallopt = _mallopt() if cpu_backend_expected() else None
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
