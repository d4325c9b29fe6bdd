"""The field's compensation methods as their papers define them (../shared/REFERENCES.md),
each a per-step fit for the shared calibration scan (`compensation.calibration_scan`) and
a `CorrectionParams` that `compensation.compensate` applies online.

Notation at scan position i: q = eps_q at the compensated state's network input, r = the
float output eps(x_fp, t_i) on the float trajectory, a_i, b_i the sampler's coefficients.

* `ptqd` (PTQD, official code): on the float trajectory (same input x_fp), err = q - r;
  k = slope of err on r (one scalar, kept only if > 0), mu_c = per-channel mean of err,
  sigma_q^2 = Var(err - k r). Online eps <- (q - mu) / (1 + k), i.e.
  K = k / (1 + k), beta = mu / (1 + k); for eta > 0 the step noise drops to
  sqrt(sigma_i^2 - b_i^2 sigma_q^2 / (1 + k)^2).
* `tac` (TAC-Diffusion): input bias correction mu_i = E[x_c - x_fp] (a map over H, W, C,
  averaged over calibration samples) subtracted from the state before the network call,
  then noise estimation reconstruction eps^ = K q on elements with |q| > thr * mean|q|,
      K = [(1-l1) S(q r) + l1 N S(q / r) + l2 N] / [(1-l1) S(q^2) + l1 N S(q^2 / r^2) + l2 N]
  (sums S over the masked elements of a channel, N their count; |r| floored at 0.1 x its
  channel mean in the relative term, else a few r ~ 0 under large q decide K), fitted step
  by step on trajectories corrected at earlier steps.
* `stepbaq` (StepbaQ): D = the quantization error accumulated in the latent since the
  last step back (a step back absorbs the error before it into the diffusion noise, so it
  is not counted twice: D_{i+1} = b'_i (q - eps(x_in, tau_i)) after a step back, else
  a_i D_i + b_i (q - eps(x_in, t_i)), J ~ 0), mu = per-channel mean, sigma^2 = Var(D);
  tau_i = argmin_j |abar_j - abar_{t_i} / (1 + sigma^2)|. If tau_i > t_i the latent is
  adjusted, x_in = sqrt(abar_tau / abar_t) (x - mu), the network is called at tau_i and the
  DDIM update uses abar_tau for the x0 estimate and the direction; since
  sqrt(abar_prev / abar_tau) x_in = a_i (x - mu), that update is
      x_prev = a_i (x - mu) + b'_i eps,  b'_i = sqrt(1 - abar_prev - sigma_i^2)
               - sqrt(abar_prev (1 - abar_tau) / abar_tau),
  i.e. a state shift mu and an output gain b'_i / b_i. Else mu = 0, tau_i = t_i and the
  error accumulates to a later step.
* `paper_m1` (arXiv 2508.12094, practical form, window m = 1), as we read it: with J ~ 0
  the cumulative error is the a-weighted sum of past per-step errors; truncated to one
  step, the correction that puts x_c back on the float trajectory is
      D_i = d_i + (a_i / b_i) e_i ~ d_i + c_i d_{i-1},  c_i = a_i b_{i-1} / b_i,
  and with one per-step, per-channel K_i for the proportional error model d ~ K_i q,
      d_hat_i = K_i (q_i + c_i q_{i-1})       (q_{i-1}: the cached previous output)
  K_i is the least-squares solution (no intercept, ridge lambda_1) of the measured D_i
  on u_i = q_i + c_i q_{i-1}, fitted step by step on compensated trajectories.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp
import numpy as np

from tac_jax.diffusion.samplers import Sampler
from tac_jax.diffusion.schedules import Schedule
from tac_jax.errors.compensation import (CorrectionParams, StepInputs, affine_stats,
                                         channel_moments, solve_affine)


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
  """Hyperparameters of the reference methods (their papers' / public code's defaults)."""
  tac_lambda1: float = 0.5      # weight of the relative error term
  tac_lambda2: float = 0.1      # pull of K toward 1
  tac_threshold: float = 1.0    # NER applies where |q| > threshold * mean |q|
  paper_lambda1: float = 1e-6   # ridge of the paper's K fit (relative to sum u^2)


R_FLOOR = 0.1   # |r| in the relative term is floored at R_FLOOR * mean |r| of the channel


def _params(K, C, **kw) -> CorrectionParams:
  K = jnp.broadcast_to(K, (C,))
  beta = jnp.broadcast_to(kw.pop("beta", jnp.zeros(())), (C,))
  return CorrectionParams(K=K, beta=beta, phi=None, timesteps=None, **kw)


def ptqd_fit_step(sampler: Sampler, apply_q, var_q):
  def fit_step(s: StepInputs):
    r = s.eps_fp
    err = apply_q(var_q, s.x_fp, s.t) - r
    k, _ = solve_affine(affine_stats(r, err, per_channel=False), intercept=True, ridge=0.0)
    k = jnp.maximum(k, 0.0)
    mu, _ = channel_moments(err)
    _, var_res = channel_moments(err - k * r, per_channel=False)
    eps_q = apply_q(var_q, s.x_c, s.t)
    return _params(k / (1 + k), r.shape[-1], beta=mu / (1 + k),
                   noise_var=var_res / (1 + k) ** 2), eps_q, s.aux
  return fit_step


def tac_fit_step(sampler: Sampler, apply_q, var_q, cfg: ReferenceConfig):
  l1, l2, thr = cfg.tac_lambda1, cfg.tac_lambda2, cfg.tac_threshold

  def fit_step(s: StepInputs):
    mu = jnp.mean(s.x_c - s.x_fp, axis=0)                          # IBC map [H, W, C]
    q = apply_q(var_q, s.x_c - mu, s.t)
    r = s.eps_fp
    mag = jnp.abs(q)
    m = (mag > thr * jnp.mean(mag, axis=tuple(range(1, q.ndim - 1)), keepdims=True))
    m = m.astype(q.dtype)
    floor = R_FLOOR * jnp.mean(jnp.abs(r), axis=tuple(range(q.ndim - 1)))
    r_rel = jnp.where(r < 0, -1.0, 1.0) * jnp.maximum(jnp.abs(r), floor)
    S = lambda v: jnp.sum(m * v, axis=tuple(range(q.ndim - 1)))
    n = S(jnp.ones_like(q))
    num = (1 - l1) * S(q * r) + l1 * n * S(q * r / r_rel ** 2) + l2 * n
    den = (1 - l1) * S(q * q) + l1 * n * S(q * q / r_rel ** 2) + l2 * n
    K_ner = jnp.where(n > 0, num / jnp.maximum(den, 1e-20), 1.0)
    return _params(1.0 - K_ner, q.shape[-1], x_shift=mu,
                   mask_threshold=jnp.asarray(thr, jnp.float32)), q, s.aux
  return fit_step


def _ddim_abar(sampler: Sampler, schedule: Schedule):
  """abar_t and abar_prev per step; checks the sampler is DDIM/DDPM on `schedule`."""
  c = sampler.coeffs
  abar = np.asarray(schedule.alphas_cumprod, np.float64)
  t = np.asarray(c.t)
  ab_t = abar[t]
  ab_prev = np.concatenate([abar[t[1:]], [1.0]])
  sig2 = np.asarray(c.sigma, np.float64) ** 2
  b = np.sqrt(np.maximum(1 - ab_prev - sig2, 0.0)) - np.sqrt(ab_prev * (1 - ab_t) / ab_t)
  if not (np.allclose(np.sqrt(ab_prev / ab_t), np.asarray(c.a), rtol=1e-4)
          and np.allclose(b, np.asarray(c.b), rtol=1e-3, atol=1e-5)):
    raise ValueError("stepbaq needs a DDIM or DDPM sampler built from the given schedule "
                     "(its step-size adaptation re-derives the DDIM coefficients).")
  return abar, ab_t, ab_prev, sig2


def stepbaq_fit_step(sampler: Sampler, apply_fp, var_fp, apply_q, var_q,
                     schedule: Optional[Schedule]):
  if schedule is None:
    raise ValueError("stepbaq needs the noise schedule: pass schedule= to errors.calibrate.")
  abar, ab_t, ab_prev, sig2 = (jnp.asarray(v, jnp.float32) for v in _ddim_abar(sampler, schedule))
  c = sampler.coeffs

  def fit_step(s: StepInputs):
    i, E = s.i, s.aux                     # E: quantization error accumulated since the last step back
    mu, _ = channel_moments(E)
    _, var = channel_moments(E - mu, per_channel=False)
    tau = jnp.argmin(jnp.abs(abar - ab_t[i] / (1 + var))).astype(jnp.int32)
    shift = tau > c.t[i]
    tau = jnp.where(shift, tau, c.t[i])
    mu = jnp.where(shift, mu, 0.0)
    ab_tau = abar[tau]
    in_scale = jnp.sqrt(ab_tau / ab_t[i])
    b_tau = (jnp.sqrt(jnp.maximum(1 - ab_prev[i] - sig2[i], 0.0))
             - jnp.sqrt(ab_prev[i] * (1 - ab_tau) / ab_tau))
    x_shift = jnp.broadcast_to(mu, s.x_c.shape[1:])
    x_in, t_in = in_scale * (s.x_c - x_shift), jnp.full_like(s.t, tau)
    q = apply_q(var_q, x_in, t_in)
    # A step back absorbs E into the diffusion noise; what the step adds is its own error.
    injected = b_tau * (q - apply_fp(var_fp, x_in, t_in))
    E_next = jnp.where(shift, 0.0, c.a[i] * E) + injected
    return _params(1.0 - b_tau / c.b[i], q.shape[-1], x_shift=x_shift, in_scale=in_scale,
                   t_in=tau), q, E_next
  return fit_step


def paper_m1_fit_step(sampler: Sampler, apply_q, var_q, cfg: ReferenceConfig):
  c = sampler.coeffs
  coef = jnp.concatenate([jnp.zeros((1,)), c.a[1:] * c.b[:-1] / c.b[1:]])

  def fit_step(s: StepInputs):
    q = apply_q(var_q, s.x_c, s.t)
    D = (q - s.eps_fp) + (c.a[s.i] / c.b[s.i]) * (s.x_c - s.x_fp)
    u = q + coef[s.i] * s.eps_q_prev
    K, _ = solve_affine(affine_stats(u, D), intercept=False, ridge=cfg.paper_lambda1)
    return _params(K, q.shape[-1], K_prev=K * coef[s.i]), q, s.aux
  return fit_step


def fit_step(method: str, sampler: Sampler, apply_fp, var_fp, apply_q, var_q,
             schedule: Optional[Schedule] = None,
             cfg: ReferenceConfig = ReferenceConfig()):
  """(fit_step, sequential) of a reference method for `compensation.calibration_scan`."""
  if method == "ptqd":
    return ptqd_fit_step(sampler, apply_q, var_q), True
  if method == "tac":
    return tac_fit_step(sampler, apply_q, var_q, cfg), True
  if method == "stepbaq":
    return stepbaq_fit_step(sampler, apply_fp, var_fp, apply_q, var_q, schedule), True
  if method == "paper_m1":
    return paper_m1_fit_step(sampler, apply_q, var_q, cfg), True
  raise ValueError(f"unknown reference method {method!r}; choose ptqd, tac, stepbaq or paper_m1.")
