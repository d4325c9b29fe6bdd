"""The error model of multistep samplers (DPM-Solver++ 2M, flow Heun): the two-term
recurrence, its closed form, the fitted gains, and the least-squares compensators on them
(issue 25, item 4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tac_jax import compensation
from tac_jax.compensation import propagation
from tac_jax.diffusion import flow, multistep, samplers
from toys import AFFINE_Q, C, LINEAR, SCHED, VARS, affine_error_eps, linear_eps, noise

DPM = multistep.dpm_solver_2m(SCHED, 10)


def wobbly_q(variables, x, t):
  """AFFINE_Q plus an error that is not affine in x and changes with t: the cumulative
  errors of successive steps point in different directions (the two gains are
  identifiable), while the float network stays linear (the first-order model is exact)."""
  tt = samplers.batch_timestep(t, x).astype(jnp.float32).reshape((-1, 1, 1, 1))
  return affine_error_eps(variables, x, t) + 0.05 * jnp.sin(3.0 * x + tt / 97.0)


WOBBLY = compensation.Net(wobbly_q, VARS)


def test_two_term_closed_form_equals_the_recurrence_on_dpm_solver():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  c = DPM.coeffs
  n = c.num_steps
  assert float(jnp.max(jnp.abs(c.c))) > 0 and float(jnp.max(jnp.abs(c.d))) > 0
  phi = c.a[:, None] + 0.1 * jax.random.normal(k1, (n, C))
  psi = c.d[:, None] + 0.1 * jax.random.normal(k2, (n, C))
  d = jax.random.normal(k3, (n, 3, 4, 4, C))
  u = propagation.step_inputs(c.b, c.c, d)
  ref = propagation.cumulative_error_recurrence2(phi, psi, u)
  np.testing.assert_allclose(jax.jit(propagation.cumulative_error_solve2)(phi, psi, u), ref,
                             rtol=1e-4, atol=1e-5)
  # the companion form by hand: [e_{i+1}, e_i] = [[phi, psi], [1, 0]] [e_i, e_{i-1}] + [u_i, 0]
  e, e_prev = jnp.zeros_like(u[0]), jnp.zeros_like(u[0])
  for i in range(n):
    e, e_prev = phi[i] * e + psi[i] * e_prev + u[i], e
  np.testing.assert_allclose(ref[-1], e, rtol=1e-4, atol=1e-5)
  # with psi = 0 and c = 0 it is the one-step closed form
  np.testing.assert_allclose(
      propagation.cumulative_error_solve2(phi, jnp.zeros_like(psi), c.b[:, None, None, None, None] * d),
      propagation.cumulative_error_solve(phi, c.b, d), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sampler", [DPM, flow.flow_heun(6)], ids=["dpm_solver_2m", "flow_heun"])
def test_linear_model_two_term_propagation_is_exact(sampler):
  """A network with a diagonal Jacobian g(t) w: the first-order model is exact, the fitted
  (phi, psi) are a + b J_i and d + c J_{i-1}, and the closed form reproduces the measured
  cumulative error."""
  trace = jax.jit(lambda x: propagation.joint_run(LINEAR, WOBBLY, sampler, x,
                                                  jax.random.key(1)))(noise(0, 32))
  c = sampler.coeffs
  phi, psi = propagation.fit_channel_gains2(trace, c)
  rep = propagation.multistep_report_arrays(trace, c, phi, psi)
  assert float(jnp.max(rep["one_step_jvp_rel_err"][1:])) < 1e-3
  assert float(jnp.max(rep["closed_form_rel_err"][1:])) < 1e-2
  if sampler is DPM:   # integer timesteps: the Jacobian g(t) w is known in closed form
    g = 0.5 + 0.4 * jnp.cos(c.t.astype(jnp.float32) / 1000.0)
    jac = g[:, None] * VARS["w"][None]
    np.testing.assert_allclose(phi[2:], c.a[2:, None] + c.b[2:, None] * jac[2:], rtol=1e-3,
                               atol=1e-4)
    np.testing.assert_allclose(psi[2:], c.d[2:, None] + c.c[2:, None] * jac[1:-1], rtol=1e-2,
                               atol=1e-3)
  # J ~ 0 (phi = a, psi = d) is a worse model wherever the Jacobian term matters
  assert float(rep["closed_form_j0_rel_err"][-1]) > float(rep["closed_form_rel_err"][-1])


@pytest.mark.parametrize("method", ["tcec", "per_step", "tcec_safe"])
def test_least_squares_compensators_remove_an_affine_error_under_dpm_solver(method):
  x_T, key = noise(0, 16), jax.random.key(1)
  cal = compensation.calibrate(LINEAR, AFFINE_Q, DPM, x_T, key, method)
  x_new, key_new = noise(7), jax.random.key(9)
  x_fp = samplers.sample(linear_eps, VARS, DPM, x_new, key_new)[0].x
  run = lambda s: samplers.sample(affine_error_eps, VARS, s, x_new, key_new)[0].x
  rms = lambda x: float(jnp.sqrt(jnp.mean((x - x_fp) ** 2)))
  plain = rms(run(compensation.compensate(DPM, None)))
  fixed = rms(run(compensation.online_sampler(method, DPM, cal.params, AFFINE_Q)))
  # the error is affine in eps_q per channel, so removing it at every step (per_step) or
  # fitting the cumulative target through the two-term step (tcec) is exact
  assert plain > 1e-2 and fixed < 1e-3 * plain


def test_one_step_methods_refuse_multistep_samplers_by_name():
  for method in ("stepbaq", "qncd", "paper_m1", "tcec_ehat"):
    with pytest.raises(ValueError, match=f"{method} models each step as x_next = a x"):
      compensation.calibrate(LINEAR, AFFINE_Q, DPM, noise(0, 4), jax.random.key(1), method)
