"""Dense bf16 peak FLOP/s of known accelerators, for MFU."""

from typing import Optional

import jax

# device_kind substring -> dense bf16 peak (FLOP/s), from NVIDIA's data sheets; first match
# wins, so the PCIe H100 (a lower clock) comes before the SXM one.
PEAK_BF16 = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12))


def peak_flops(device: Optional[jax.Device] = None) -> Optional[float]:
  """The table's peak for `device` (default: the first), or None if unknown (e.g. CPU)."""
  kind = (device or jax.devices()[0]).device_kind
  return next((peak for name, peak in PEAK_BF16 if name in kind), None)


def mfu(flops_per_token: float, tokens_per_s: float, device=None) -> Optional[float]:
  """Model FLOPs utilisation over all devices, or None for an unknown device."""
  peak = peak_flops(device)
  return None if peak is None else flops_per_token * tokens_per_s / (peak * jax.device_count())
