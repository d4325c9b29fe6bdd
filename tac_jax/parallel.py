"""Data-parallel sampling and calibration over a `jax.sharding.Mesh`.

The batch of starting noises is split over the mesh's `data` axis; model variables and
TCEC parameters are replicated. Everything else is ordinary jit: XLA's SPMD partitioner
runs each device's share of the batch and turns the batch sums inside calibration (the
least-squares sufficient statistics) into all-reduces, so the fitted parameters equal the
single-device fit up to float summation order. Noise draws are sharding-invariant, so
sharded and single-device sampling agree too.

A batch that does not divide evenly over the devices is rejected (not padded): padding
would change the calibration statistics.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tac_jax import errors
from tac_jax.diffusion import samplers

DATA_AXIS = "data"


def data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("data_mesh needs at least one device.")
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def check_divisible(batch: int, mesh: Mesh) -> None:
  n = mesh.shape[DATA_AXIS]
  if batch % n:
    raise ValueError(f"batch of {batch} samples does not divide over {n} devices; use a "
                     f"multiple of {n} (e.g. {batch + (-batch) % n}).")


def shard_batch(x: jax.Array, mesh: Mesh) -> jax.Array:
  """Places `x` split along its leading (batch) axis over the mesh."""
  check_divisible(x.shape[0], mesh)
  return jax.device_put(x, NamedSharding(mesh, P(DATA_AXIS)))


def replicate(tree, mesh: Mesh):
  """Places a pytree (variables, TCEC params) whole on every device of the mesh."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def sharded_sample(apply_fn, variables, sampler: samplers.Sampler, x_T: jax.Array,
                   key: jax.Array, mesh: Mesh) -> jax.Array:
  """Final samples of `sampler` with the batch split over `mesh` (output stays sharded)."""
  x_T = shard_batch(x_T, mesh)
  run = jax.jit(lambda v, x, k: samplers.sample(apply_fn, v, sampler, x, k)[0].x,
                out_shardings=NamedSharding(mesh, P(DATA_AXIS)))
  return run(replicate(variables, mesh), x_T, key)


def sharded_calibrate(apply_fp, var_fp, apply_q, var_q, sampler: samplers.Sampler,
                      x_T: jax.Array, key: jax.Array, mesh: Mesh, fit="tcec",
                      phi=None) -> errors.TCECParams:
  """`errors.calibrate` with the calibration batch split over `mesh`; replicated result."""
  errors.compensation.check_calibration_noise(x_T)
  x_T = shard_batch(x_T, mesh)
  run = jax.jit(lambda vf, vq, x, k: errors.calibrate(apply_fp, vf, apply_q, vq, sampler, x, k,
                                                      fit, phi=phi, check_finite=False),
                out_shardings=NamedSharding(mesh, P()))
  params = run(replicate(var_fp, mesh), replicate(var_q, mesh), x_T, key)
  return errors.compensation.check_params_finite(params, "sharded calibration")
