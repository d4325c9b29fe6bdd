"""Data-parallel sampling and calibration over a `jax.sharding.Mesh`.

The batch of starting noises is split over the mesh's `data` axis; model variables and
TCEC parameters are replicated. Everything else is ordinary jit: XLA's SPMD partitioner
runs each device's share of the batch and turns the batch sums inside calibration (the
least-squares sufficient statistics) into all-reduces, so the fitted parameters equal the
single-device fit up to float summation order. Noise draws are sharding-invariant, so
sharded and single-device sampling agree too.

A batch that does not divide evenly over the devices is rejected (not padded): padding
would change the calibration statistics.

Multi-host (TPU pod slices, several GPU nodes): call `initialize_distributed` first (the
launchers' `--distributed` flag does), build every host array identically on every
process (same seeds), and the same code runs SPMD over the global mesh; `to_host` gathers
a sharded result back to every process as numpy (`tac_jax.host.to_host`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tac_jax import compensation
from tac_jax.diffusion import samplers

DATA_AXIS = "data"


def data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("data_mesh needs at least one device.")
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def check_divisible(batch: int, mesh: Mesh, what: Optional[str] = None, hint: str = "") -> None:
  """ValueError naming `what` (default: the batch) when `batch` does not divide over the mesh."""
  n = mesh.shape[DATA_AXIS]
  if batch % n:
    what = what or f"batch of {batch} samples"
    raise ValueError(f"{what} does not divide over {n} devices; use a multiple of {n} "
                     f"(e.g. {batch + (-batch) % n}){hint}.")


def _put(x, sharding: NamedSharding):
  if sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  # Multi-process: every process holds the same host value and supplies its own shards.
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_batch(x: jax.Array, mesh: Mesh) -> jax.Array:
  """Places `x` split along its leading (batch) axis over the mesh."""
  check_divisible(x.shape[0], mesh)
  return _put(x, NamedSharding(mesh, P(DATA_AXIS)))


def replicate(tree, mesh: Mesh):
  """Places a pytree (variables, TCEC params) whole on every device of the mesh."""
  sharding = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: _put(x, sharding), tree)


def shard_params(tree, mesh: Mesh, min_size: int = 2 ** 16):
  """Places a pytree of params over the mesh FSDP-style: each array of at least `min_size`
  elements split along its largest axis that the device count divides (the first of equal
  ones), the others whole on every device. Under jit XLA gathers a layer's weights where
  it is used, so results equal the replicated run's (up to float rounding) while each
  device holds ~1/n of the large weights (for models too big to replicate, e.g. an SDXL
  UNet on accelerators)."""
  n = mesh.shape[DATA_AXIS]

  def place(x):
    shape = np.shape(x)
    axes = [a for a in sorted(range(len(shape)), key=lambda a: -shape[a]) if shape[a] % n == 0]
    if n == 1 or np.size(x) < min_size or not axes:
      return _put(x, NamedSharding(mesh, P()))
    spec = [None] * len(shape)
    spec[int(axes[0])] = DATA_AXIS
    return _put(x, NamedSharding(mesh, P(*spec)))

  return jax.tree.map(place, tree)


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           local_device_ids: Optional[Sequence[int]] = None) -> None:
  """`jax.distributed.initialize`, once per process, before any other JAX call.

  On Cloud TPU pod slices, SLURM and Open MPI every argument can stay None (JAX detects
  them); elsewhere pass the coordinator's host:port, the process count and this
  process's id (0 .. num_processes - 1).
  """
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"num_processes must be >= 1, got {num_processes}.")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}.")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=local_device_ids)


def auto_mesh(enabled: bool = True) -> Optional[Mesh]:
  """The data mesh over all devices when there is more than one (and `enabled`), else None."""
  return data_mesh() if enabled and jax.device_count() > 1 else None


def make_sharded_sampler(apply_fn, sampler: samplers.Sampler, mesh: Mesh):
  """A jitted (variables, x_T, key) -> final samples, batch split over `mesh`. Place the
  inputs with `replicate` / `shard_batch` once and call it repeatedly."""
  return jax.jit(lambda v, x, k: samplers.sample(apply_fn, v, sampler, x, k)[0].x,
                 out_shardings=NamedSharding(mesh, P(DATA_AXIS)))


def sharded_sample(apply_fn, variables, sampler: samplers.Sampler, x_T: jax.Array,
                   key: jax.Array, mesh: Mesh) -> jax.Array:
  """Final samples of `sampler` with the batch split over `mesh` (output stays sharded)."""
  run = make_sharded_sampler(apply_fn, sampler, mesh)
  return run(replicate(variables, mesh), shard_batch(x_T, mesh), key)


def sharded_calibrate(fp: compensation.Net, q: compensation.Net, sampler: samplers.Sampler,
                      x_T: jax.Array, key: jax.Array, mesh: Mesh,
                      method: str = compensation.DEFAULT_METHOD, options=None
                      ) -> compensation.Calibration:
  """`compensation.calibrate` with the calibration batch split over `mesh` and the networks
  replicated (the batch sums inside become all-reduces); the params come back replicated."""
  compensation.scan.check_calibration_noise(x_T)
  return compensation.calibrate(replicate(fp, mesh), replicate(q, mesh), sampler,
                                shard_batch(x_T, mesh), key, method, options)
