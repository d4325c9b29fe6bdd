"""Baselines on toy models where each one's assumption holds exactly, the e_hat regressor,
re-using fitted params at another step count, and the Frechet distance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tac_jax import data, errors
from tac_jax.diffusion import samplers, schedules
from tac_jax.metrics import frechet

SCHED = schedules.make_schedule("linear", 1000)
NOISE_KEY = jax.random.key(123)


def _abar(t):
  return jnp.asarray(SCHED.alphas_cumprod, jnp.float32)[t].reshape((-1, 1, 1, 1))


SIGMA0 = 0.5  # data x0 ~ N(0, SIGMA0^2): the optimal eps predictor is linear and known


def gaussian_eps(v, x, t):
  """E[noise | x_t] for Gaussian data: sqrt(1 - abar) x / (abar s0^2 + 1 - abar)."""
  ab = _abar(t)
  return jnp.sqrt(1 - ab) * x / (ab * SIGMA0 ** 2 + 1 - ab)


def noisy_eps(scale):
  """A 'quantized' network whose error is fresh Gaussian noise at every call (independent
  across steps, pixels and samples), plus an output gain for PTQD's correlated part."""
  def eps_q(v, x, t):
    z = jax.random.normal(jax.random.fold_in(NOISE_KEY, t[0]), x.shape)
    return v["gain"] * gaussian_eps(v, x, t) + scale * z
  return eps_q


def _run(apply_fn, v, sampler, x, key, params=None):
  return jax.jit(lambda x: samplers.sample(apply_fn, v, errors.compensate(sampler, params), x,
                                           key)[0].x)(x)


def _x(seed, n):
  return jax.random.normal(jax.random.key(seed), (n, 4, 4, 3))


def test_ptqd_removes_gain_and_absorbs_noise_variance():
  sampler = samplers.ddpm(SCHED, 20)
  v = {"gain": 1.15}
  fq = noisy_eps(0.3)
  x_cal, x_new, key = _x(0, 256), _x(1, 512), jax.random.key(2)
  p = errors.calibrate(gaussian_eps, v, fq, v, sampler, x_cal, key, "ptqd")
  assert p.noise_var is not None and bool(jnp.all(p.noise_var > 0))
  x_fp = _run(gaussian_eps, v, sampler, x_new, key)
  x_none = _run(fq, v, sampler, x_new, key)
  x_ptqd = _run(fq, v, sampler, x_new, key, p)
  x_gain_only = _run(fq, v, sampler, x_new, key, p.replace(noise_var=None))
  var = lambda x: float(jnp.var(x))
  # The gain (correlated part) is removed: closer to float sample by sample.
  rms = lambda x: float(jnp.sqrt(jnp.mean((x - x_fp) ** 2)))
  assert rms(x_gain_only) < 0.8 * rms(x_none)
  # The uncorrelated part inflates the sample variance; absorbing it restores it.
  assert var(x_gain_only) > var(x_fp) * 1.05
  assert abs(var(x_ptqd) - var(x_fp)) < 0.3 * abs(var(x_gain_only) - var(x_fp))
  # On a deterministic sampler the variance term has nothing to act on.
  ddim = samplers.ddim(SCHED, 20)
  pd = errors.calibrate(gaussian_eps, v, fq, v, ddim, x_cal, key, "ptqd")
  np.testing.assert_array_equal(_run(fq, v, ddim, x_new, key, pd),
                                _run(fq, v, ddim, x_new, key, pd.replace(noise_var=None)))


def test_e_hat_regression_recovers_exact_coefficients():
  k1, k2 = jax.random.split(jax.random.key(0))
  eps_q = jax.random.normal(k1, (64, 4, 4, 3))
  e_hat = jax.random.normal(k2, (64, 4, 4, 3))
  K, G, beta = jnp.array([2.0, -1.0, 0.5]), jnp.array([-0.5, 0.25, 1.5]), jnp.array([0.3, 0, -0.2])
  target = K * eps_q + G * e_hat + beta
  k, b, g = errors.compensation._solve_with_e_hat(eps_q, e_hat, target, 0.0)
  np.testing.assert_allclose(k, K, atol=1e-4)
  np.testing.assert_allclose(g, G, atol=1e-4)
  np.testing.assert_allclose(b, beta, atol=1e-4)
  # Step 0 has e_hat = 0 exactly: the solve stays finite and G there is 0.
  k0, b0, g0 = errors.compensation._solve_with_e_hat(eps_q, 0 * e_hat, K * eps_q + beta, 0.0)
  np.testing.assert_allclose(k0, K, atol=1e-4)
  np.testing.assert_allclose(g0, 0.0, atol=1e-6)


