"""Bringing (possibly sharded, possibly multi-process) arrays to the host as numpy."""

import jax
import numpy as np
from jax.experimental import multihost_utils


def to_host(x) -> np.ndarray:
  """`x` as numpy on every process: local arrays directly, replicated global arrays from
  this process's copy, sharded global arrays gathered across processes."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
