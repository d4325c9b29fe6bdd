"""Fidelity of quantized samples against float samples drawn with the same noise."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def psnr(x: jax.Array, ref: jax.Array, data_range: float = 2.0) -> jax.Array:
  """Per-sample PSNR in dB of `x` against `ref` ([B, H, W, C]; range [-1, 1] -> 2)."""
  if x.shape != ref.shape:
    raise ValueError(f"psnr needs equal shapes, got {x.shape} and {ref.shape}.")
  mse = jnp.mean((x - ref) ** 2, axis=tuple(range(1, x.ndim)))
  return 10.0 * jnp.log10(data_range ** 2 / jnp.maximum(mse, 1e-20))


def _gaussian_window(size: int, sigma: float) -> jax.Array:
  r = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
  g = jnp.exp(-(r ** 2) / (2 * sigma ** 2))
  return g / jnp.sum(g)


def ssim(x: jax.Array, ref: jax.Array, data_range: float = 2.0, window: int = 7,
         sigma: float = 1.5) -> jax.Array:
  """Per-sample SSIM (Wang et al. 2004), Gaussian window, averaged over channels.

  The default 7x7 window (not 11x11) suits the 16x16 images of the default model.
  """
  if x.shape != ref.shape:
    raise ValueError(f"ssim needs equal shapes, got {x.shape} and {ref.shape}.")
  window = min(window, x.shape[1], x.shape[2])
  g = _gaussian_window(window, sigma)
  c = x.shape[-1]
  kernel = jnp.tile((g[:, None] * g[None, :])[:, :, None, None], (1, 1, 1, c))  # HWIO, depthwise

  def blur(v):
    return jax.lax.conv_general_dilated(v, kernel, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=c)

  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  mx, my = blur(x), blur(ref)
  sxx = blur(x * x) - mx * mx
  syy = blur(ref * ref) - my * my
  sxy = blur(x * ref) - mx * my
  s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
  return jnp.mean(s, axis=(1, 2, 3))


def pixel_std(x: jax.Array) -> jax.Array:
  """Per-sample standard deviation over pixels and channels (contrast)."""
  return jnp.std(x, axis=tuple(range(1, x.ndim)))


def sharpness(x: jax.Array) -> jax.Array:
  """Per-sample mean |Laplacian| (3x3, per channel, interior pixels): blur lowers it."""
  lap = (x[:, 1:-1, :-2] + x[:, 1:-1, 2:] + x[:, :-2, 1:-1] + x[:, 2:, 1:-1]
         - 4.0 * x[:, 1:-1, 1:-1])
  return jnp.mean(jnp.abs(lap), axis=tuple(range(1, x.ndim)))


def quality_ratios(x: jax.Array, ref: jax.Array) -> dict:
  """Mean pixel std and mean sharpness of `x` as ratios to those of `ref` (1 = as ref)."""
  return {"std_ratio": jnp.mean(pixel_std(x)) / jnp.mean(pixel_std(ref)),
          "sharpness_ratio": jnp.mean(sharpness(x)) / jnp.mean(sharpness(ref))}
