"""Frechet distance of sample sets in the feature space of a small shipped classifier.

    FD = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})

computed in float64 with a symmetric eigendecomposition (Tr (S_1 S_2)^{1/2} = sum of the
square roots of the eigenvalues of S_1^{1/2} S_2 S_1^{1/2}), so it is exactly 0 for a set
against itself. The features are the 64-d penultimate layer of `DigitClassifier`, a
small CNN trained on the colored 16x16 digits the default model learns
(`tac_jax/assets/classifier`, ~98 % held-out accuracy): an FID-style distance for this
data set, **not** Inception FID, and not comparable with published FID numbers.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tac_jax import files

FEATURE_DIM = 64


class DigitClassifier(nn.Module):
  """conv 32 -> pool -> conv 64 -> pool -> dense 64 (features) -> dense 10, NHWC [-1, 1]."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, return_features: bool = False):
    h = nn.relu(nn.Conv(32, (3, 3), name="conv1")(x))
    h = nn.avg_pool(h, (2, 2), (2, 2))
    h = nn.relu(nn.Conv(64, (3, 3), name="conv2")(h))
    h = nn.avg_pool(h, (2, 2), (2, 2))
    feats = nn.relu(nn.Dense(FEATURE_DIM, name="features")(h.reshape(h.shape[0], -1)))
    if return_features:
      return feats
    return nn.Dense(self.num_classes, name="logits")(feats)


def classifier_dir() -> str:
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                      "classifier")


def train_classifier(images: np.ndarray, labels: np.ndarray, groups: Optional[np.ndarray] = None,
                     steps: int = 1500, batch: int = 128, seed: int = 0, holdout: float = 0.15,
                     log_every: int = 250) -> Tuple[Any, Dict[str, float]]:
  """Trains the classifier (Adam, light noise augmentation); returns (params, metrics).

  `groups` (e.g. the source digit of each colored copy) keeps every copy of a held-out
  image out of training, so the held-out accuracy is not inflated by recolored twins.
  """
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels.")
  rng = np.random.default_rng(seed)
  groups = np.arange(images.shape[0]) if groups is None else np.asarray(groups)
  uniq = rng.permutation(np.unique(groups))
  held = np.isin(groups, uniq[:int(holdout * uniq.size)])
  val, tr = np.flatnonzero(held), np.flatnonzero(~held)
  n_val = val.size
  model = DigitClassifier()
  params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1,) + images.shape[1:]))["params"]
  tx = optax.adam(2e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, x, y, key):
    # Small Gaussian noise makes the features robust to the mild noise left in samples.
    x = x + 0.05 * jax.random.normal(key, x.shape)
    loss, g = jax.value_and_grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, x), y).mean())(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, loss

  for i in range(steps):
    idx = rng.choice(tr, batch)
    params, opt, loss = step(params, opt, jnp.asarray(images[idx]), jnp.asarray(labels[idx]),
                             jax.random.fold_in(jax.random.key(seed + 1), i))
    if log_every and (i + 1) % log_every == 0:
      print(f"classifier step {i + 1}/{steps} loss {float(loss):.4f}", flush=True)
  logits = jax.jit(model.apply)({"params": params}, jnp.asarray(images[val]))
  acc = float(jnp.mean(jnp.argmax(logits, -1) == labels[val]))
  return params, {"heldout_accuracy": acc, "heldout_size": int(n_val)}


def save_classifier(directory: str, params, meta: Dict[str, Any]) -> str:
  return files.save_checkpoint(directory, params, {"model": {"kind": "DigitClassifier"}, **meta})


class FeatureExtractor:
  """Jitted features of the shipped (or a given) classifier, in batches."""

  def __init__(self, directory: Optional[str] = None, batch: int = 500):
    directory = directory or classifier_dir()
    meta = files.load_meta(directory)
    if meta["model"].get("kind") != "DigitClassifier":
      raise ValueError(f"{directory} does not hold a DigitClassifier (model.json: {meta['model']}).")
    self.meta = meta
    self.model = DigitClassifier()
    abstract = jax.eval_shape(self.model.init, jax.random.key(0),
                              jnp.zeros((1,) + tuple(meta["input_shape"])))["params"]
    self.params = files.restore_params(directory, abstract, meta)
    self.input_shape = tuple(meta["input_shape"])
    self.batch = batch
    self._feats = jax.jit(lambda p, x: self.model.apply({"params": p}, x, return_features=True))
    self._classes = jax.jit(lambda p, x: jnp.argmax(self.model.apply({"params": p}, x), -1))

  def adapt(self, images: np.ndarray) -> np.ndarray:
    """Images of another size or with one channel, resized (bilinear) to the classifier's
    input and gray repeated over its channels: a feature space for gray or larger digit
    images too (still this classifier's, not a general one)."""
    h, w, c = self.input_shape
    if images.ndim != 4 or images.shape[-1] not in (1, c):
      raise ValueError(f"the classifier takes images [B, H, W, {c} or 1], got {images.shape}.")
    if images.shape[1:3] != (h, w):
      images = np.asarray(jax.image.resize(images, (images.shape[0], h, w, images.shape[-1]),
                                           "bilinear"))
    if images.shape[-1] == 1:
      images = np.repeat(images, c, axis=-1)
    return images

  def _batched(self, fn, images) -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.shape[1:] != self.input_shape:
      images = self.adapt(images)
    out = [np.asarray(fn(self.params, jnp.asarray(np.clip(images[i:i + self.batch], -1, 1))))
           for i in range(0, images.shape[0], self.batch)]
    return np.concatenate(out)

  def __call__(self, images) -> np.ndarray:
    """[B, features] float64: the classifier's penultimate features (the FD space)."""
    return self._batched(self._feats, images).astype(np.float64)

  def classify(self, images) -> np.ndarray:
    """[B] int: the classifier's predicted digit of each image."""
    return self._batched(self._classes, images)


def label_accuracy(predicted, requested) -> float:
  """Share of samples whose predicted class is the requested one (conditional models)."""
  predicted, requested = np.asarray(predicted), np.asarray(requested)
  if predicted.shape != requested.shape:
    raise ValueError(f"{predicted.shape[0]} predictions for {requested.shape[0]} requested labels.")
  return float(np.mean(predicted == requested))


def gaussian_stats(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"need features of shape [N >= 2, D], got {f.shape}.")
  if not np.all(np.isfinite(f)):
    raise ValueError("features contain NaN/inf: check the samples.")
  return f.mean(0), np.cov(f, rowvar=False)


def _sqrtm_psd(s: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh(s)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance_from_stats(mu1, s1, mu2, s2) -> float:
  """FD between N(mu1, s1) and N(mu2, s2) (symmetric eigendecompositions, float64)."""
  r1 = _sqrtm_psd(s1)
  m = r1 @ s2 @ r1
  tr_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)))
  d = mu1 - mu2
  return float(max(d @ d + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt, 0.0))


