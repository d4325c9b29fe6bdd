"""The field's compensators, each on a toy where its own assumption holds, and the safe
default (validated strength, fallback to no correction)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tac_jax import errors, metrics
from tac_jax.diffusion import samplers, schedules

SCHED = schedules.make_schedule("linear", 1000)
NOISE_KEY = jax.random.key(321)
GAIN = jnp.array([1.25, 0.8, 1.1])          # per-channel output gain of the 'quantized' net
SIGMA0 = 0.5


def _abar(t):
  return jnp.asarray(SCHED.alphas_cumprod, jnp.float32)[t].reshape((-1, 1, 1, 1))


def gaussian_eps(v, x, t):
  """The exact noise predictor for data x0 ~ N(0, SIGMA0^2)."""
  ab = _abar(t)
  return jnp.sqrt(1 - ab) * x / (ab * SIGMA0 ** 2 + 1 - ab)


def gain_eps(v, x, t):
  """Error exactly proportional to the output, per channel (NER's and paper_m1's model)."""
  return GAIN * gaussian_eps(v, x, t)


def offset_eps(v, x, t):
  """Error a constant per-channel offset: the trajectories drift apart in the mean (IBC)."""
  return gaussian_eps(v, x, t) + jnp.array([0.15, -0.1, 0.05])


def white_noise_eps(scale):
  """Error fresh white noise at every call: a noisier latent (StepbaQ's model); nothing
  about it is predictable from the output (the safe fit must not correct it)."""
  def eps_q(v, x, t):
    return gaussian_eps(v, x, t) + scale * jax.random.normal(jax.random.fold_in(NOISE_KEY, t[0]),
                                                             x.shape)
  return eps_q


def _x(seed, n):
  return jax.random.normal(jax.random.key(seed), (n, 4, 4, 3))


def _run(apply_fn, sampler, x, key, params=None):
  return jax.jit(lambda x: samplers.sample(apply_fn, {}, errors.compensate(sampler, params), x,
                                           key)[0].x)(x)


def _fit(method, fq, sampler, n=128, **ref):
  return errors.calibrate(gaussian_eps, {}, fq, {}, sampler, _x(0, n), jax.random.key(1), method,
                          schedule=SCHED, reference_config=errors.ReferenceConfig(**ref))


def _rms(x, ref):
  return float(jnp.sqrt(jnp.mean((x - ref) ** 2)))


def test_tac_ner_recovers_the_output_gain():
  sampler = samplers.ddim(SCHED, 10)
  # Unmasked (threshold 0), eps^ = K q with K = 1 / gain makes K q = r exactly (the pull
  # toward 1 is tiny next to the N-weighted relative term).
  p0 = _fit("tac", gain_eps, sampler, tac_threshold=0.0)
  np.testing.assert_allclose(1.0 - np.asarray(p0.K), np.broadcast_to(1 / GAIN, p0.K.shape), rtol=0.06)
  x_new, key = _x(5, 256), jax.random.key(6)
  x_fp = _run(gaussian_eps, sampler, x_new, key)
  plain = _rms(_run(gain_eps, sampler, x_new, key), x_fp)
  assert _rms(_run(gain_eps, sampler, x_new, key, p0), x_fp) < 0.05 * plain
  # With its default mask (|q| above its mean) the small outputs stay uncorrected.
  p = _fit("tac", gain_eps, sampler)
  q = gain_eps({}, x_new, jnp.full((x_new.shape[0],), 500))
  d_hat = errors.correction(errors.compensation.at_step(p, 4), q, 0 * q, 0 * q)
  below = jnp.abs(q) <= jnp.mean(jnp.abs(q), axis=(1, 2), keepdims=True)
  assert bool(jnp.all(jnp.where(below, d_hat, 0.0) == 0.0)) and bool(jnp.any(d_hat != 0.0))


def test_tac_input_bias_correction_removes_the_mean_drift():
  sampler = samplers.ddim(SCHED, 10)
  p = _fit("tac", offset_eps, sampler)
  np.testing.assert_allclose(np.asarray(p.x_shift[0]), 0.0, atol=1e-6)  # no gap at x_T
  assert float(jnp.max(jnp.abs(p.x_shift[1:]))) > 1e-3
  x_new, key = _x(5, 256), jax.random.key(6)
  x_fp = _run(gaussian_eps, sampler, x_new, key)
  mean_gap = lambda x: float(jnp.max(jnp.abs(jnp.mean(x - x_fp, axis=(0, 1, 2)))))
  assert mean_gap(_run(offset_eps, sampler, x_new, key, p)) < 0.7 * mean_gap(
      _run(offset_eps, sampler, x_new, key))


def one_shot_noise_eps(v, x, t):
  """Exact network, except white noise in the first steps' outputs: from then on the
  quantized latent is exactly a noisier latent of the same data (StepbaQ's model)."""
  z = jax.random.normal(jax.random.fold_in(NOISE_KEY, t[0]), x.shape)
  return gaussian_eps(v, x, t) + jnp.where(t[0] >= 900, 0.5, 0.0) * z


def test_stepbaq_treats_latent_noise_as_an_earlier_timestep():
  sampler = samplers.ddim(SCHED, 20)
  p = _fit("stepbaq", one_shot_noise_eps, sampler, n=256)
  t, tau = np.asarray(sampler.coeffs.t), np.asarray(p.t_in)
  shifted = tau > t
  assert np.all(tau >= t) and shifted[1:4].all()   # stepped back right after the noise
  np.testing.assert_allclose(np.asarray(p.in_scale)[~shifted], 1.0)
  assert np.all(np.asarray(p.in_scale)[shifted] < 1.0)   # sqrt(abar_tau / abar_t)
  # The noise inflates the final sample variance; denoising it as diffusion noise at the
  # shifted timestep restores float's.
  x_new, key = _x(5, 512), jax.random.key(6)
  var = lambda params=None, fn=one_shot_noise_eps: float(jnp.var(_run(fn, sampler, x_new, key, params)))
  var_fp, var_none, var_sb = var(fn=gaussian_eps), var(), var(p)
  assert var_none > 1.1 * var_fp
  assert abs(var_sb - var_fp) < 0.2 * abs(var_none - var_fp)


def test_stepbaq_needs_the_schedule():
  sampler = samplers.ddim(SCHED, 5)
  try:
    errors.calibrate(gaussian_eps, {}, gain_eps, {}, sampler, _x(0, 8), jax.random.key(1), "stepbaq")
  except ValueError as e:
    assert "schedule" in str(e)
  else:
    raise AssertionError("stepbaq without a schedule must raise")


def test_ptqd_gain_and_channel_mean_as_official_code():
  sampler = samplers.ddim(SCHED, 10)
  fq = lambda v, x, t: 1.2 * gaussian_eps(v, x, t) + jnp.array([0.1, -0.2, 0.0])
  p = _fit("ptqd", fq, sampler, n=256)
  # err = 0.2 r + mu: k = 0.2, mu_c = mean err = 0.2 E[r] + mu_c ~ mu_c; eps <- (q - mu)/(1 + k).
  # (At the last step, t = 0, r ~ 0 and the pooled slope is confounded by the offsets.)
  np.testing.assert_allclose(np.asarray(p.K[:-1]), 0.2 / 1.2, atol=5e-3)
  np.testing.assert_allclose(np.asarray(p.beta[:-1]), np.broadcast_to(
      np.array([0.1, -0.2, 0.0]) / 1.2, p.beta[:-1].shape), atol=0.02)


def test_paper_m1_uses_the_cached_previous_output():
  sampler = samplers.ddim(SCHED, 10)
  p = _fit("paper_m1", gain_eps, sampler)
  c = sampler.coeffs
  coef = np.concatenate([[0.0], np.asarray(c.a[1:] * c.b[:-1] / c.b[1:])])
  np.testing.assert_allclose(np.asarray(p.K_prev), np.asarray(p.K) * coef[:, None], rtol=1e-5,
                             atol=1e-7)
  np.testing.assert_allclose(np.asarray(p.K[0]), 1 - 1 / np.asarray(GAIN), rtol=1e-3)  # d = K q
  x_new, key = _x(5, 256), jax.random.key(6)
  x_fp = _run(gaussian_eps, sampler, x_new, key)
  assert _rms(_run(gain_eps, sampler, x_new, key, p), x_fp) < 0.2 * _rms(
      _run(gain_eps, sampler, x_new, key), x_fp)


def _safe(fq, sampler, n=128):
  return errors.calibrate_safe(gaussian_eps, {}, fq, {}, sampler, _x(0, n), jax.random.key(1),
                               errors.SafeConfig(base="tcec"))


def random_offset_eps(v, x, t):
  """Error pure noise across samples: a pseudo-random offset per sample, channel and step
  (a hash of the input), independent of everything the correction sees."""
  z = jnp.sin(1e3 * jnp.sum(x, axis=(1, 2), keepdims=True) + t[0])
  return gaussian_eps(v, x, t) + 0.3 * z


def test_safe_fit_takes_no_correction_on_pure_noise():
  """Per-sample noise: the full fit shrinks it (PSNR up, contrast down); the safe fit keeps
  the gain term (near) off and does not lose on seeds it never saw. (The noise is not
  exactly zero-mean along the trajectories, so a weak offset may still help a little.)"""
  sampler = samplers.ddim(SCHED, 10)
  p, rep = _safe(random_offset_eps, sampler)
  assert rep["fell_back"] or rep["gain"] <= 0.25
  assert len(rep["candidates"]) == 25 and rep["num_fit"] == 64 and rep["num_val"] == 64
  if rep["fell_back"]:
    assert float(jnp.max(jnp.abs(p.K))) == 0.0 and float(jnp.max(jnp.abs(p.beta))) == 0.0
  x, key = _x(7, 256), jax.random.key(9)
  ref = _run(gaussian_eps, sampler, x, key)
  psnr = lambda params: float(jnp.mean(metrics.psnr(_run(random_offset_eps, sampler, x, key, params), ref)))
  assert -0.2 < psnr(p) - psnr(None) < 1.0


def test_safe_fit_takes_the_full_correction_on_an_affine_error():
  sampler = samplers.ddim(SCHED, 10)
  fq = lambda v, x, t: GAIN * gaussian_eps(v, x, t) + jnp.array([0.1, -0.1, 0.05])
  p, rep = _safe(fq, sampler)
  assert not rep["fell_back"] and rep["gain"] == 1.0 and rep["offset"] == 1.0
  assert rep["val_psnr"] > rep["val_psnr_none"] + 10


def test_scaled_params_zero_is_identity_and_one_is_unchanged():
  sampler = samplers.ddim(SCHED, 6)
  p = _fit("tac", offset_eps, sampler)
  x, key = _x(3, 8), jax.random.key(4)
  np.testing.assert_array_equal(_run(offset_eps, sampler, x, key, errors.scale_params(p, 0.0, 0.0)),
                                _run(offset_eps, sampler, x, key))
  jax.tree.map(np.testing.assert_array_equal, errors.scale_params(p, 1.0, 1.0), p)


def _row(gain, offset, psnr, fd, deviation=0.0):
  return {"gain": gain, "offset": offset, "psnr": psnr, "fd_vs_float": fd, "deviation": deviation}


def test_fd_guard_rules_out_psnr_bought_with_a_worse_distribution():
  rows = [_row(0, 0, 10.0, 100.0), _row(1, 1, 16.0, 140.0), _row(0.5, 1, 13.0, 98.0),
          _row(1, 0.5, 14.0, 90.0, deviation=1.0)]   # best FD, but blurred
  chosen, fell_back = errors.choose_strength(rows, errors.SafeConfig())
  assert not fell_back and (chosen["gain"], chosen["offset"]) == (0.5, 1)
  assert [r["admissible"] for r in rows] == [True, False, True, False]
  # a looser FD tolerance admits the 16 dB strength, and so does switching the guard off;
  # a negative tolerance is a margin: FD must drop by that share (98 < 100 is not enough)
  assert errors.choose_strength(rows, errors.SafeConfig(fd_tol=0.5))[0]["psnr"] == 16.0
  assert errors.choose_strength(rows, errors.SafeConfig(fd_guard=False))[0]["psnr"] == 16.0
  assert errors.choose_strength(rows, errors.SafeConfig(fd_tol=-0.05))[0]["psnr"] == 10.0
  with pytest.raises(ValueError, match="fd_guard=False"):
    errors.SafeConfig(fd_tol=-1)
  # nothing admissible beats no correction: fall back
  chosen, fell_back = errors.choose_strength([_row(0, 0, 10.0, 100.0), _row(1, 1, 16.0, 101.0)],
                                             errors.SafeConfig())
  assert fell_back and chosen["gain"] == 0 and chosen["offset"] == 0


def test_fd_guard_needs_the_gain_in_most_bootstrap_resamples():
  # lower FD on the validation set as drawn, but in only 60 % of the paired resamples
  none = dict(_row(0, 0, 10.0, 100.0), fd_resampled=np.full(10, 100.0))
  lucky = dict(_row(1, 1, 14.0, 95.0), fd_resampled=np.array([90.0] * 6 + [110.0] * 4))
  sure = dict(_row(0.5, 0.5, 12.0, 97.0), fd_resampled=np.array([95.0] * 9 + [101.0]))
  chosen, _ = errors.choose_strength([none, lucky, sure], errors.SafeConfig())
  assert (chosen["gain"], chosen["offset"]) == (0.5, 0.5)      # 90 % >= fd_confidence 0.9
  assert [r["admissible"] for r in (none, lucky, sure)] == [True, False, True]
  chosen, _ = errors.choose_strength([none, lucky, sure], errors.SafeConfig(fd_confidence=0.5))
  assert chosen["psnr"] == 14.0
  # rows without resamples fall back to the point comparison
  chosen, _ = errors.choose_strength([_row(0, 0, 10.0, 100.0), _row(1, 1, 14.0, 95.0)],
                                     errors.SafeConfig())
  assert chosen["psnr"] == 14.0
  with pytest.raises(ValueError, match="fd_confidence"):
    errors.SafeConfig(fd_confidence=0.0)


def test_paired_bootstrap_distances():
  from tac_jax.metrics import frechet
  rng = np.random.default_rng(0)
  f = rng.normal(size=(40, 3))
  idx = frechet.bootstrap_indices(40, 50)
  assert idx.shape == (50, 40) and np.array_equal(idx, frechet.bootstrap_indices(40, 50))
  np.testing.assert_allclose(frechet.resampled_distances(f, f, idx), 0.0, atol=1e-9)
  near, far = (frechet.resampled_distances(f + s, f, idx) for s in (0.1, 1.0))
  assert np.all(far > near) and np.all(near > 0)
  np.testing.assert_allclose(far, 3.0, rtol=1e-6)     # a pure shift: ||mu gap||^2 = 3 x 1^2
  # the n x n (and, for n > D, QR) form equals the D x D square-root form on every resample
  for n, d in ((12, 64), (40, 3)):
    a, b = rng.normal(size=(n, d)), rng.normal(size=(n, d)) * 1.5 + 0.2
    idx = frechet.bootstrap_indices(n, 5, seed=1)
    np.testing.assert_allclose(frechet.resampled_distances(a, b, idx),
                               [frechet.frechet_distance(a[i], b[i]) for i in idx], rtol=1e-6)
  with pytest.raises(ValueError, match="one shape"):
    frechet.resampled_distances(f, f[:10], idx)


def test_safe_fit_reports_validation_fd_in_the_given_feature_space():
  sampler = samplers.ddim(SCHED, 10)
  fq = lambda v, x, t: GAIN * gaussian_eps(v, x, t) + jnp.array([0.1, -0.1, 0.05])
  calls = []

  def feats(x):
    calls.append(x.shape)
    return np.asarray(x).reshape(x.shape[0], -1)[:, :8].astype(np.float64)

  _, rep = errors.calibrate_safe(gaussian_eps, {}, fq, {}, sampler, _x(0, 64), jax.random.key(1),
                                 errors.SafeConfig(base="tcec"), features=feats)
  assert len(calls) == 26 and calls[0] == (32, 4, 4, 3)   # the float reference + 25 strengths
  assert rep["val_fd"] < 0.1 * rep["val_fd_none"]         # the exact fix restores the distribution
  assert all(np.isfinite(r["fd_vs_float"]) for r in rep["candidates"])
  assert rep["val_fd_share"] == 1.0                       # no worse in every paired resample
  assert all(r["fd_resampled"].shape == (200,) for r in rep["candidates"])


def test_coarse_features_shape_and_area_averaging():
  from tac_jax.metrics import frechet
  x = np.ones((2, 16, 16, 3), np.float32) * np.array([0.5, -1.0, 0.25], np.float32)
  f = frechet.coarse_features(x)
  assert f.shape == (2, 8 * 8 * 3)
  np.testing.assert_allclose(f.reshape(2, 8, 8, 3)[0, 3, 3], [0.5, -1.0, 0.25], rtol=1e-6)
  assert frechet.coarse_features(np.zeros((2, 4, 4, 1))).shape == (2, 16)   # smaller: unchanged


def affine_then_noise_eps(v, x, t):
  """An affine (correctable) error at the early steps, pure noise at the late ones."""
  z = jnp.sin(1e3 * jnp.sum(x, axis=(1, 2), keepdims=True) + t[0])
  base = gaussian_eps(v, x, t)
  return jnp.where(t[0] > 500, GAIN * base + jnp.array([0.1, -0.1, 0.05]), base + 0.3 * z)


def test_safe_fit_per_segment_corrects_where_the_error_is_correctable():
  sampler = samplers.ddim(SCHED, 10)
  run = lambda S: errors.calibrate_safe(gaussian_eps, {}, affine_then_noise_eps, {}, sampler,
                                        _x(0, 128), jax.random.key(1),
                                        errors.SafeConfig(base="tcec", segments=S))
  (_, one), (p, two) = run(1), run(2)
  assert not one["fell_back"] and not two["fell_back"] and len(two["candidates"]) > 25
  # early segment: the full fit; late segment (noise): a weaker one, and a better validation
  gains, offsets = (errors.methods._per_segment(two[k], 2) for k in ("gain", "offset"))
  assert gains[0] == 1.0 and offsets[0] == 1.0 and min(gains[1], offsets[1]) < 1.0
  assert two["val_psnr"] > one["val_psnr"] + 0.5
  # the returned params are the per-segment choice: the late steps' terms are scaled down
  full = errors.calibrate(gaussian_eps, {}, affine_then_noise_eps, {}, sampler, _x(0, 64),
                          jax.random.key(1), "tcec")
  np.testing.assert_allclose(np.asarray(p.K[:5]), np.asarray(full.K[:5]), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(p.K[5:]), gains[1] * np.asarray(full.K[5:]), rtol=1e-4,
                             atol=1e-6)


def test_scale_params_per_step():
  p = _fit("tac", offset_eps, samplers.ddim(SCHED, 4))
  g = jnp.array([1.0, 0.5, 0.0, 2.0])
  s = errors.scale_params(p, g, 1.0 - g)
  np.testing.assert_allclose(np.asarray(s.K), np.asarray(p.K) * np.asarray(g)[:, None], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(s.x_shift),
                             np.asarray(p.x_shift) * (1 - np.asarray(g))[:, None, None, None], rtol=1e-6)
  with pytest.raises(ValueError, match="segments must be >= 1"):
    errors.SafeConfig(segments=0)
