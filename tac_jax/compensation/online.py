"""The online correction: one compensated sampler step, and `compensate`, which wraps any
sampler so its steps apply fitted `CorrectionParams` (the same code the calibration scan
runs, so a correction is fitted exactly as it is later applied)."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from tac_jax.compensation.params import (CorrectionParams, at_step, check_params,
                                         check_params_finite)
from tac_jax.diffusion.samplers import Sampler, network_input


def correction(p: CorrectionParams, eps_q, e_hat, eps_q_prev):
  """d_hat of one step (`p` = `at_step(params, i)`): what is subtracted from eps_q."""
  d_hat = p.K * eps_q + p.beta
  if p.G is not None:
    d_hat = d_hat + p.G * e_hat
  if p.K_prev is not None:
    d_hat = d_hat + p.K_prev * eps_q_prev
  if p.mask_threshold is not None:
    mag = jnp.abs(eps_q)
    mean = jnp.mean(mag, axis=tuple(range(1, eps_q.ndim - 1)), keepdims=True)
    d_hat = jnp.where(mag > p.mask_threshold * mean, d_hat, 0.0)
  return d_hat


def shifted_state(p: CorrectionParams, x):
  """The state after the input bias correction (x - x_shift)."""
  return x if p.x_shift is None else x - p.x_shift


def corrected_input(p: CorrectionParams, x, t):
  """(x_in, t_in) the network sees at this step under the correction `p` (the sampler-level
  counterpart is `samplers.network_input`)."""
  x = shifted_state(p, x)
  x_in = x if p.in_scale is None else p.in_scale * x
  return x_in, (t if p.t_in is None else p.t_in)


def corrected_step(sampler: Sampler, p: CorrectionParams, i, inner, eps_q, e_hat, eps_q_prev):
  """One compensated sampler step: (new inner state, new e_hat, d_hat)."""
  c = sampler.coeffs
  if p.x_shift is not None:
    inner = inner._replace(x=shifted_state(p, inner.x))
  d_hat = correction(p, eps_q, e_hat, eps_q_prev)
  eps = eps_q - d_hat
  if p.out_gain is not None:
    eps = p.out_gain * eps
  if p.noise_gain is not None and c.stochastic:
    new = sampler.step(inner, eps, i, noise_scale=p.noise_gain)
  else:
    new = sampler.step(inner, eps, i)
  return new, p.phi * e_hat + c.b[i] * d_hat, d_hat


class ErrorState(NamedTuple):
  e_hat: jax.Array        # closed-form estimate of the error plain PTQ would accumulate


class CompensatedState(NamedTuple):
  inner: Any
  error: ErrorState
  eps_q_prev: Any = None  # the previous step's quantized output (methods with K_prev)

  @property
  def x(self):
    return self.inner.x


def compensate(sampler: Sampler, params: Optional[CorrectionParams]) -> Sampler:
  """Wraps a sampler so each step corrects eps_q; `params=None` is the identity (`none`).

  Args:
    sampler: any affine sampler (`samplers.ddim`, `samplers.ddpm`, ...).
    params: fitted CorrectionParams for this sampler's steps, or None.
  Returns:
    A Sampler whose state is CompensatedState(inner, ErrorState(e_hat), eps_q_prev).
  """
  if params is not None:
    check_params(params, sampler)
    check_params_finite(params, "compensate")

  def init(x_T, key):
    if params is not None:
      check_params(params, sampler, x_T.shape[-1])
    return CompensatedState(sampler.init(x_T, key), ErrorState(jnp.zeros_like(x_T)),
                            jnp.zeros_like(x_T))

  def prepare(state: CompensatedState, i):
    x_in, t_in = network_input(sampler, state.inner, i)
    return (x_in, t_in) if params is None else corrected_input(at_step(params, i), x_in, t_in)

  def step(state: CompensatedState, eps_q, i):
    if params is None:
      return state._replace(inner=sampler.step(state.inner, eps_q, i))
    inner, e_hat, _ = corrected_step(sampler, at_step(params, i), i, state.inner, eps_q,
                                     state.error.e_hat, state.eps_q_prev)
    return CompensatedState(inner, ErrorState(e_hat), eps_q)

  needs_prepare = sampler.prepare is not None or (params is not None and (
      params.x_shift is not None or params.in_scale is not None or params.t_in is not None))
  return sampler._replace(init=init, step=step, prepare=prepare if needs_prepare else None)
