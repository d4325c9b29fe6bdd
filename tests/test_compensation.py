"""Compensation (tac_jax.compensation): TCEC calibration and the compensator, the method
registry and `calibrate` by name, PTQD and the e_hat regressor on toys where their
assumptions hold exactly, saving / loading and re-using fitted params at another step
count. (The error model and its closed form: tests/test_propagation.py; the Frechet
distance: tests/test_frechet.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tac_jax import compensation, quant
from tac_jax.compensation import FitConfig, Net, params as params_lib
from tac_jax.compensation.lstsq import solve_with_regressor
from tac_jax.diffusion import samplers, schedules

from toys import AFFINE_Q, C, LINEAR, VARS, affine_error_eps, gaussian_eps, linear_eps, noise

SCHED = schedules.make_schedule("linear", 1000)


# ----------------------------------------------------------------------------- toy networks

def quantized_output_eps(variables, x, t):
  """A non-affine error: 3-bit fake quantization of a nonlinear float network."""
  y = jnp.tanh(linear_eps(variables, x, t) * 1.5)
  qp = quant.params_from_range(-1.0, 1.0, 3, symmetric=False)
  return quant.fake_quant(y, qp)


def nonlinear_eps(variables, x, t):
  return jnp.tanh(linear_eps(variables, x, t) * 1.5)


NONLINEAR, QUANTIZED = Net(nonlinear_eps, VARS), Net(quantized_output_eps, VARS)

_noise = noise


def _calibrate(fp, q, sampler, x_T, key, method, **kw):
  return compensation.calibrate(fp, q, sampler, x_T, key, method, **kw).params


# ----------------------------------------------------------------------------- tcec

@pytest.mark.parametrize("sampler_name,clip", [("ddim", False), ("ddpm", False), ("ddim", True)])
def test_tcec_removes_channelwise_affine_error(sampler_name, clip):
  """Also with clip_sample, where the step is not affine: once the corrected output equals
  the float one, the clipped trajectories coincide too."""
  sampler = samplers.make_sampler(sampler_name, SCHED, 10, clip_sample=clip)
  params = _calibrate(LINEAR, AFFINE_Q, sampler, _noise(0), jax.random.key(1), "tcec")
  x_new, key = _noise(7), jax.random.key(9)
  run = lambda s: samplers.sample(affine_error_eps, VARS, s, x_new, key)[0].x
  x_fp = samplers.sample(linear_eps, VARS, sampler, x_new, key)[0].x
  err_plain = float(jnp.sqrt(jnp.mean((run(compensation.compensate(sampler, None)) - x_fp) ** 2)))
  err_tcec = float(jnp.sqrt(jnp.mean((run(compensation.compensate(sampler, params)) - x_fp) ** 2)))
  assert err_plain > 1e-2
  assert err_tcec < 1e-4 * max(1.0, float(jnp.sqrt(jnp.mean(x_fp ** 2))))
  if clip:   # the clip was active on this toy
    unclipped = samplers.make_sampler(sampler_name, SCHED, 10)
    assert float(jnp.max(jnp.abs(samplers.sample(linear_eps, VARS, unclipped, x_new, key)[0].x
                                 - x_fp))) > 1e-3


def _python_loop_calibration(sampler, x_T, key):
  """The same fits as tcec's calibration scan, written as a plain loop over steps."""
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
  """`compensation.fit` (the pure scan, jitted here) equals a plain loop, and `calibrate`
  (the front door) returns the same params."""
  sampler = samplers.ddim(SCHED, 6)
  x_T, key = _noise(3, n=32), jax.random.key(4)
  params = jax.jit(lambda fp, q, x: compensation.fit(fp, q, sampler, x, key, "tcec"))(
      NONLINEAR, QUANTIZED, x_T)
  K, beta = _python_loop_calibration(sampler, x_T, key)
  np.testing.assert_allclose(params.K, K, rtol=2e-3, atol=2e-3)
  np.testing.assert_allclose(params.beta, beta, rtol=2e-3, atol=2e-3)
  cal = compensation.calibrate(NONLINEAR, QUANTIZED, sampler, x_T, key, "tcec")
  assert cal.method == "tcec" and cal.report is None and cal.seconds > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               cal.params, params)


@pytest.mark.parametrize("sampler_name", ["ddim", "ddpm"])
def test_none_compensator_is_bitwise_identity(sampler_name):
  sampler = samplers.make_sampler(sampler_name, SCHED, 8)
  x_T, key = _noise(5), jax.random.key(6)
  plain = jax.jit(lambda x: samplers.sample(quantized_output_eps, VARS, sampler, x, key)[0].x)(x_T)
  wrapped = jax.jit(lambda x: samplers.sample(quantized_output_eps, VARS,
                                              compensation.compensate(sampler, None), x, key)[0].x)(x_T)
  np.testing.assert_array_equal(plain, wrapped)


