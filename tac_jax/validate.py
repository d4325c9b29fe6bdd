"""Input checks shared by the library. The data checks work on concrete arrays and skip
traced ones, so the same call is safe inside and outside `jax.jit`; `check_applies` traces a
model call once (`jax.eval_shape`) and turns a Flax / shape error into a ValueError that says
what to fix."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np

from tac_jax.host import to_host


# What a model raises when it is called on inputs or variables it cannot take: Flax's scope
# errors (ScopeParamShapeError: params of other shapes, ScopeParamNotFoundError: of another
# module) and the TypeErrors of jax ops on mismatched shapes (or of a wrong call form).
SHAPE_ERRORS = (flax.errors.FlaxError, TypeError)


def is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def is_integer(v) -> bool:
  """A Python or numpy integer; a bool is not one (True would pass for 1)."""
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_real(v) -> bool:
  """A Python or numpy integer or float, not a bool (it may be inf or NaN)."""
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


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


def describe_shapes(args) -> str:
  """'(8, 32, 32, 3), (8,)': the shapes of the array leaves of `args` (arrays or
  jax.ShapeDtypeStructs)."""
  return ", ".join(str(tuple(getattr(a, "shape", np.shape(a)))) for a in jax.tree.leaves(args))


def check_applies(apply: Callable, variables, args: Sequence[Any], what: str,
                  fix: str = "") -> Any:
  """`jax.eval_shape(apply, variables, *args)` (the output's shape structure; nothing is
  computed), or a ValueError "<what>: the model does not accept inputs of shape ... (Error:
  its first line); <fix>." when the call raises one of SHAPE_ERRORS. Other exceptions (the
  library's own ValueErrors, which already say what is wrong) pass through unchanged."""
  try:
    return jax.eval_shape(apply, variables, *args)
  except SHAPE_ERRORS as e:
    first = (str(e).strip().splitlines() or [""])[0]
    raise ValueError(f"{what}: the model does not accept inputs of shape {describe_shapes(args)} "
                     f"({type(e).__name__}: {first})" + (f"; {fix}" if fix else "") + "."
                     ) from None
