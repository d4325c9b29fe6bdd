"""Error propagation, closed form, TCEC calibration and the compensator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tac_jax import errors, quant
from tac_jax.diffusion import samplers, schedules
from tac_jax.compensation import propagation

SCHED = schedules.make_schedule("linear", 1000)
C = 3


def linear_eps(variables, x, t):
  """A toy 'network' with diagonal Jacobian: eps = g(t) w_c x."""
  g = 0.5 + 0.4 * jnp.cos(t.astype(jnp.float32) / 1000.0)
  return g.reshape((-1,) + (1,) * (x.ndim - 1)) * variables["w"] * x


def affine_error_eps(variables, x, t):
  """Its 'quantized' version: an error exactly affine per channel in the output."""
  tt = t.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1)) / 1000.0
  k = variables["k"] * (1.0 + tt)
  beta = variables["beta"] * (1.0 - 0.5 * tt)
  return (1.0 + k) * linear_eps(variables, x, t) + beta


def quantized_output_eps(variables, x, t):
  """A non-affine error: 3-bit fake quantization of a nonlinear float network."""
  y = jnp.tanh(linear_eps(variables, x, t) * 1.5)
  qp = quant.params_from_range(-1.0, 1.0, 3, symmetric=False)
  return quant.fake_quant(y, qp)


def nonlinear_eps(variables, x, t):
  return jnp.tanh(linear_eps(variables, x, t) * 1.5)


VARS = {"w": jnp.array([0.9, 1.1, 1.3]), "k": jnp.array([0.05, -0.08, 0.12]),
        "beta": jnp.array([0.02, -0.05, 0.03])}


def _noise(seed, n=16, hw=4):
  return jax.random.normal(jax.random.key(seed), (n, hw, hw, C))


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
  trace = jax.jit(lambda x: propagation.joint_run(linear_eps, VARS, affine_error_eps, VARS,
                                                  sampler, x, jax.random.key(1)))(_noise(0))
  c = sampler.coeffs
  np.testing.assert_array_equal(trace.e[0], 0.0)
  np.testing.assert_allclose(trace.e_next[-1], trace.x_q_final - trace.x_fp_final, atol=1e-6)
  phi = propagation.fit_channel_gains(trace, c.a, c.b)
  rep = propagation.propagation_report(trace, c.a, c.b, phi)
  assert np.all(rep["one_step_jvp_rel_err"] < 1e-3)  # first order is exact for a linear eps
  assert np.all(rep["closed_form_rel_err"][1:] < 1e-3)
  assert np.all(rep["closed_form_corr"][1:] > 0.999)
  assert rep["measured_rms"][-1] > 1e-2  # there is error to explain


@pytest.mark.parametrize("sampler_name,clip", [("ddim", False), ("ddpm", False), ("ddim", True)])
def test_tcec_removes_channelwise_affine_error(sampler_name, clip):
  """Also with clip_sample, where the step is not affine: once the corrected output equals
  the float one, the clipped trajectories coincide too."""
  sampler = samplers.make_sampler(sampler_name, SCHED, 10, clip_sample=clip)
  params = jax.jit(lambda x: errors.calibrate(linear_eps, VARS, affine_error_eps, VARS, sampler, x,
                                              jax.random.key(1), "tcec"))(_noise(0))
  x_new, key = _noise(7), jax.random.key(9)
  run = lambda s: samplers.sample(affine_error_eps, VARS, s, x_new, key)[0].x
  x_fp = samplers.sample(linear_eps, VARS, sampler, x_new, key)[0].x
  err_plain = float(jnp.sqrt(jnp.mean((run(errors.compensate(sampler, None)) - x_fp) ** 2)))
  err_tcec = float(jnp.sqrt(jnp.mean((run(errors.compensate(sampler, params)) - x_fp) ** 2)))
  assert err_plain > 1e-2
  assert err_tcec < 1e-4 * max(1.0, float(jnp.sqrt(jnp.mean(x_fp ** 2))))
  if clip:   # the clip was active on this toy
    unclipped = samplers.make_sampler(sampler_name, SCHED, 10)
    assert float(jnp.max(jnp.abs(samplers.sample(linear_eps, VARS, unclipped, x_new, key)[0].x
                                 - x_fp))) > 1e-3


def _python_loop_calibration(sampler, x_T, key, fit):
  """The same fits as `calibrate`, written as a plain loop over steps."""
  c = sampler.coeffs
  s_fp, s_c = sampler.init(x_T, key), sampler.init(x_T, key)
  Ks, betas = [], []
  for i in range(c.num_steps):
    t = jnp.full((x_T.shape[0],), c.t[i])
    eps_q = quantized_output_eps(VARS, s_c.x, t)
    eps = nonlinear_eps(VARS, s_fp.x, t)
    target = eps_q - eps + (c.a[i] / c.b[i]) * (s_c.x - s_fp.x)
    x = np.asarray(eps_q).reshape(-1, C).astype(np.float64)
    y = np.asarray(target).reshape(-1, C).astype(np.float64)
    k = np.array([np.polyfit(x[:, j], y[:, j], 1)[0] for j in range(C)])
    beta = y.mean(0) - k * x.mean(0)
    Ks.append(k)
    betas.append(beta)
    s_c = sampler.step(s_c, eps_q - (k * eps_q + beta).astype(np.float32), i)
    s_fp = sampler.step(s_fp, eps, i)
  return np.stack(Ks), np.stack(betas)


def test_calibration_scan_equals_python_loop():
  sampler = samplers.ddim(SCHED, 6)
  x_T, key = _noise(3, n=32), jax.random.key(4)
  params = jax.jit(lambda x: errors.calibrate(nonlinear_eps, VARS, quantized_output_eps, VARS,
                                              sampler, x, key, "tcec"))(x_T)
  K, beta = _python_loop_calibration(sampler, x_T, key, "tcec")
  np.testing.assert_allclose(params.K, K, rtol=2e-3, atol=2e-3)
  np.testing.assert_allclose(params.beta, beta, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("sampler_name", ["ddim", "ddpm"])
def test_none_compensator_is_bitwise_identity(sampler_name):
  sampler = samplers.make_sampler(sampler_name, SCHED, 8)
  x_T, key = _noise(5), jax.random.key(6)
  plain = jax.jit(lambda x: samplers.sample(quantized_output_eps, VARS, sampler, x, key)[0].x)(x_T)
  wrapped = jax.jit(lambda x: samplers.sample(quantized_output_eps, VARS,
                                              errors.compensate(sampler, None), x, key)[0].x)(x_T)
  np.testing.assert_array_equal(plain, wrapped)


def test_variants_share_one_code_path_and_order():
  """All variants fit on the same data; on a non-affine error TCEC ends closest to float."""
  sampler = samplers.ddim(SCHED, 10)
  x_cal, x_new, key = _noise(0, n=64), _noise(1, n=64), jax.random.key(2)
  x_fp = samplers.sample(nonlinear_eps, VARS, sampler, x_new, key)[0].x
  errs = {}
  for v in errors.METHODS:
    if v == errors.SAFE_METHOD:
      continue
    p = errors.calibrate(nonlinear_eps, VARS, quantized_output_eps, VARS, sampler, x_cal, key, v,
                         schedule=SCHED)
    x = samplers.sample(quantized_output_eps, VARS,
                        errors.compensate(sampler, None if v == "none" else p), x_new, key)[0].x
    errs[v] = float(jnp.sqrt(jnp.mean((x - x_fp) ** 2)))
  assert errs["tcec"] < errs["per_step"] <= errs["none"] * 1.01
  assert errs["tcec"] < errs["ptqd"]


def test_error_state_tracks_plain_ptq_error_on_linear_model():
  """e_hat (fitted phi, d_hat along the compensated path) estimates the plain-PTQ error.

  It is an estimate, not an identity: d_hat is evaluated on the compensated trajectory,
  which stays near the float one, while plain PTQ drifts. On this toy it is within ~32 %.
  """
  sampler = samplers.ddim(SCHED, 10)
  x_T, key = _noise(0), jax.random.key(1)
  trace = propagation.joint_run(linear_eps, VARS, affine_error_eps, VARS, sampler, x_T, key)
  phi = propagation.fit_channel_gains(trace, sampler.coeffs.a, sampler.coeffs.b)
  p = errors.calibrate(linear_eps, VARS, affine_error_eps, VARS, sampler, x_T, key, "tcec", phi=phi)
  state, _ = samplers.sample(affine_error_eps, VARS, errors.compensate(sampler, p), x_T, key)
  e_hat, measured = state.error.e_hat, trace.e_next[-1]
  rel = float(jnp.linalg.norm(e_hat - measured) / jnp.linalg.norm(measured))
  corr = float(jnp.sum(e_hat * measured) / (jnp.linalg.norm(e_hat) * jnp.linalg.norm(measured)))
  assert rel < 0.4 and corr > 0.9
  # Without compensation (zero correction) the estimate carries no error at all.
  z = errors.zero_params(10, C, sampler.coeffs.t, phi)
  state0, _ = samplers.sample(affine_error_eps, VARS, errors.compensate(sampler, z), x_T, key)
  np.testing.assert_array_equal(state0.error.e_hat, 0.0)


def test_params_save_load_and_validation(tmp_path):
  sampler = samplers.ddim(SCHED, 6)
  p = errors.calibrate(nonlinear_eps, VARS, quantized_output_eps, VARS, sampler, _noise(0), jax.random.key(1))
  errors.save_params(str(tmp_path / "t"), p)
  q = errors.load_params(str(tmp_path / "t"), sampler, channels=C)
  jax.tree.map(np.testing.assert_array_equal, p, q)
  with pytest.raises(ValueError, match="fitted for 6 sampler steps but the sampler runs 8"):
    errors.compensate(samplers.ddim(SCHED, 8), q)
  with pytest.raises(ValueError, match="3 channels but the samples have 4"):
    errors.compensate(sampler, q).init(jnp.zeros((2, 4, 4, 4)), jax.random.key(0))
  with pytest.raises(ValueError, match="different timesteps"):
    errors.compensate(samplers.ddim(SCHED, 6, spacing="quadratic"), q)
  with pytest.raises(FileNotFoundError, match="no correction params"):
    errors.load_params(str(tmp_path / "missing"))


def test_bad_calibration_inputs():
  sampler = samplers.ddim(SCHED, 4)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="at least one sample"):
    errors.calibrate(linear_eps, VARS, affine_error_eps, VARS, sampler, jnp.zeros((0, 4, 4, C)), key)
  with pytest.raises(ValueError, match="NaN/inf"):
    errors.calibrate(linear_eps, VARS, affine_error_eps, VARS, sampler,
                     _noise(0).at[0, 0, 0, 0].set(jnp.nan), key)
  nan_eps = lambda v, x, t: affine_error_eps(v, x, t) * jnp.nan
  with pytest.raises(ValueError, match="calibration trajectories contain NaN/inf"):
    errors.calibrate(linear_eps, VARS, nan_eps, VARS, sampler, _noise(0), key)
  bad = errors.zero_params(4, C, sampler.coeffs.t)
  with pytest.raises(ValueError, match=r"correction params \(calibration\) hold NaN/inf"):
    errors.compensation.check_params_finite(bad.replace(beta=bad.beta.at[1, 0].set(jnp.inf)))
  with pytest.raises(ValueError, match="unknown compensation method"):
    errors.calibrate(linear_eps, VARS, affine_error_eps, VARS, sampler, _noise(0), key, "magic")