def test_tcec_ehat_variant_fits_and_round_trips(tmp_path):
  sampler = samplers.ddim(SCHED, 8)
  v = {"gain": 1.1}
  fq = noisy_eps(0.05)
  p = errors.calibrate(gaussian_eps, v, fq, v, sampler, _x(0, 64), jax.random.key(1), "tcec_ehat")
  assert p.G.shape == p.K.shape and float(jnp.abs(p.G).max()) > 0
  errors.save_params(str(tmp_path / "p"), p)
  q = errors.load_params(str(tmp_path / "p"), sampler, channels=3)
  jax.tree.map(np.testing.assert_array_equal, p, q)
  x = _run(fq, v, sampler, _x(1, 8), jax.random.key(1), q)
  assert bool(jnp.all(jnp.isfinite(x)))


def test_resample_params_interpolates_in_t():
  src = samplers.ddim(SCHED, 10)
  t = src.coeffs.t.astype(jnp.float32)
  p = errors.TCECParams(K=jnp.stack([t / 1000, -t / 500, t * 0], 1), beta=jnp.ones((10, 3)),
                        phi=jnp.ones((10, 3)), timesteps=src.coeffs.t, noise_var=t / 100)
  same = errors.resample_params(p, src)
  np.testing.assert_allclose(same.K, p.K, atol=1e-6)
  dst = samplers.ddim(SCHED, 25)
  q = errors.resample_params(p, dst)
  t2 = dst.coeffs.t.astype(jnp.float32)
  np.testing.assert_allclose(q.K[:, 0], t2 / 1000, atol=1e-5)   # linear in t: exact
  np.testing.assert_allclose(q.noise_var, t2 / 100, atol=1e-4)
  np.testing.assert_allclose(q.phi[:, 0], dst.coeffs.a, atol=1e-7)
  errors.compensate(dst, q)  # valid for the new sampler


# ----------------------------------------------------------------------------- Frechet distance

def test_frechet_distance_is_zero_on_itself_and_grows_with_shift():
  f = np.random.RandomState(0).randn(2000, 8)
  assert frechet.frechet_distance(f, f) == pytest.approx(0.0, abs=1e-8)
  dists = [frechet.frechet_distance(f, f + s) for s in (0.1, 0.5, 1.0, 2.0)]
  assert all(a < b for a, b in zip(dists, dists[1:]))
  np.testing.assert_allclose(dists, [8 * s * s for s in (0.1, 0.5, 1.0, 2.0)], rtol=1e-6)


def test_frechet_distance_gaussian_closed_form():
  # N(0, I) vs N(0, 4 I) in d dims: tr(I + 4I - 2 * 2I) = d.
  d = 5
  assert frechet.frechet_distance_from_stats(np.zeros(d), np.eye(d), np.zeros(d),
                                             4 * np.eye(d)) == pytest.approx(d)
  with pytest.raises(ValueError, match="NaN/inf"):
    frechet.frechet_distance(np.full((4, 2), np.nan), np.zeros((4, 2)))


def test_shipped_classifier_features_separate_data_sets():
  fx = frechet.FeatureExtractor()
  assert fx.meta["heldout_accuracy"] > 0.9
  a, b = data.digits(16, True, seed=10), data.digits(16, True, seed=11)
  shapes = data.shapes(1797, 16, seed=0)
  same = frechet.frechet_distance(fx(a), fx(b))
  other = frechet.frechet_distance(fx(a), fx(shapes))
  noisy = frechet.frechet_distance(fx(a), fx(b + 0.3 * np.random.RandomState(0).randn(*b.shape)))
  assert same < 0.2 * noisy and noisy < other
  with pytest.raises(ValueError, match=r"\[B, H, W, 3 or 1\]"):
    fx(np.zeros((2, 8, 8, 2)))
  # Gray 28x28 digits (the second model's data) are resized and repeated over channels:
  # two random halves are closer to each other than to noisy copies or to shapes.
  g = data.digits(28, False)[np.random.RandomState(0).permutation(1797)]
  g1, g2 = fx(g[:850]), g[850:1700]
  assert g1.shape == (850, frechet.FEATURE_DIM)
  same = frechet.frechet_distance(g1, fx(g2))
  assert same < 0.5 * frechet.frechet_distance(g1, fx(g2 + np.random.RandomState(1).randn(*g2.shape)))
  assert same < 0.1 * frechet.frechet_distance(g1, fx(data.shapes(850, 28, 0)))