def frechet_distance(features_1: np.ndarray, features_2: np.ndarray) -> float:
  """FD of two feature sets [N, D]."""
  return frechet_distance_from_stats(*gaussian_stats(features_1), *gaussian_stats(features_2))


def bootstrap_indices(num_samples: int, num_resamples: int, seed: int = 0) -> np.ndarray:
  """[num_resamples, num_samples] indices drawn with replacement (a fixed seed: the same
  resamples for every sample set compared, so comparisons are paired)."""
  if num_samples < 2 or num_resamples < 1:
    raise ValueError(f"need >= 2 samples and >= 1 resample, got {num_samples}, {num_resamples}.")
  return np.random.default_rng(seed).integers(0, num_samples, (num_resamples, num_samples))


def _nuclear_norm_of_cross(a1: np.ndarray, a2: np.ndarray) -> np.ndarray:
  """Sum of the singular values of a1 a2^T for stacked centered sets [..., n, D] (via their
  [D, D] QR factors when n > D: the same singular values, a smaller problem)."""
  if a1.shape[-2] > a1.shape[-1]:
    a1, a2 = np.linalg.qr(a1, mode="r"), np.linalg.qr(a2, mode="r")
  return np.linalg.svd(a1 @ np.swapaxes(a2, -1, -2), compute_uv=False).sum(-1)


def resampled_distances(features: np.ndarray, ref_features: np.ndarray,
                        indices: np.ndarray) -> np.ndarray:
  """FD of `features[i]` to `ref_features[i]` for each row i of `indices` ([R] float64):
  a paired bootstrap when row k of both sets comes from the same seed.

  All resamples at once, exactly: with centered sets A_1, A_2 [n, D] and S_j = A_j^T A_j /
  (n - 1), the nonzero eigenvalues of S_1^{1/2} S_2 S_1^{1/2} are the squared singular
  values of A_1 A_2^T / (n - 1), so Tr (S_1 S_2)^{1/2} is the nuclear norm of that n x n
  matrix (no D x D square roots; a few dozen samples in 64 features make it cheap)."""
  f, r = np.asarray(features, np.float64), np.asarray(ref_features, np.float64)
  if f.shape != r.shape or f.ndim != 2:
    raise ValueError(f"paired feature sets must have one shape [N, D], got {f.shape} and {r.shape}.")
  if not (np.all(np.isfinite(f)) and np.all(np.isfinite(r))):
    raise ValueError("features contain NaN/inf: check the samples.")
  idx = np.asarray(indices)
  if idx.ndim != 2 or idx.shape[1] < 2:
    raise ValueError(f"indices must be [R, n >= 2], got shape {idx.shape}.")
  fs, rs = f[idx], r[idx]                                     # [R, n, D]
  mu_f, mu_r = fs.mean(1), rs.mean(1)
  a_f, a_r = fs - mu_f[:, None], rs - mu_r[:, None]
  n = idx.shape[1]
  tr = (np.sum(a_f ** 2, axis=(1, 2)) + np.sum(a_r ** 2, axis=(1, 2))) / (n - 1)
  tr_sqrt = _nuclear_norm_of_cross(a_f, a_r) / (n - 1)
  return np.maximum(np.sum((mu_f - mu_r) ** 2, -1) + tr - 2 * tr_sqrt, 0.0)


def coarse_features(images, size: int = 8) -> np.ndarray:
  """Features for any image or latent shape, no classifier: each channel resized
  (antialiased, i.e. area-averaged when shrinking) to at most `size` x `size` and
  flattened. A Frechet distance here compares coarse layout and contrast distributions;
  `calibrate_safe` uses it when no feature extractor is given."""
  x = np.asarray(images, np.float32)
  if x.ndim != 4:
    raise ValueError(f"coarse_features takes images [B, H, W, C], got shape {x.shape}.")
  h, w = min(size, x.shape[1]), min(size, x.shape[2])
  if (h, w) != x.shape[1:3]:
    x = np.asarray(jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), "linear", antialias=True))
  return x.reshape(x.shape[0], -1).astype(np.float64)
