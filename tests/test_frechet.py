"""The Frechet distance (tac_jax.metrics.frechet) and the shipped classifier's features it
is measured in."""

import numpy as np
import pytest

from tac_jax import data
from tac_jax.metrics import frechet


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
