"""Closed-form least squares from sufficient statistics (sums over samples, so they reduce
across devices with one all-reduce) and per-channel moments."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class AffineStats(NamedTuple):
  """Sufficient statistics of y ~ K x + beta, per channel: sums over samples."""
  n: jax.Array
  sx: jax.Array
  sy: jax.Array
  sxx: jax.Array
  sxy: jax.Array


def reduce_axes(x, per_channel: bool = True):
  return tuple(range(x.ndim - 1)) if per_channel else tuple(range(x.ndim))


def affine_stats(x: jax.Array, y: jax.Array, per_channel: bool = True) -> AffineStats:
  axes = reduce_axes(x, per_channel)
  n = jnp.asarray(np.prod([x.shape[a] for a in axes]), jnp.float32)
  s = lambda v: jnp.sum(v, axis=axes)
  return AffineStats(n=jnp.broadcast_to(n, s(x).shape), sx=s(x), sy=s(y), sxx=s(x * x), sxy=s(x * y))


def solve_affine(st: AffineStats, intercept: bool = True, ridge: float = 1e-6):
  """Closed-form least squares (K, beta) from sufficient statistics."""
  if intercept:
    mx, my = st.sx / st.n, st.sy / st.n
    var = st.sxx / st.n - mx * mx
    cov = st.sxy / st.n - mx * my
    k = cov / (var * (1 + ridge) + 1e-20)
    return k, my - k * mx
  k = st.sxy / (st.sxx * (1 + ridge) + 1e-20)
  return k, jnp.zeros_like(k)


def channel_moments(x, per_channel: bool = True):
  """(mean, variance) over all but the channel axis (or over everything)."""
  axes = reduce_axes(x, per_channel)
  m = jnp.mean(x, axis=axes)
  return m, jnp.mean(x * x, axis=axes) - m * m


def preserve_variance(K, beta, eps_q, eps_fp, per_channel: bool = True):
  """(K', beta') whose corrected output eps_q - (K' eps_q + beta') = g eps_q + h has the same
  mean as with (K, beta) and the float output's per-channel std, g = std_fp / std_q > 0 (no
  shrinkage, and no sign flip where the least-squares slope overshoots)."""
  m_q, v_q = channel_moments(eps_q, per_channel)
  _, v_fp = channel_moments(eps_fp, per_channel)
  mean_corrected = (1.0 - K) * m_q - beta
  g_new = jnp.sqrt(v_fp / (v_q + 1e-12))
  return 1.0 - g_new, g_new * m_q - mean_corrected


def solve_with_regressor(x, z, target, ridge: float):
  """Per-channel least squares target ~ K x + G z + beta (3x3 normal equations); returns
  (K, beta, G). z may be all zero (the first step's e_hat): a tiny ridge keeps G at 0."""
  X = jnp.stack([x, z, jnp.ones_like(x)], axis=-1)      # [..., C, 3]
  xtx = jnp.einsum("...ci,...cj->cij", X, X)
  xty = jnp.einsum("...ci,...c->ci", X, target)
  diag = jnp.diagonal(xtx, axis1=-2, axis2=-1)
  reg = ridge * diag + 1e-12 * jnp.mean(diag) + jnp.array([0.0, 1e-9, 0.0])
  w = jnp.linalg.solve(xtx + jax.vmap(jnp.diag)(reg), xty[..., None])[..., 0]
  return w[:, 0], w[:, 2], w[:, 1]
