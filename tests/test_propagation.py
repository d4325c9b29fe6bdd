"""The error model (tac_jax.compensation.propagation): the closed form of the cumulative
error, the joint float / quantized run, and the carried estimate e_hat of plain PTQ's
error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tac_jax import compensation
from tac_jax.compensation import propagation
from tac_jax.diffusion import samplers, schedules
from toys import AFFINE_Q, C, LINEAR, VARS, affine_error_eps, noise

SCHED = schedules.make_schedule("linear", 1000)
_noise = noise


@pytest.mark.parametrize("per_channel_phi", [True, False])
def test_closed_form_solvers_equal_recurrence(per_channel_phi):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  n = 12
  phi = jax.random.uniform(k1, (n, C) if per_channel_phi else (n,), minval=0.8, maxval=1.2)
  b = jax.random.uniform(k2, (n,), minval=-0.3, maxval=-0.05)
  d = jax.random.normal(k3, (n, 5, 4, 4, C))
  ref = propagation.cumulative_error_recurrence(phi, b, d)
  np.testing.assert_allclose(propagation.cumulative_error_scan(phi, b, d), ref, rtol=1e-4, atol=1e-5)
  solve = jax.jit(propagation.cumulative_error_solve)(
      phi if per_channel_phi else jnp.broadcast_to(phi[:, None], (n, C)), b, d)
  np.testing.assert_allclose(solve, ref, rtol=1e-4, atol=1e-5)
  # Explicit sum of products for the last step.
  phi_full = jnp.broadcast_to(phi if per_channel_phi else phi[:, None], (n, C))
  want = sum(jnp.prod(phi_full[j + 1:], axis=0) * b[j] * d[j] for j in range(n))
  np.testing.assert_allclose(ref[-1], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sampler_name", ["ddim", "ddpm"])
def test_linear_model_propagation_is_exact(sampler_name):
  sampler = samplers.make_sampler(sampler_name, SCHED, 10)
  trace = jax.jit(lambda fp, q, x: propagation.joint_run(fp, q, sampler, x, jax.random.key(1)))(
      LINEAR, AFFINE_Q, _noise(0))
  c = sampler.coeffs
  np.testing.assert_array_equal(trace.e[0], 0.0)
  np.testing.assert_allclose(trace.e_next[-1], trace.x_q_final - trace.x_fp_final, atol=1e-6)
  phi = propagation.fit_channel_gains(trace, c.a, c.b)
  rep = propagation.propagation_report(trace, c.a, c.b, phi)
  assert np.all(rep["one_step_jvp_rel_err"] < 1e-3)  # first order is exact for a linear eps
  assert np.all(rep["closed_form_rel_err"][1:] < 1e-3)
  assert np.all(rep["closed_form_corr"][1:] > 0.999)
  assert rep["measured_rms"][-1] > 1e-2  # there is error to explain


def test_error_state_tracks_plain_ptq_error_on_linear_model():
  """e_hat (fitted phi, d_hat along the compensated path) estimates the plain-PTQ error.

  It is an estimate, not an identity: d_hat is evaluated on the compensated trajectory,
  which stays near the float one, while plain PTQ drifts. On this toy it is within ~32 %.
  """
  sampler = samplers.ddim(SCHED, 10)
  x_T, key = _noise(0), jax.random.key(1)
  trace = propagation.joint_run(LINEAR, AFFINE_Q, sampler, x_T, key)
  phi = propagation.fit_channel_gains(trace, sampler.coeffs.a, sampler.coeffs.b)
  p = compensation.calibrate(LINEAR, AFFINE_Q, sampler, x_T, key, "tcec", phi=phi).params
  np.testing.assert_allclose(p.phi, phi, rtol=1e-6)
  state, _ = samplers.sample(affine_error_eps, VARS, compensation.compensate(sampler, p), x_T, key)
  e_hat, measured = state.error.e_hat, trace.e_next[-1]
  rel = float(jnp.linalg.norm(e_hat - measured) / jnp.linalg.norm(measured))
  corr = float(jnp.sum(e_hat * measured) / (jnp.linalg.norm(e_hat) * jnp.linalg.norm(measured)))
  assert rel < 0.4 and corr > 0.9
  # Without compensation (zero correction) the estimate carries no error at all.
  z = compensation.zero_params(10, C, sampler.coeffs.t, phi)
  state0, _ = samplers.sample(affine_error_eps, VARS, compensation.compensate(sampler, z), x_T, key)
  np.testing.assert_array_equal(state0.error.e_hat, 0.0)
