"""Input checks shared by the library (they work on concrete arrays and skip traced ones,
so the same call is safe inside and outside `jax.jit`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tac_jax.host import to_host


def is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def check_finite_data(x, what: str = "calibration data") -> None:
  """Raises ValueError for empty or non-finite data (no-op on traced values)."""
  if is_traced(x):
    return
  if np.size(x) == 0:
    raise ValueError(f"{what} is empty; pass at least one sample.")
  n_bad = int(to_host(jnp.sum(~jnp.isfinite(jnp.asarray(x)))))  # sharded data: an all-reduce
  if n_bad:
    raise ValueError(
        f"{what} contains {n_bad} NaN/inf values; clean the data (or check the model "
        "that produced it) before calibrating.")


def check_finite_tree(tree, what: str) -> None:
  """Raises ValueError when any concrete leaf of `tree` holds NaN/inf (traced leaves skip)."""
  for leaf in jax.tree.leaves(tree):
    if not is_traced(leaf) and not np.all(np.isfinite(to_host(leaf))):
      raise ValueError(f"{what} hold NaN/inf values; refit them (check the quantized model and "
                       "the input noise).")
