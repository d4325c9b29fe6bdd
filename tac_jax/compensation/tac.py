"""TAC-Diffusion (ECCV 2024, arXiv 2407.03917; ../shared/REFERENCES.md).

Input bias correction (IBC): mu_i = E[x_c - x_fp] (a map over H, W, C averaged over the
calibration samples) is subtracted from the state before the network call. Noise
estimation reconstruction (NER): eps^ = K q on the elements with |q| > thr * mean|q|, with
both networks evaluated at the *same* input, the state the compensated sampler really
feeds them: q = eps_q(x_c - mu, t), r = eps(x_c - mu, t) (as PTQD's code and the public
reimplementation pair them), and

    K = [(1-l1) S(q r) + l1 N S(q / r) + l2 N] / [(1-l1) S(q^2) + l1 N S(q^2 / r^2) + l2 N]

(sums S over the masked elements of one sample's channel, N their count; |r| floored at
0.1 x its channel mean in the relative term, else a few r ~ 0 under large q decide K),
averaged over the calibration samples (as the public reimplementation averages its
per-sample K), fitted step by step on trajectories corrected at earlier steps.

The mask threshold is the one hyperparameter the public reimplementation varies (1 to 4)
and the one that decides whether TAC holds at 4 bits: at W4A4 on the shipped default
model the masked elements at threshold 1 are mostly quantization noise where r ~ 0, the
relative term shrinks K to 0.4-0.85, and the shrunk eps makes the x0 estimate at high
noise blow up (samples 12x the float model's spread, -8 dB); at threshold 4 it gains over
plain PTQ. So `calibrate(..., "tac")` picks the threshold among `TACOptions.thresholds`
as a user of TAC would tune it: each is fitted on part of the calibration seeds and
scored by the final-sample PSNR against the float model on the rest (never evaluation
seeds); the chosen one is refitted on all of them. A fixed `threshold` skips the search;
`fit` / `fit_scan` and tcec_safe's TAC base use it, or the first of `thresholds` (1).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from tac_jax import metrics
from tac_jax.compensation.calibrate import fit_scan
from tac_jax.compensation.online import compensate
from tac_jax.compensation.params import step_params
from tac_jax.compensation.registry import Method, register
from tac_jax.compensation.scan import (FitContext, StepInputs, check_calibration_noise,
                                      float_reference, split_calibration)
from tac_jax.diffusion.samplers import sample
from tac_jax.host import to_host

R_FLOOR = 0.1   # |r| in the relative term is floored at R_FLOOR * mean |r| of the channel


@dataclasses.dataclass(frozen=True)
class TACOptions:
  """TAC's hyperparameters (the public reimplementation's defaults)."""
  lambda1: float = 0.5      # weight of the relative error term
  lambda2: float = 0.1      # pull of K toward 1
  threshold: Optional[float] = None   # NER applies where |q| > threshold * mean |q|; None:
                            # `calibrate` searches `thresholds` (a scan alone uses the first)
  thresholds: Tuple[float, ...] = (1.0, 2.0, 4.0)  # the reimplementation's range
  val_fraction: float = 0.5  # share of the calibration seeds that scores the thresholds

  def __post_init__(self):
    bad = [v for v in (self.mask, *self.thresholds) if not v >= 0]
    if bad or not self.thresholds:
      raise ValueError(f"TACOptions: mask thresholds must be >= 0 and `thresholds` non-empty, "
                       f"got threshold={self.threshold}, thresholds={self.thresholds}.")
    if not 0 < self.val_fraction < 1:
      raise ValueError(f"TACOptions.val_fraction must be in (0, 1), got {self.val_fraction}.")

  @property
  def mask(self) -> float:
    """The threshold a scan fits with: `threshold`, else the first of `thresholds`."""
    return self.thresholds[0] if self.threshold is None else self.threshold

  @property
  def searches(self) -> bool:
    return self.threshold is None and len(self.thresholds) > 1


@dataclasses.dataclass(frozen=True)
class TACReport:
  """Which mask threshold `calibrate` chose for tac, and the validation PSNR of each."""
  threshold: float
  val_psnr: Dict[str, float]      # threshold -> mean PSNR vs float on the validation seeds
  num_fit: int
  num_val: int

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  def summary(self) -> str:
    scores = ", ".join(f"{t}: {v:.2f}" for t, v in self.val_psnr.items())
    return (f"tac: mask threshold {self.threshold:g} (validation PSNR by threshold {scores} dB"
            f" on {self.num_val} held-out of {self.num_fit + self.num_val} seeds)")


def ner_gain(q, r, cfg: TACOptions):
  """NER's closed-form K per channel from paired outputs q, r [B, H, W, C]: per sample and
  channel over the masked elements (|q| > threshold x mean |q|), then averaged over the
  calibration samples, as the public reimplementation averages its K."""
  l1, l2 = cfg.lambda1, cfg.lambda2
  spatial = tuple(range(1, q.ndim - 1))
  mag = jnp.abs(q)
  m = (mag > cfg.mask * jnp.mean(mag, axis=spatial, keepdims=True)).astype(q.dtype)
  floor = R_FLOOR * jnp.mean(jnp.abs(r), axis=tuple(range(q.ndim - 1)))
  r_rel = jnp.where(r < 0, -1.0, 1.0) * jnp.maximum(jnp.abs(r), floor)
  S = lambda v: jnp.sum(m * v, axis=spatial)                       # [B, C]
  n = S(jnp.ones_like(q))
  num = (1 - l1) * S(q * r) + l1 * n * S(q * r / r_rel ** 2) + l2 * n
  den = (1 - l1) * S(q * q) + l1 * n * S(q * q / r_rel ** 2) + l2 * n
  return jnp.mean(jnp.where(n > 0, num / jnp.maximum(den, 1e-20), 1.0), axis=0)


def tac_fit(ctx: FitContext):
  cfg: TACOptions = ctx.options

  def fit_step(s: StepInputs):
    mu = jnp.mean(s.x_c - s.x_fp, axis=0)                 # IBC map [H, W, C]
    x_in = s.x_c - mu
    q = ctx.q(x_in, s.t)
    K = ner_gain(q, ctx.fp(x_in, s.t), cfg)
    return step_params(1.0 - K, q.shape[-1], x_shift=mu,
                       mask_threshold=jnp.asarray(cfg.mask, jnp.float32)), q, s.aux

  return fit_step


def tac_run(ctx: FitContext, x_T, key, phi):
  """`calibrate`'s tac: the mask threshold chosen on held-out calibration seeds (module
  docstring), then the fit at that threshold on all of them. (params, TACReport)."""
  cfg: TACOptions = ctx.options
  check_calibration_noise(x_T)
  scan = jax.jit(lambda fp, q, x, k, p, o: fit_scan(fp, q, ctx.sampler, x, k, "tac", o, p).params,
                 static_argnums=5)
  if not cfg.searches:
    return scan(ctx.fp, ctx.q, x_T, key, phi, cfg), None   # the fit uses cfg.mask
  x_fit, key_fit, x_val, key_val = split_calibration(
      x_T, key, cfg.val_fraction, who="tac's mask threshold search",
      fix="(or a fixed TACOptions(threshold=...))")
  fp, q, sampler = ctx.fp, ctx.q, ctx.sampler
  x_ref = float_reference(fp, sampler, x_val, key_val)
  psnr = jax.jit(lambda n, p, x, k, ref: jnp.mean(metrics.psnr(
      sample(n.apply, n.variables, compensate(sampler, p), x, k)[0].x, ref)))
  scores = {}
  for thr in cfg.thresholds:
    opts = dataclasses.replace(cfg, threshold=float(thr))
    v = float(to_host(psnr(q, scan(fp, q, x_fit, key_fit, phi, opts), x_val, key_val, x_ref)))
    scores[f"{thr:g}"] = v if np.isfinite(v) else float("-inf")
  best = float(max(scores, key=scores.get))
  params = scan(fp, q, x_T, key, phi, dataclasses.replace(cfg, threshold=best))
  return params, TACReport(best, scores, int(x_fit.shape[0]), int(x_val.shape[0]))


register(Method("tac", "TAC-Diffusion: input bias correction + masked noise estimation "
                "reconstruction (same-input pairing), mask threshold chosen on held-out "
                "calibration seeds", fit=tac_fit, run=tac_run, options=TACOptions(),
                calibration_calls=3, multistep=True))
