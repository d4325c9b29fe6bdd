"""Model parameterisations of the DDPM-family (variance-preserving) schedules.

A network trained on x_t = alpha_t x0 + sigma_t eps, with alpha_t = sqrt(abar_t) and
sigma_t = sqrt(1 - abar_t), predicts one of (diffusers' `prediction_type` names):

    epsilon:       eps
    v_prediction:  v = alpha_t eps - sigma_t x0
    sample:        x0

The samplers in this package take eps, so `as_epsilon` wraps a v- or x0-network into an
eps-network with the identities (alpha^2 + sigma^2 = 1):

    eps = alpha_t v + sigma_t x_t                   (v_prediction)
    eps = (x_t - alpha_t x0) / sigma_t              (sample)

and `x0_from_epsilon` is the inverse map x0 = (x_t - sigma_t eps) / alpha_t. Wrapping keeps
every sampler affine in eps (the wrapped output is what the error model and the
compensators see; a quantized network's error in v or x0 becomes alpha_t dv or
-alpha_t / sigma_t dx0 in eps).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tac_jax.diffusion.samplers import ApplyFn
from tac_jax.diffusion.schedules import Schedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_prediction_type(prediction_type: str) -> None:
  """Raises ValueError for a parameterisation this module does not know."""
  if prediction_type not in PREDICTION_TYPES:
    hint = (" (flow models predict a velocity: use diffusion.flow's samplers)"
            if prediction_type == "flow_prediction" else "")
    raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of "
                     f"{PREDICTION_TYPES}{hint}.")


def _per_sample(table: jax.Array, t: jax.Array, x: jax.Array) -> jax.Array:
  """table[t] for integer timesteps t ([B] or scalar), broadcastable against x."""
  t = jnp.asarray(t)
  if not jnp.issubdtype(t.dtype, jnp.integer):
    raise TypeError(f"VP-schedule timesteps must be integers, got dtype {t.dtype}.")
  v = jnp.take(table, t)
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def to_epsilon(output: jax.Array, x: jax.Array, abar_t: jax.Array,
               prediction_type: str) -> jax.Array:
  """eps from a network output of the given type at x_t, with abar_t broadcastable to x."""
  check_prediction_type(prediction_type)
  if prediction_type == "epsilon":
    return output
  alpha, sigma = jnp.sqrt(abar_t), jnp.sqrt(1.0 - abar_t)
  if prediction_type == "v_prediction":
    return alpha * output + sigma * x
  return (x - alpha * output) / sigma


def x0_from_epsilon(eps: jax.Array, x: jax.Array, abar_t: jax.Array) -> jax.Array:
  """The data estimate x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
  return (x - jnp.sqrt(1.0 - abar_t) * eps) / jnp.sqrt(abar_t)


def as_epsilon(apply_fn: ApplyFn, prediction_type: str, schedule: Schedule) -> ApplyFn:
  """Wraps `apply_fn(variables, x, t)` predicting `prediction_type` into an eps-network.

  Args:
    apply_fn: the network, called as `apply_fn(variables, x, t)` with t the int32 [B]
      timesteps the samplers pass.
    prediction_type: `epsilon` (returned unchanged), `v_prediction` or `sample` (x0).
    schedule: the VP schedule the network was trained on (its abar_t converts outputs).
  Returns:
    `apply(variables, x, t) -> eps`, pure and jit-able.
  Raises:
    ValueError: for an unknown prediction type.
  """
  check_prediction_type(prediction_type)
  if prediction_type == "epsilon":
    return apply_fn
  abar = jnp.asarray(np.asarray(schedule.alphas_cumprod, np.float64), jnp.float32)

  def apply(variables, x, t):
    out = apply_fn(variables, x, t)
    return to_epsilon(out, x, _per_sample(abar, t, x).astype(out.dtype), prediction_type)

  return apply
