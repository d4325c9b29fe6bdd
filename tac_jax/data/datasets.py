"""Data sets reachable offline, as float32 NHWC arrays in [-1, 1].

* `digits`: the 1,797 8x8 handwritten digits that scikit-learn ships (UCI optdigits),
  bilinearly upsampled to `size` and, with `colored=True`, painted with a random
  foreground and background color per image so the three channels carry different
  statistics (the "colored digits" of the default model). Colors come from an explicit seed.
* `shapes`: a procedural RGB data set generated deterministically from a seed: one
  filled disc or square of random color, size and position on a vertical color gradient.
"""

from __future__ import annotations

import jax
import numpy as np
from sklearn.datasets import load_digits  # ships the data file; no download

DATASETS = ("digits", "digits_gray", "shapes")
LABELLED = ("digits", "digits_gray")   # data sets with class labels (`labels`)


def _gray_digits(size: int) -> np.ndarray:
  imgs = load_digits().images.astype(np.float32) / 16.0  # [N, 8, 8] in [0, 1]
  if size != 8:
    imgs = np.asarray(jax.image.resize(imgs, (imgs.shape[0], size, size), "bilinear"))
  return np.clip(imgs, 0.0, 1.0)


def digits(size: int = 16, colored: bool = True, seed: int = 0) -> np.ndarray:
  """[1797, size, size, 3 if colored else 1] float32 in [-1, 1]."""
  mask = _gray_digits(size)[..., None]
  if not colored:
    return mask * 2.0 - 1.0
  rng = np.random.default_rng(seed)
  n = mask.shape[0]
  fg = rng.uniform(0.35, 1.0, (n, 1, 1, 3)).astype(np.float32)
  bg = rng.uniform(0.0, 0.3, (n, 1, 1, 3)).astype(np.float32)
  return (bg * (1 - mask) + fg * mask) * 2.0 - 1.0


def digit_labels() -> np.ndarray:
  """[1797] int32 class labels (0..9) of `digits`, in the same order."""
  return load_digits().target.astype(np.int32)


def shapes(num: int = 2048, size: int = 16, seed: int = 0) -> np.ndarray:
  """[num, size, size, 3] float32 in [-1, 1]; deterministic in `seed`."""
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
  top = rng.uniform(0, 0.5, (num, 1, 1, 3))
  bottom = rng.uniform(0, 0.5, (num, 1, 1, 3))
  ramp = (yy / size)[None, :, :, None]
  img = top * (1 - ramp) + bottom * ramp
  cy, cx = rng.uniform(0.25 * size, 0.75 * size, (2, num, 1, 1))
  r = rng.uniform(0.15 * size, 0.3 * size, (num, 1, 1))
  disc = (yy[None] - cy) ** 2 + (xx[None] - cx) ** 2 <= r ** 2
  square = (np.abs(yy[None] - cy) <= r) & (np.abs(xx[None] - cx) <= r)
  is_disc = rng.uniform(size=(num, 1, 1)) < 0.5
  m = np.where(is_disc, disc, square)[..., None]
  color = rng.uniform(0.4, 1.0, (num, 1, 1, 3))
  img = np.where(m, color, img)
  return (img * 2.0 - 1.0).astype(np.float32)


def labels(name: str):
  """[N] int32 class labels of data set `name` in `load`'s order, or None if it has none."""
  if name in LABELLED:
    return digit_labels()
  if name in DATASETS:
    return None
  raise ValueError(f"unknown data set {name!r}; choose one of {list(DATASETS)}.")


def load(name: str, size: int = 16, seed: int = 0, num: int = 2048) -> np.ndarray:
  if name == "digits":
    return digits(size=size, colored=True, seed=seed)
  if name == "digits_gray":
    return digits(size=size, colored=False, seed=seed)
  if name == "shapes":
    return shapes(num=num, size=size, seed=seed)
  raise ValueError(f"unknown data set {name!r}; choose 'digits', 'digits_gray' or 'shapes'.")
