"""Whether JAX loaded its GPU backend: JAX falls back to the CPU, with at most a warning,
when the CUDA plugin is missing or fails to start (a driver too old for the plugin's CUDA, a
clashing system cuDNN), and everything after would then run on the CPU for hours.

  python scripts/gpu_backend_check.py

Exit status 0 and one line naming the GPU on stdout; otherwise exit status 1 and one line
on stderr naming what JAX found instead, and why the GPU backend did not load where JAX
says.
"""

import importlib.metadata
import os
import sys


def _versions() -> str:
  names = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin")
  found = []
  for name in names:
    try:
      found.append(f"{name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
      pass
  if not any("cuda" in f for f in found):
    found.append("no jax-cuda plugin installed")
  return ", ".join(found)


def problem() -> str | None:
  """Why JAX's default backend is not a GPU, in one line, or None when it is."""
  try:
    import jax
    devices = jax.devices()
  except Exception as e:  # e.g. JAX_PLATFORMS=cuda and the plugin failed: JAX raises
    first = ": ".join([type(e).__name__, *str(e).strip().splitlines()[:1]])
    return f"JAX could not start a backend: {first[:300]} ({_versions()})"
  if jax.default_backend() == "gpu":
    return None
  kinds = sorted({d.device_kind for d in devices})
  reasons = []
  try:  # what each backend that failed to start said (a private table; absent in some versions)
    from jax._src import xla_bridge
    errors = getattr(xla_bridge, "_backend_errors", {}) or {}
    reasons = [f"{name}: {(str(msg).strip().splitlines() or [''])[0][:300]}"
               for name, msg in errors.items() if name in ("cuda", "gpu", "rocm")]
  except ImportError:
    pass
  if platforms := os.environ.get("JAX_PLATFORMS"):
    reasons.append(f"JAX_PLATFORMS={platforms}")
  why = "; ".join(reasons) or "no GPU backend was registered"
  return (f"no GPU backend: JAX runs on {jax.default_backend()} ({len(devices)} x "
          f"{', '.join(kinds)}); {why} ({_versions()})")


def main() -> int:
  if (p := problem()) is not None:
    print(p, file=sys.stderr, flush=True)
    return 1
  import jax
  d = jax.devices()
  print(f"GPU backend: {len(d)} x {d[0].device_kind} ({_versions()})", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
