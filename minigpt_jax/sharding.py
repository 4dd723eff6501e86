"""The device mesh and how arrays lie on it: batches split over ("data", "fsdp"),
parameters and optimizer state replicated, or split over "fsdp" (ZeRO-3 style);
and joining JAX's multi-process runtime (one process per host or per GPU)."""

import math
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from minigpt_jax.errors import UserError, first_line

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


def with_shardings(abstract_tree, shardings_tree):
  """ShapeDtypeStructs that carry their target shardings (what Orbax restores onto)."""
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                      abstract_tree, shardings_tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put_replicated(mesh: Mesh, host_array: np.ndarray) -> jax.Array:
  """A host array every process holds in full, as one global array replicated on the mesh."""
  return jax.make_array_from_process_local_data(replicated(mesh), host_array)


def initialize_distributed(mesh_cfg) -> None:
  """Joins the multi-process runtime; must run before anything touches a device.

  Empty `mesh.coordinator_address` / `num_processes` / `process_id` are left to
  JAX's detection (Slurm, Open MPI, Cloud TPU; JAX_COORDINATOR_ADDRESS for the address).
  """
  if jax.distributed.is_initialized():
    return
  # CPU processes run their collectives over TCP with gloo (GPUs use NCCL regardless).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(
        coordinator_address=mesh_cfg.coordinator_address or None,
        num_processes=mesh_cfg.num_processes if mesh_cfg.num_processes > 0 else None,
        process_id=mesh_cfg.process_id if mesh_cfg.process_id >= 0 else None)
  except (RuntimeError, ValueError) as e:
    raise UserError(f"cannot join the distributed runtime: {first_line(e).rstrip('.')}; "
                    "outside Slurm/Open MPI "
                    "set --config.mesh.coordinator_address, .num_processes and .process_id")


def sync_processes(name: str) -> None:
  """A barrier across all processes; a no-op in a single process."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def raise_if_lead_failed(error: Optional[BaseException], what: str) -> None:
  """A barrier at which process 0 tells the others whether `what` (done by it alone) failed:
  then process 0 raises `error` and the others a UserError, rather than waiting for it."""
  if jax.process_count() > 1:
    failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if error is None and int(failed):
      raise UserError(f"process 0 failed while {what}; its output says why")
  if error is not None:
    raise error


def check_same_on_all_processes(text: str, what: str) -> None:
  """Raises UserError unless every process passes the same `text` (e.g. a sha256)."""
  if jax.process_count() == 1:
    return
  mine = np.frombuffer(text.encode().ljust(128)[:128], np.uint8)
  try:
    multihost_utils.assert_equal(mine)
  except AssertionError:
    raise UserError(f"the processes loaded different {what}; on hosts without a shared "
                    "filesystem, give each host an identical copy")
