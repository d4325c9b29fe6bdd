"""Observers: data -> QuantParams. Deterministic and jit-friendly.

* `minmax`: the range of the data.
* `percentile`: the range between the (100-p)th and p-th percentiles (clips outliers).
* `mse`: a vectorised search over clipping ratios of the min-max range that minimises
  the mean squared quantization error, chosen per channel.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict

import jax
import jax.numpy as jnp

from tac_jax.quant import core
from tac_jax.validate import check_finite_data


check_calibration_data = check_finite_data  # the name the quantizers use


def _prepare(x, bits, axis):
  check_calibration_data(x)
  x = jnp.asarray(x, jnp.float32)
  core.check_bits(bits)
  axis = core.normalize_axis(axis, x.ndim)
  return x, axis, core.reduce_axes(x.ndim, axis)


def minmax(x, bits: int, axis=None, symmetric: bool = True) -> core.QuantParams:
  x, axis, red = _prepare(x, bits, axis)
  keep = axis is not None
  lo = jnp.min(x, axis=red, keepdims=keep)
  hi = jnp.max(x, axis=red, keepdims=keep)
  return core.params_from_range(lo, hi, bits, axis, symmetric, ndim=x.ndim)


def percentile(x, bits: int, axis=None, symmetric: bool = True,
               p: float = 99.99) -> core.QuantParams:
  if not 50.0 < p <= 100.0:
    raise ValueError(f"percentile p must be in (50, 100], got {p}.")
  x, axis, red = _prepare(x, bits, axis)
  keep = axis is not None
  if symmetric:
    hi = jnp.percentile(jnp.abs(x), p, axis=red, keepdims=keep)
    lo = -hi
  else:
    lo = jnp.percentile(x, 100.0 - p, axis=red, keepdims=keep)
    hi = jnp.percentile(x, p, axis=red, keepdims=keep)
  return core.params_from_range(lo, hi, bits, axis, symmetric, ndim=x.ndim)


def mse(x, bits: int, axis=None, symmetric: bool = True, num_ratios: int = 64,
        min_ratio: float = 0.01) -> core.QuantParams:
  """Clipping search: ratio r in [min_ratio, 1] (geometric grid) scales the min-max
  range; the r with the lowest quantization MSE is kept (per channel when `axis` is
  given). The geometric grid resolves the small ratios heavy-tailed data needs. All
  candidates are evaluated at once (vmap) in one jitted program."""
  x, axis, red = _prepare(x, bits, axis)
  return _mse_search(x, bits, axis, symmetric, num_ratios, float(min_ratio))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _mse_search(x, bits, axis, symmetric, num_ratios, min_ratio) -> core.QuantParams:
  red = core.reduce_axes(x.ndim, axis)
  keep = axis is not None
  lo = jnp.min(x, axis=red, keepdims=keep)
  hi = jnp.max(x, axis=red, keepdims=keep)
  ratios = jnp.geomspace(min_ratio, 1.0, num_ratios, dtype=jnp.float32)

  def err(r):
    qp = core.params_from_range(r * lo, r * hi, bits, axis, symmetric, ndim=x.ndim)
    d = core.dequantize(core.quantize(x, qp), qp) - x
    return jnp.mean(d * d, axis=red, keepdims=keep)

  errs = jax.vmap(err)(ratios)  # [R, ...channel shape]
  best = ratios[jnp.argmin(errs, axis=0)]
  return core.params_from_range(best * lo, best * hi, bits, axis, symmetric, ndim=x.ndim)


OBSERVERS: Dict[str, Callable[..., core.QuantParams]] = {
    "minmax": minmax,
    "percentile": percentile,
    "mse": mse,
}


def get_observer(name: str) -> Callable[..., core.QuantParams]:
  if name not in OBSERVERS:
    raise ValueError(f"unknown observer {name!r}; choose one of {sorted(OBSERVERS)}.")
  return OBSERVERS[name]