def test_every_method_runs_through_calibrate_and_tcec_ends_closest():
  """Every registered method (but the validated default, tests/test_reference.py) fits on
  the same data through `calibrate` and samples through its `online_sampler`; on a
  non-affine error TCEC ends closest to float."""
  sampler = samplers.ddim(SCHED, 10)
  x_cal, x_new, key = _noise(0, n=64), _noise(1, n=64), jax.random.key(2)
  x_fp = samplers.sample(nonlinear_eps, VARS, sampler, x_new, key)[0].x
  errs = {}
  for v in compensation.names():
    if v == compensation.DEFAULT_METHOD:
      continue
    cal = compensation.calibrate(NONLINEAR, QUANTIZED, sampler, x_cal, key, v)
    assert cal.method == v
    online = compensation.online_sampler(v, sampler, cal.params, QUANTIZED)
    x = samplers.sample(quantized_output_eps, VARS, online, x_new, key)[0].x
    assert bool(jnp.all(jnp.isfinite(x))), v
    errs[v] = float(jnp.sqrt(jnp.mean((x - x_fp) ** 2)))
  assert {"none", "per_step", "tcec", "tcec_vp", "tcec_ehat", "ptqd", "tac", "stepbaq",
          "paper_m1", "qncd"} <= set(errs)
  assert errs["tcec"] < errs["per_step"] <= errs["none"] * 1.01
  assert errs["tcec"] < errs["ptqd"]


def test_params_save_load_and_validation(tmp_path):
  sampler = samplers.ddim(SCHED, 6)
  p = _calibrate(NONLINEAR, QUANTIZED, sampler, _noise(0), jax.random.key(1), "tcec")
  compensation.save_params(str(tmp_path / "t"), p)
  q = compensation.load_params(str(tmp_path / "t"), sampler, channels=C)
  jax.tree.map(np.testing.assert_array_equal, p, q)
  with pytest.raises(ValueError, match="fitted for 6 sampler steps but the sampler runs 8"):
    compensation.compensate(samplers.ddim(SCHED, 8), q)
  with pytest.raises(ValueError, match="3 channels but the samples have 4"):
    compensation.compensate(sampler, q).init(jnp.zeros((2, 4, 4, 4)), jax.random.key(0))
  with pytest.raises(ValueError, match="different timesteps"):
    compensation.compensate(samplers.ddim(SCHED, 6, spacing="quadratic"), q)
  with pytest.raises(FileNotFoundError, match="no correction params"):
    compensation.load_params(str(tmp_path / "missing"))


def test_bad_calibration_inputs():
  sampler = samplers.ddim(SCHED, 4)
  key = jax.random.key(0)
  for method in ("tcec", compensation.DEFAULT_METHOD):
    with pytest.raises(ValueError, match="at least one sample"):
      compensation.calibrate(LINEAR, AFFINE_Q, sampler, jnp.zeros((0, 4, 4, C)), key, method)
    with pytest.raises(ValueError, match="NaN/inf"):
      compensation.calibrate(LINEAR, AFFINE_Q, sampler, _noise(0).at[0, 0, 0, 0].set(jnp.nan),
                             key, method)
  nan_q = Net(lambda v, x, t: affine_error_eps(v, x, t) * jnp.nan, VARS)
  with pytest.raises(ValueError, match="tcec calibration: trajectories contain NaN/inf"):
    compensation.calibrate(LINEAR, nan_q, sampler, _noise(0), key, "tcec")
  bad = compensation.zero_params(4, C, sampler.coeffs.t)
  with pytest.raises(ValueError, match=r"correction params \(calibration\) hold NaN/inf"):
    compensation.check_params_finite(bad.replace(beta=bad.beta.at[1, 0].set(jnp.inf)))
  with pytest.raises(ValueError, match="unknown compensation method 'magic'"):
    compensation.calibrate(LINEAR, AFFINE_Q, sampler, _noise(0), key, "magic")
  with pytest.raises(TypeError, match="takes options of type FitConfig, got TACOptions"):
    compensation.calibrate(LINEAR, AFFINE_Q, sampler, _noise(0), key, "tcec",
                           compensation.TACOptions())
  with pytest.raises(ValueError, match="not under jit"):
    compensation.fit(LINEAR, AFFINE_Q, sampler, _noise(0), key, compensation.DEFAULT_METHOD)


