"""A compensation method defined outside the library, as a user would: a per-channel
offset that removes the mean output error on the compensated trajectory. Imported by the
launchers with --config.plugins=tests.toy_compensator (tests/test_launchers.py) and
directly by tests that register it."""

import jax.numpy as jnp

from tac_jax import compensation as comp
from tac_jax.compensation.params import step_params


def mean_offset_fit(ctx: comp.FitContext):
  def fit_step(s: comp.StepInputs):
    eps_q = ctx.q(s.x_c, s.t)
    beta = jnp.mean(eps_q - ctx.fp(s.x_c, s.t), axis=(0, 1, 2))
    return step_params(0.0, eps_q.shape[-1], beta=beta), eps_q, s.aux
  return fit_step


if "toy_offset" not in comp.names():
  comp.register(comp.Method("toy_offset", "toy: per-channel mean output error (a test plug-in)",
                            fit=mean_offset_fit, calibration_calls=3))
