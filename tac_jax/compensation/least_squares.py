"""Our least-squares family (docs/METHOD.md s.3): the identity `none`, `per_step`, `tcec`,
`tcec_vp` and `tcec_ehat`, one `FitConfig` each. With e_i = x_c - x_fp the cumulative
target at scan position i is

    D_i = (eps_q - eps) + (a_i / b_i) e_i

(the correction that puts x_c back on the float trajectory at the next step), fitted per
channel as D_i ~ K_i eps_q + beta_i (+ G_i e_hat) from sufficient statistics. On a
multistep sampler (x_{i+1} = a x_i + b eps_i + c eps_{i-1} + d x_{i-1}: DPM-Solver++ 2M,
Heun) the same definition reads

    D_i = (eps_q - eps) + [a_i e_i + c_i (eps_c,i-1 - eps_i-1) + d_i e_{i-1}] / b_i

with the previous step's corrected and float outputs (`multistep.carried_difference`).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from tac_jax.compensation.lstsq import (affine_stats, preserve_variance, solve_affine,
                                        solve_with_regressor)
from tac_jax.compensation.params import CorrectionParams
from tac_jax.compensation.registry import Method, register
from tac_jax.compensation.scan import FitContext, StepInputs
from tac_jax.diffusion.multistep import carried_difference

TARGETS = ("cumulative", "same_input")


@dataclasses.dataclass(frozen=True)
class FitConfig:
  """How a least-squares correction is fitted (the options of per_step / tcec*)."""
  target: str = "cumulative"      # 'cumulative' (D_i) or 'same_input' (d_i = eps_q(x_c) - eps(x_c))
  sequential: bool = True         # fit on trajectories already compensated at earlier steps
  per_channel: bool = True        # one (K, beta) per channel, else one per tensor
  intercept: bool = True          # fit beta (else beta = 0)
  ridge: float = 1e-6             # relative Tikhonov term on var(eps_q)
  e_hat_regressor: bool = False   # also regress on the carried error estimate (G e_hat)
  preserve_variance: bool = False  # rescale the corrected eps to the float eps's per-channel
                                   # std at that step (no shrinkage toward the mean)

  def __post_init__(self):
    if self.target not in TARGETS:
      raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}.")
    if self.e_hat_regressor and not (self.per_channel and self.intercept):
      raise ValueError("e_hat_regressor needs per_channel=True and intercept=True.")
    if self.e_hat_regressor and self.preserve_variance:
      raise ValueError("preserve_variance cannot be combined with e_hat_regressor.")


def least_squares_fit(ctx: FitContext):
  """Per-step fit of the FitConfig family (`ctx.options`)."""
  fit: FitConfig = ctx.options
  c = ctx.sampler.coeffs

  def fit_step(s: StepInputs):
    eps_q = ctx.q(s.x_c, s.t)
    if fit.target == "cumulative":
      D = (eps_q - s.eps_fp) + carried_difference(c, s.i, s.state_c, s.state_fp) / c.b[s.i]
    else:
      D = eps_q - ctx.fp(s.x_c, s.t)
    C = eps_q.shape[-1]
    G = None
    if fit.e_hat_regressor:
      K, beta, G = solve_with_regressor(eps_q, s.e_hat, D, fit.ridge)
    else:
      K, beta = solve_affine(affine_stats(eps_q, D, fit.per_channel), fit.intercept, fit.ridge)
      if fit.preserve_variance:
        K, beta = preserve_variance(K, beta, eps_q, s.eps_fp, fit.per_channel)
    K, beta = jnp.broadcast_to(K, (C,)), jnp.broadcast_to(beta, (C,))
    return CorrectionParams(K=K, beta=beta, phi=None, timesteps=None, G=G), eps_q, s.aux

  return fit_step


def register_least_squares(name: str, summary: str, config: FitConfig) -> Method:
  """Registers a FitConfig preset as a method (its `sequential` decides the scan's). It
  holds on multistep samplers unless it regresses on e_hat (a one-step recurrence)."""
  calls = 3 if config.target == "same_input" else 2
  return register(Method(name, summary, fit=least_squares_fit, options=config,
                         sequential=None, calibration_calls=calls,
                         multistep=not config.e_hat_regressor))


register(Method("none", "no correction (plain PTQ)", calibration_calls=0, multistep=True))
register_least_squares("per_step", "per-step own error d_i, fitted on plain PTQ trajectories",
                       FitConfig(target="same_input", sequential=False))
register_least_squares("tcec", "cumulative target D_i, sequential, per channel, intercept",
                       FitConfig())
register_least_squares("tcec_vp", "tcec with the float output's per-channel std kept",
                       FitConfig(preserve_variance=True))
register_least_squares("tcec_ehat", "tcec with the carried error estimate as a regressor",
                       FitConfig(e_hat_regressor=True))
