"""The device mesh and how arrays lie on it: batches split over ("data", "fsdp"),
parameters and optimizer state replicated, or split over "fsdp" (ZeRO-3 style)."""

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from minigpt_jax.errors import UserError

AXES = ("data", "fsdp")
BATCH = P(AXES)  # leading (batch) dimension split over every device
MIN_FSDP_SIZE = 2**12  # smaller arrays (biases, norms) stay replicated


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A ("data", "fsdp") mesh; a size of -1 takes all the devices the other leaves."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp)]
  if sizes.count(-1) > 1:
    raise UserError("at most one of mesh.data, mesh.fsdp may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if known <= 0 or devices.size % known:
    raise UserError(f"mesh {dict(zip(AXES, sizes))} does not fit {devices.size} device(s)")
  sizes = [devices.size // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != devices.size:
    raise UserError(f"mesh {dict(zip(AXES, sizes))} uses {math.prod(sizes)} of "
                    f"{devices.size} device(s); use -1 for 'all remaining'")
  return Mesh(devices.reshape(sizes), AXES)


def param_spec(shape: tuple, fsdp_size: int) -> P:
  """Splits the largest dimension divisible by the fsdp axis; small arrays stay replicated."""
  if fsdp_size == 1 or math.prod(shape) < MIN_FSDP_SIZE:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(mesh: Mesh, abstract_tree):
  """NamedShardings for a pytree of arrays or ShapeDtypeStructs."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x.shape, fsdp)), abstract_tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put_replicated(mesh: Mesh, host_array: np.ndarray) -> jax.Array:
  """A host array every process holds in full, as one global array replicated on the mesh."""
  return jax.make_array_from_process_local_data(replicated(mesh), host_array)
