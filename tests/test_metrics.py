import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tac_jax import metrics


def test_psnr_known_value_and_identity():
  ref = jax.random.uniform(jax.random.key(0), (3, 8, 8, 3), minval=-1, maxval=1)
  np.testing.assert_allclose(metrics.psnr(ref + 0.1, ref), 10 * np.log10(4 / 0.01), rtol=1e-4)
  assert np.all(metrics.psnr(ref, ref) > 150)


def test_ssim_is_one_for_identical_and_drops_with_noise():
  ref = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
  np.testing.assert_allclose(metrics.ssim(ref, ref), 1.0, atol=1e-5)
  small = metrics.ssim(ref + 0.05 * jax.random.normal(jax.random.key(1), ref.shape), ref)
  big = metrics.ssim(ref + 0.5 * jax.random.normal(jax.random.key(1), ref.shape), ref)
  assert np.all(big < small) and np.all(small < 1.0)


def test_shape_mismatch_is_an_error():
  with pytest.raises(ValueError, match="equal shapes"):
    metrics.psnr(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4, 4, 1)))
