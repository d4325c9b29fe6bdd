"""StepbaQ (NeurIPS 2024; ../shared/REFERENCES.md), calibrated as its Algorithm 1.

The accumulated latent error is treated as extra Gaussian noise D ~ N(mu, sigma^2): a
noisier latent belongs to an earlier, noisier timestep. Step by step along the
compensated quantized trajectory x_c and a *synchronised* float trajectory x_s:

1. D = x_c - x_s; mu = per-channel mean of D, sigma^2 = Var(D) over all elements.
2. tau_i = argmin_j |abar_j - abar_{t_i} / (1 + sigma^2)| (so tau_i >= t_i).
3. If tau_i > t_i (a step back): the latent is adjusted, x_in = sqrt(abar_tau / abar_t)
   (x_c - mu), the network is called at tau_i, and the DDIM update uses abar_tau for the
   x0 estimate and the direction. Since sqrt(abar_prev / abar_tau) x_in = a_i (x_c - mu),
   that update is x_prev = a_i (x_c - mu) + b'_i eps (+ sigma_i z),
   b'_i = sqrt(1 - abar_prev - sigma_i^2) - sqrt(abar_prev (1 - abar_tau) / abar_tau):
   a state shift mu and an output gain b'_i / b_i. The float trajectory is re-synchronised
   to the adjusted latent (the float network takes the same x_in at tau_i), so the next D
   holds only the error made since (Algorithm 1, lines 5, 6, 12).
   Else mu = 0, tau_i = t_i, x_s takes an ordinary float step and D keeps accumulating.
Each calibration step costs one extra float call (on x_s). Inference replays mu and tau.
"""

from __future__ import annotations

import jax.numpy as jnp

from tac_jax.compensation.ddim import ddim_terms
from tac_jax.compensation.lstsq import channel_moments
from tac_jax.compensation.params import step_params
from tac_jax.compensation.registry import Method, register
from tac_jax.compensation.scan import FitContext, StepInputs
from tac_jax.diffusion.samplers import ddim_direction


def stepbaq_fit(ctx: FitContext):
  sampler = ctx.sampler
  terms = ddim_terms(sampler, "stepbaq")
  abar, ab_t, ab_prev, sig2 = (jnp.asarray(v, jnp.float32) for v in terms)
  c = sampler.coeffs

  def fit_step(s: StepInputs):
    i, x_s = s.i, s.aux                   # x_s: the synchronised float latent
    D = s.x_c - x_s
    mu, _ = channel_moments(D)
    _, var = channel_moments(D, per_channel=False)
    tau = jnp.argmin(jnp.abs(abar - ab_t[i] / (1 + var))).astype(jnp.int32)
    back = tau > c.t[i]
    tau = jnp.where(back, tau, c.t[i])
    x_shift = jnp.broadcast_to(jnp.where(back, mu, 0.0), s.x_c.shape[1:])
    ab_tau = abar[tau]
    in_scale = jnp.sqrt(ab_tau / ab_t[i])
    b_tau = ddim_direction(ab_tau, ab_prev[i], sig2[i], jnp)
    x_in, t_in = in_scale * (s.x_c - x_shift), jnp.full_like(s.t, tau)
    q = ctx.q(x_in, t_in)
    # The synchronised float latent: from the adjusted latent after a step back, else its
    # own ordinary float step.
    eps_s = ctx.fp(jnp.where(back, x_in, x_s), jnp.where(back, t_in, s.t))
    base = s.state_c._replace(x=jnp.where(back, s.x_c - x_shift, x_s))
    x_s_next = sampler.step(base, jnp.where(back, b_tau / c.b[i], 1.0) * eps_s, i).x
    return step_params(1.0 - b_tau / c.b[i], q.shape[-1], x_shift=x_shift, in_scale=in_scale,
                       t_in=tau), q, x_s_next

  return fit_step


register(Method("stepbaq", "StepbaQ: step back to a noisier timestep (Algorithm 1, "
                "synchronised float latent)", fit=stepbaq_fit, init_aux=lambda x_T: x_T,
                needs_schedule=True, calibration_calls=3))
