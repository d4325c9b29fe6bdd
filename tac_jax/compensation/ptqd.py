"""PTQD (NeurIPS 2023) as in its official code (../shared/REFERENCES.md).

On the float trajectory (both networks at the same input x_fp), err = q - r with
r = eps(x_fp, t): k = slope of err regressed on r (one scalar, kept only if > 0),
mu_c = per-channel mean of err, sigma_q = the mean over samples of each sample's std of
err - k r. Online eps <- (q - mu) / (1 + k), i.e. K = k / (1 + k), beta = mu / (1 + k).
For eta > 0 the step noise drops to sigma' = sqrt(sigma^2 - b^2 sigma_q^2 / (1 + k)^2)
and, as the official sampler does, the direction coefficient is recomputed with sigma':
b' = sqrt(1 - abar_prev - sigma'^2) - sqrt(abar_prev (1 - abar_t) / abar_t), so the
corrected output enters the step as (b' / b) eps (`out_gain`) and the noise as
(sigma' / sigma) z (`noise_gain`).
"""

from __future__ import annotations

import jax.numpy as jnp

from tac_jax.compensation.ddim import ddim_terms
from tac_jax.compensation.lstsq import affine_stats, channel_moments, solve_affine
from tac_jax.compensation.params import step_params
from tac_jax.compensation.registry import Method, register
from tac_jax.compensation.scan import FitContext, StepInputs
from tac_jax.diffusion.samplers import ddim_direction


def per_sample_std(x):
  """The mean over samples of each sample's standard deviation (PTQD's sigma_q)."""
  return jnp.mean(jnp.std(x.reshape(x.shape[0], -1), axis=1))


def ptqd_fit(ctx: FitContext):
  c = ctx.sampler.coeffs
  stochastic = c.stochastic
  if stochastic:
    terms = ddim_terms(ctx.sampler, "ptqd at eta > 0")
    ab_t, ab_prev = jnp.asarray(terms.ab_t, jnp.float32), jnp.asarray(terms.ab_prev, jnp.float32)

  def fit_step(s: StepInputs):
    r = s.eps_fp
    err = ctx.q(s.x_fp, s.t) - r
    k, _ = solve_affine(affine_stats(r, err, per_channel=False), intercept=True, ridge=0.0)
    k = jnp.maximum(k, 0.0)
    mu, _ = channel_moments(err)
    noise_var = per_sample_std(err - k * r) ** 2 / (1 + k) ** 2
    extra = {}
    if stochastic:
      sigma = c.sigma[s.i]
      reduced = jnp.sqrt(jnp.maximum(sigma ** 2 - c.b[s.i] ** 2 * noise_var, 0.0))
      b_new = ddim_direction(ab_t[s.i], ab_prev[s.i], reduced ** 2, jnp)
      extra = dict(noise_gain=jnp.where(sigma > 0, reduced / jnp.where(sigma > 0, sigma, 1.0), 1.0),
                   out_gain=b_new / c.b[s.i])
    eps_q = ctx.q(s.x_c, s.t)
    return step_params(k / (1 + k), r.shape[-1], beta=mu / (1 + k), noise_var=noise_var,
                       **extra), eps_q, s.aux

  return fit_step


register(Method("ptqd", "PTQD: correlated-noise gain and per-channel bias on the float "
                "trajectory; variance absorbed at eta > 0", fit=ptqd_fit, calibration_calls=3,
                multistep=True))
