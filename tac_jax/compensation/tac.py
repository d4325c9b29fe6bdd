"""TAC-Diffusion (ECCV 2024, arXiv 2407.03917; ../shared/REFERENCES.md).

Input bias correction (IBC): mu_i = E[x_c - x_fp] (a map over H, W, C averaged over the
calibration samples) is subtracted from the state before the network call. Noise
estimation reconstruction (NER): eps^ = K q on the elements with |q| > thr * mean|q|, with
both networks evaluated at the *same* input, the state the compensated sampler really
feeds them: q = eps_q(x_c - mu, t), r = eps(x_c - mu, t) (as PTQD's code and the public
reimplementation pair them), and

    K = [(1-l1) S(q r) + l1 N S(q / r) + l2 N] / [(1-l1) S(q^2) + l1 N S(q^2 / r^2) + l2 N]

(sums S over the masked elements of one sample's channel, N their count; |r| floored at
0.1 x its channel mean in the relative term, else a few r ~ 0 under large q decide K),
averaged over the calibration samples (as the public reimplementation averages its
per-sample K), fitted step by step on trajectories corrected at earlier steps.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from tac_jax.compensation.params import step_params
from tac_jax.compensation.registry import Method, register
from tac_jax.compensation.scan import FitContext, StepInputs

R_FLOOR = 0.1   # |r| in the relative term is floored at R_FLOOR * mean |r| of the channel


@dataclasses.dataclass(frozen=True)
class TACOptions:
  """TAC's hyperparameters (the public reimplementation's defaults)."""
  lambda1: float = 0.5      # weight of the relative error term
  lambda2: float = 0.1      # pull of K toward 1
  threshold: float = 1.0    # NER applies where |q| > threshold * mean |q|


def ner_gain(q, r, cfg: TACOptions):
  """NER's closed-form K per channel from paired outputs q, r [B, H, W, C]: per sample and
  channel over the masked elements (|q| > threshold x mean |q|), then averaged over the
  calibration samples, as the public reimplementation averages its K."""
  l1, l2 = cfg.lambda1, cfg.lambda2
  spatial = tuple(range(1, q.ndim - 1))
  mag = jnp.abs(q)
  m = (mag > cfg.threshold * jnp.mean(mag, axis=spatial, keepdims=True)).astype(q.dtype)
  floor = R_FLOOR * jnp.mean(jnp.abs(r), axis=tuple(range(q.ndim - 1)))
  r_rel = jnp.where(r < 0, -1.0, 1.0) * jnp.maximum(jnp.abs(r), floor)
  S = lambda v: jnp.sum(m * v, axis=spatial)                       # [B, C]
  n = S(jnp.ones_like(q))
  num = (1 - l1) * S(q * r) + l1 * n * S(q * r / r_rel ** 2) + l2 * n
  den = (1 - l1) * S(q * q) + l1 * n * S(q * q / r_rel ** 2) + l2 * n
  return jnp.mean(jnp.where(n > 0, num / jnp.maximum(den, 1e-20), 1.0), axis=0)


def tac_fit(ctx: FitContext):
  cfg: TACOptions = ctx.options

  def fit_step(s: StepInputs):
    mu = jnp.mean(s.x_c - s.x_fp, axis=0)                 # IBC map [H, W, C]
    x_in = s.x_c - mu
    q = ctx.q(x_in, s.t)
    K = ner_gain(q, ctx.fp(x_in, s.t), cfg)
    return step_params(1.0 - K, q.shape[-1], x_shift=mu,
                       mask_threshold=jnp.asarray(cfg.threshold, jnp.float32)), q, s.aux

  return fit_step


register(Method("tac", "TAC-Diffusion: input bias correction + masked noise estimation "
                "reconstruction (same-input pairing)", fit=tac_fit, options=TACOptions(),
                calibration_calls=3, multistep=True))