# ----------------------------------------------------------------------------- registry

def test_options_select_a_fit_config():
  """A FitConfig given to "tcec" is that fit: the per_step preset's config gives per_step's
  params exactly (target and the non-sequential scan both follow the options)."""
  sampler = samplers.ddim(SCHED, 5)
  x_T, key = _noise(2), jax.random.key(3)
  per_step = _calibrate(NONLINEAR, QUANTIZED, sampler, x_T, key, "per_step")
  as_tcec = _calibrate(NONLINEAR, QUANTIZED, sampler, x_T, key, "tcec",
                       options=FitConfig(target="same_input", sequential=False))
  jax.tree.map(np.testing.assert_array_equal, as_tcec, per_step)
  tcec = _calibrate(NONLINEAR, QUANTIZED, sampler, x_T, key, "tcec")
  assert float(jnp.max(jnp.abs(tcec.K - per_step.K))) > 1e-3
  no_beta = _calibrate(NONLINEAR, QUANTIZED, sampler, x_T, key, "tcec",
                       options=FitConfig(intercept=False))
  np.testing.assert_array_equal(no_beta.beta, 0.0)
  assert float(jnp.max(jnp.abs(tcec.beta))) > 1e-4


def test_registered_method_goes_through_calibrate_and_its_online_sampler():
  """A method registered from outside the library (a per-step fit: K = 1/2, no beta) is
  calibrated by name like the built-in ones and applied by `online_sampler`."""
  def half_fit(ctx):
    def fit_step(s):
      eps_q = ctx.q(s.x_c, s.t)
      return params_lib.step_params(0.5, eps_q.shape[-1]), eps_q, s.aux
    return fit_step

  sampler = samplers.ddim(SCHED, 5)
  x_T, key = _noise(0), jax.random.key(1)
  assert compensation.names()[0] == "none" and compensation.DEFAULT_METHOD == "tcec_safe"
  m = compensation.register(compensation.Method("toy_half", "K = 1/2", fit=half_fit))
  try:
    assert compensation.get("toy_half") is m and "toy_half" in compensation.names()
    with pytest.raises(ValueError, match="already registered"):
      compensation.register(compensation.Method("toy_half", "again", fit=half_fit))
    cal = compensation.calibrate(LINEAR, QUANTIZED, sampler, x_T, key, "toy_half")
    assert cal.method == "toy_half" and cal.report is None
    np.testing.assert_array_equal(cal.params.K, 0.5)
    np.testing.assert_array_equal(cal.params.beta, 0.0)
    np.testing.assert_array_equal(cal.params.timesteps, sampler.coeffs.t)
    np.testing.assert_allclose(cal.params.phi, compensation.default_phi(sampler.coeffs, C))
    step2 = params_lib.at_step(cal.params, 2)
    assert step2.K.shape == (C,) and int(step2.timesteps) == int(sampler.coeffs.t[2])
    online = compensation.online_sampler("toy_half", sampler, cal.params, QUANTIZED)
    got = samplers.sample(quantized_output_eps, VARS, online, x_T, key)[0].x
    half = lambda v, x, t: 0.5 * quantized_output_eps(v, x, t)
    np.testing.assert_allclose(got, samplers.sample(half, VARS, sampler, x_T, key)[0].x,
                               rtol=1e-5, atol=1e-5)
  finally:
    compensation.unregister("toy_half")
  assert "toy_half" not in compensation.names()
  with pytest.raises(ValueError, match="unknown compensation method 'toy_half'"):
    compensation.get("toy_half")
  # fit and run together (tac's option search): calibrate calls run, a scan uses fit
  both = compensation.register(compensation.Method(
      "toy_both", "", fit=half_fit, run=lambda ctx, x, k, phi: (compensation.zero_params(
          sampler.coeffs.num_steps, C, sampler.coeffs.t, phi), None)))
  try:
    np.testing.assert_array_equal(
        compensation.calibrate(LINEAR, QUANTIZED, sampler, x_T, key, "toy_both").params.K, 0.0)
    np.testing.assert_array_equal(
        compensation.fit(LINEAR, QUANTIZED, sampler, x_T, key, both.name).K, 0.5)
  finally:
    compensation.unregister("toy_both")
  with pytest.raises(ValueError, match="letters, digits and underscores"):
    compensation.Method("bad-name", "", fit=half_fit)


