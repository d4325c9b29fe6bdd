"""The paper's practical form (arXiv 2508.12094, Eq. 13, window m = 1), as we read it.

With J ~ 0 the cumulative error is the a-weighted sum of past per-step errors; truncated
to one step, the correction that puts x_c back on the float trajectory is

    D_i = d_i + (a_i / b_i) e_i  ~  d_i + c_i d_{i-1},    c_i = a_i b_{i-1} / b_i,

and with a per-step, per-channel proportional error model d ~ K q the correction is built
from the current and the cached previous quantized output. The text leaves two choices
open, so both are options (`PaperM1Options`):

* `k_of="current"`: d_hat_i = K_i (q_i + c_i q_{i-1}), K_i fitted on u_i = q_i + c_i q_{i-1};
* `k_of="previous"`: d_hat_i = K_i q_i + c_i K_{i-1} q_{i-1}, K_i fitted on q_i against
  D_i - c_i K_{i-1} q_{i-1};

each least squares with ridge `lambda1` (relative to sum u^2), with or without an
intercept beta_i, fitted step by step on compensated trajectories.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from tac_jax.compensation.lstsq import affine_stats, solve_affine
from tac_jax.compensation.params import step_params
from tac_jax.compensation.registry import Method, register
from tac_jax.compensation.scan import FitContext, StepInputs

K_OF = ("current", "previous")


@dataclasses.dataclass(frozen=True)
class PaperM1Options:
  lambda1: float = 1e-6       # ridge of the K fit (relative to sum u^2)
  k_of: str = "current"       # which step's K multiplies the cached previous output
  intercept: bool = False     # also fit a per-channel offset beta_i

  def __post_init__(self):
    if self.k_of not in K_OF:
      raise ValueError(f"PaperM1Options.k_of must be one of {K_OF}, got {self.k_of!r}.")
    if not self.lambda1 >= 0:
      raise ValueError(f"PaperM1Options.lambda1 must be >= 0, got {self.lambda1}.")


def paper_m1_fit(ctx: FitContext):
  cfg: PaperM1Options = ctx.options
  c = ctx.sampler.coeffs
  coef = jnp.concatenate([jnp.zeros((1,)), c.a[1:] * c.b[:-1] / c.b[1:]])

  def fit_step(s: StepInputs):
    q = ctx.q(s.x_c, s.t)
    D = (q - s.eps_fp) + (c.a[s.i] / c.b[s.i]) * (s.x_c - s.x_fp)
    C = q.shape[-1]
    if cfg.k_of == "current":
      u = q + coef[s.i] * s.eps_q_prev
      K, beta = solve_affine(affine_stats(u, D), cfg.intercept, cfg.lambda1)
      K_prev = K * coef[s.i]
    else:
      K_prev = coef[s.i] * s.aux                       # the previous step's K
      K, beta = solve_affine(affine_stats(q, D - K_prev * s.eps_q_prev), cfg.intercept,
                             cfg.lambda1)
    return step_params(K, C, beta=beta, K_prev=K_prev), q, jnp.broadcast_to(K, (C,))

  return fit_step


register(Method("paper_m1", "arXiv 2508.12094's practical form (m = 1): current and cached "
                "previous output", fit=paper_m1_fit, options=PaperM1Options(),
                init_aux=lambda x_T: jnp.zeros((x_T.shape[-1],), jnp.float32)))
