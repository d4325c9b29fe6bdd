"""The library's default, tcec_safe: a strength validated on held-out calibration seeds,
its quality and FD guards, per-segment strengths, and the fallback to no correction."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tac_jax import compensation as comp
from tac_jax import metrics
from tac_jax.compensation.safe import Candidate, choose_strength, admissible, _per_segment
from tac_jax.diffusion import samplers
from tac_jax.metrics import frechet
from toys import SCHED, gaussian_eps

GAIN = jnp.array([1.25, 0.8, 1.1])


def affine_eps(v, x, t):
  return GAIN * gaussian_eps(v, x, t) + jnp.array([0.1, -0.1, 0.05])


def random_offset_eps(v, x, t):
  """Error pure noise across samples: a pseudo-random offset per sample, channel and step
  (a hash of the input), independent of everything the correction sees."""
  z = jnp.sin(1e3 * jnp.sum(x, axis=(1, 2), keepdims=True) + t[0])
  return gaussian_eps(v, x, t) + 0.3 * z


def _x(seed, n):
  return jax.random.normal(jax.random.key(seed), (n, 4, 4, 3))


def _run(apply_fn, sampler, x, key, params=None):
  return jax.jit(lambda x: samplers.sample(apply_fn, {}, comp.compensate(sampler, params), x,
                                           key)[0].x)(x)


def _safe(fq, sampler, n=128, **config):
  cal = comp.calibrate(comp.Net(gaussian_eps, {}), comp.Net(fq, {}), sampler, _x(0, n),
                       jax.random.key(1), "tcec_safe", comp.SafeConfig(**config))
  return cal.params, cal.report


def test_default_method_is_tcec_safe_and_returns_one_type():
  sampler = samplers.ddim(SCHED, 6)
  fp, q = comp.Net(gaussian_eps, {}), comp.Net(affine_eps, {})
  cal = comp.calibrate(fp, q, sampler, _x(0, 16), jax.random.key(1))
  assert cal.method == comp.DEFAULT_METHOD == "tcec_safe"
  assert isinstance(cal.report, comp.SafeReport) and cal.seconds > 0
  plain = comp.calibrate(fp, q, sampler, _x(0, 16), jax.random.key(1), "tcec")
  assert type(plain) is type(cal) and plain.report is None
  assert "tcec_safe: tcec at gain" in cal.report.summary()
  with pytest.raises(TypeError, match="SafeConfig"):
    comp.calibrate(fp, q, sampler, _x(0, 16), jax.random.key(1), "tcec_safe", comp.FitConfig())
  with pytest.raises(ValueError, match="outside one scan"):
    comp.fit(fp, q, sampler, _x(0, 16), jax.random.key(1), "tcec_safe")


def test_safe_fit_takes_no_correction_on_pure_noise():
  """Per-sample noise: the full fit shrinks it (PSNR up, contrast down); the safe fit keeps
  the gain term (near) off and does not lose on seeds it never saw. (The noise is not
  exactly zero-mean along the trajectories, so a weak offset may still help a little.)"""
  sampler = samplers.ddim(SCHED, 10)
  p, rep = _safe(random_offset_eps, sampler, bases=("tcec",))
  assert rep.fell_back or rep.gain <= 0.25
  assert len(rep.candidates) == 25 and rep.num_fit == 64 and rep.num_val == 64
  if rep.fell_back:
    assert float(jnp.max(jnp.abs(p.K))) == 0.0 and float(jnp.max(jnp.abs(p.beta))) == 0.0
  x, key = _x(7, 256), jax.random.key(9)
  ref = _run(gaussian_eps, sampler, x, key)
  psnr = lambda params: float(jnp.mean(metrics.psnr(_run(random_offset_eps, sampler, x, key, params), ref)))
  assert -0.2 < psnr(p) - psnr(None) < 1.0


def test_safe_fit_takes_the_full_correction_on_an_affine_error():
  sampler = samplers.ddim(SCHED, 10)
  _, rep = _safe(affine_eps, sampler, bases=("tcec",))
  assert not rep.fell_back and rep.gain == 1.0 and rep.offset == 1.0 and rep.base == "tcec"
  assert rep.val_psnr > rep.val_psnr_none + 10


def test_safe_fit_chooses_among_several_bases_on_validation_seeds():
  """With bases (tcec, tac) the safe fit scores both families on the validation seeds;
  on a pure gain error with an offset both fix, the choice is reported."""
  sampler = samplers.ddim(SCHED, 10)
  _, rep = _safe(affine_eps, sampler, bases=("tac", "tcec"))
  assert {c.base for c in rep.candidates} == {"tac", "tcec"}
  assert len(rep.candidates) == 1 + 2 * 24
  best = max((c for c in rep.candidates if not c.is_none), key=lambda c: c.psnr)
  assert rep.base == best.base and rep.val_psnr == best.psnr
  with pytest.raises(ValueError, match="bases"):
    comp.SafeConfig(bases=("none",))
  with pytest.raises(ValueError, match="not 'qncd'"):
    _safe(affine_eps, sampler, n=16, bases=("qncd",))


def test_scaled_params_zero_is_identity_and_one_is_unchanged():
  sampler = samplers.ddim(SCHED, 6)
  p = comp.calibrate(comp.Net(gaussian_eps, {}), comp.Net(affine_eps, {}), sampler, _x(0, 32),
                     jax.random.key(1), "tac",
                     comp.TACOptions(threshold=1.0)).params
  x, key = _x(3, 8), jax.random.key(4)
  np.testing.assert_array_equal(_run(affine_eps, sampler, x, key, comp.scale_params(p, 0.0, 0.0)),
                                _run(affine_eps, sampler, x, key))
  jax.tree.map(np.testing.assert_array_equal, comp.scale_params(p, 1.0, 1.0), p)


def _row(gain, offset, psnr, fd, deviation=0.0, resampled=None):
  return Candidate("tcec", gain, offset, psnr, 1.0, 1.0, deviation, fd, resampled)


def test_fd_guard_rules_out_psnr_bought_with_a_worse_distribution():
  rows = [_row(0, 0, 10.0, 100.0), _row(1, 1, 16.0, 140.0), _row(0.5, 1, 13.0, 98.0),
          _row(1, 0.5, 14.0, 90.0, deviation=1.0)]   # best FD, but blurred
  config = comp.SafeConfig()
  chosen, fell_back = choose_strength(rows, config)
  assert not fell_back and (chosen.gain, chosen.offset) == (0.5, 1)
  assert [admissible(r, rows[0], config) for r in rows] == [True, False, True, False]
  # a looser FD tolerance admits the 16 dB strength, and so does switching the guard off;
  # a negative tolerance is a margin: FD must drop by that share (98 < 100 is not enough)
  assert choose_strength(rows, comp.SafeConfig(fd_tol=0.5))[0].psnr == 16.0
  assert choose_strength(rows, comp.SafeConfig(fd_guard=False))[0].psnr == 16.0
  assert choose_strength(rows, comp.SafeConfig(fd_tol=-0.05))[0].psnr == 10.0
  with pytest.raises(ValueError, match="fd_guard=False"):
    comp.SafeConfig(fd_tol=-1)
  # nothing admissible beats no correction: fall back
  chosen, fell_back = choose_strength([_row(0, 0, 10.0, 100.0), _row(1, 1, 16.0, 101.0)], config)
  assert fell_back and chosen.is_none


def test_fd_guard_needs_the_gain_in_most_bootstrap_resamples():
  # lower FD on the validation set as drawn, but in only 60 % of the paired resamples
  none = _row(0, 0, 10.0, 100.0, resampled=np.full(10, 100.0))
  lucky = _row(1, 1, 14.0, 95.0, resampled=np.array([90.0] * 6 + [110.0] * 4))
  sure = _row(0.5, 0.5, 12.0, 97.0, resampled=np.array([95.0] * 9 + [101.0]))
  config = comp.SafeConfig()
  chosen, _ = choose_strength([none, lucky, sure], config)
  assert (chosen.gain, chosen.offset) == (0.5, 0.5)      # 90 % >= fd_confidence 0.9
  assert [admissible(r, none, config) for r in (none, lucky, sure)] == [True, False, True]
  chosen, _ = choose_strength([none, lucky, sure], comp.SafeConfig(fd_confidence=0.5))
  assert chosen.psnr == 14.0
  # rows without resamples fall back to the point comparison
  chosen, _ = choose_strength([_row(0, 0, 10.0, 100.0), _row(1, 1, 14.0, 95.0)], config)
  assert chosen.psnr == 14.0
  with pytest.raises(ValueError, match="fd_confidence"):
    comp.SafeConfig(fd_confidence=0.0)


def test_paired_bootstrap_distances():
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
  calls = []

  def feats(x):
    calls.append(x.shape)
    return np.asarray(x).reshape(x.shape[0], -1)[:, :8].astype(np.float64)

  _, rep = _safe(affine_eps, sampler, n=64, features=feats, bases=("tcec",))
  assert len(calls) == 26 and calls[0] == (32, 4, 4, 3)   # the float reference + 25 strengths
  assert rep.val_fd < 0.1 * rep.val_fd_none               # the exact fix restores the distribution
  assert all(np.isfinite(r.fd_vs_float) for r in rep.candidates)
  assert rep.val_fd_share == 1.0                          # no worse in every paired resample
  assert all(r.fd_resampled.shape == (200,) for r in rep.candidates)
  assert "candidates" not in rep.to_json() and rep.to_json()["gain"] == rep.gain


def test_coarse_features_shape_and_area_averaging():
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
  (_, one), (p, two) = (_safe(affine_then_noise_eps, sampler, segments=S, bases=("tcec",))
                        for S in (1, 2))
  assert not one.fell_back and not two.fell_back and len(two.candidates) > 25
  # early segment: the full fit; late segment (noise): a weaker one, and a better validation
  gains, offsets = (_per_segment(getattr(two, k), 2) for k in ("gain", "offset"))
  assert gains[0] == 1.0 and offsets[0] == 1.0 and min(gains[1], offsets[1]) < 1.0
  assert two.val_psnr > one.val_psnr + 0.5
  # the returned params are the per-segment choice: the late steps' terms are scaled down
  full = comp.calibrate(comp.Net(gaussian_eps, {}), comp.Net(affine_then_noise_eps, {}), sampler,
                        _x(0, 64), jax.random.key(1), "tcec").params
  np.testing.assert_allclose(np.asarray(p.K[:5]), np.asarray(full.K[:5]), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(p.K[5:]), gains[1] * np.asarray(full.K[5:]), rtol=1e-4,
                             atol=1e-6)


def test_scale_params_per_step():
  p = comp.calibrate(comp.Net(gaussian_eps, {}), comp.Net(affine_eps, {}), samplers.ddim(SCHED, 4),
                     _x(0, 32), jax.random.key(1), "tac",
                     comp.TACOptions(threshold=1.0)).params
  g = jnp.array([1.0, 0.5, 0.0, 2.0])
  s = comp.scale_params(p, g, 1.0 - g)
  np.testing.assert_allclose(np.asarray(s.K), np.asarray(p.K) * np.asarray(g)[:, None], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(s.x_shift),
                             np.asarray(p.x_shift) * (1 - np.asarray(g))[:, None, None, None], rtol=1e-6)
  with pytest.raises(ValueError, match="segments must be >= 1"):
    comp.SafeConfig(segments=0)
  assert dataclasses.replace(comp.SafeConfig(), bases="tcec,tac").bases == ("tcec", "tac")