def test_net_is_a_pytree_of_its_variables():
  net = Net(linear_eps, VARS)
  assert jax.tree.leaves(net) == jax.tree.leaves(VARS)
  x, t = _noise(0, n=2), jnp.array([10, 900])
  np.testing.assert_array_equal(net(x, t), linear_eps(VARS, x, t))
  doubled = jax.tree.map(lambda a: 2 * a, net)
  assert doubled.apply is linear_eps
  np.testing.assert_array_equal(doubled.variables["w"], 2 * VARS["w"])


# ----------------------------------------------------------------------------- PTQD, e_hat

NOISE_KEY = jax.random.key(123)
def noisy_eps(scale):
  """A 'quantized' network whose error is fresh Gaussian noise at every call (independent
  across steps, pixels and samples), plus an output gain for PTQD's correlated part."""
  def eps_q(v, x, t):
    z = jax.random.normal(jax.random.fold_in(NOISE_KEY, t[0]), x.shape)
    return v["gain"] * gaussian_eps(v, x, t) + scale * z
  return eps_q


def _run(apply_fn, v, sampler, x, key, params=None):
  return jax.jit(lambda x: samplers.sample(apply_fn, v, compensation.compensate(sampler, params),
                                           x, key)[0].x)(x)


def _x(seed, n):
  return jax.random.normal(jax.random.key(seed), (n, 4, 4, 3))


def test_e_hat_regression_recovers_exact_coefficients():
  k1, k2 = jax.random.split(jax.random.key(0))
  eps_q = jax.random.normal(k1, (64, 4, 4, 3))
  e_hat = jax.random.normal(k2, (64, 4, 4, 3))
  K, G, beta = jnp.array([2.0, -1.0, 0.5]), jnp.array([-0.5, 0.25, 1.5]), jnp.array([0.3, 0, -0.2])
  target = K * eps_q + G * e_hat + beta
  k, b, g = solve_with_regressor(eps_q, e_hat, target, 0.0)
  np.testing.assert_allclose(k, K, atol=1e-4)
  np.testing.assert_allclose(g, G, atol=1e-4)
  np.testing.assert_allclose(b, beta, atol=1e-4)
  # Step 0 has e_hat = 0 exactly: the solve stays finite and G there is 0.
  k0, b0, g0 = solve_with_regressor(eps_q, 0 * e_hat, K * eps_q + beta, 0.0)
  np.testing.assert_allclose(k0, K, atol=1e-4)
  np.testing.assert_allclose(b0, beta, atol=1e-4)
  np.testing.assert_allclose(g0, 0.0, atol=1e-6)


def test_tcec_ehat_variant_fits_and_round_trips(tmp_path):
  sampler = samplers.ddim(SCHED, 8)
  v = {"gain": 1.1}
  fq = noisy_eps(0.05)
  p = _calibrate(Net(gaussian_eps, v), Net(fq, v), sampler, _x(0, 64), jax.random.key(1),
                 "tcec_ehat")
  assert p.G.shape == p.K.shape and float(jnp.abs(p.G).max()) > 0
  compensation.save_params(str(tmp_path / "p"), p)
  q = compensation.load_params(str(tmp_path / "p"), sampler, channels=3)
  jax.tree.map(np.testing.assert_array_equal, p, q)
  x = _run(fq, v, sampler, _x(1, 8), jax.random.key(1), q)
  assert bool(jnp.all(jnp.isfinite(x)))


# ----------------------------------------------------------------------------- other step counts

def test_resample_params_interpolates_in_t():
  src = samplers.ddim(SCHED, 10)
  t = src.coeffs.t.astype(jnp.float32)
  p = compensation.CorrectionParams(K=jnp.stack([t / 1000, -t / 500, t * 0], 1),
                                    beta=jnp.ones((10, 3)), phi=jnp.ones((10, 3)),
                                    timesteps=src.coeffs.t, noise_var=t / 100)
  same = compensation.resample_params(p, src)
  np.testing.assert_allclose(same.K, p.K, atol=1e-6)
  dst = samplers.ddim(SCHED, 25)
  q = compensation.resample_params(p, dst)
  t2 = dst.coeffs.t.astype(jnp.float32)
  np.testing.assert_allclose(q.K[:, 0], t2 / 1000, atol=1e-5)   # linear in t: exact
  np.testing.assert_allclose(q.noise_var, t2 / 100, atol=1e-4)
  np.testing.assert_allclose(q.phi[:, 0], dst.coeffs.a, atol=1e-7)
  compensation.compensate(dst, q)  # valid for the new sampler
  with pytest.raises(ValueError, match="calibrate this method for the new sampler"):
    compensation.resample_params(p.replace(K_prev=p.K), dst)
