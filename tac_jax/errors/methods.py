"""Calibration of every compensation method by name, and the safe default (`tcec_safe`).

`calibrate` runs one method's fit in one `lax.scan` (jittable). `calibrate_safe` wraps a
fitted correction in a validation loop that cannot do worse than no correction on
held-out calibration seeds: the calibration seeds are split into a fit half and a
validation half; the correction is fitted on the first; on the second, every strength
(gain term, offset term) on a grid -- (0, 0), no correction, included -- is sampled and
scored by the final-sample PSNR against the float model. A strength is admissible only if
its samples are (a) no further in contrast and sharpness from the float model's than
plain PTQ's (beyond a tolerance) and (b) no further in distribution: their Frechet
distance to the float model's validation samples, in a feature space the caller gives
(the shipped classifier's in the launchers; coarse pixels otherwise), is at most
`1 + fd_tol` times plain PTQ's -- not only on the validation set as drawn but in at least
`fd_confidence` of paired bootstrap resamples of its seeds, because an FD of a few dozen
samples is noisy. PSNR alone can be bought with blur; (a) and (b) stop that. Unless the
best admissible strength beats no correction by `min_gain_db`, the result is no
correction (a fallback the report states).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from tac_jax import metrics
from tac_jax.metrics import frechet
from tac_jax.diffusion.samplers import ApplyFn, Sampler, sample
from tac_jax.diffusion.schedules import Schedule
from tac_jax.errors import reference
from tac_jax.errors.compensation import (REFERENCE_METHODS, SAFE_METHOD, CorrectionParams,
                                         FitConfig, calibration_scan, check_calibration_noise,
                                         compensate, default_phi, get_fit_config,
                                         least_squares_fit_step, scale_params, zero_params)
from tac_jax.host import to_host


def calibrate(apply_fp: ApplyFn, var_fp, apply_q: ApplyFn, var_q, sampler: Sampler,
              x_T: jax.Array, key: jax.Array, fit: FitConfig | str = "tcec",
              phi: Optional[jax.Array] = None, check_finite: bool = True,
              schedule: Optional[Schedule] = None,
              reference_config: reference.ReferenceConfig = reference.ReferenceConfig()
              ) -> CorrectionParams:
  """Fits a compensation method step by step in one `lax.scan` (jit it at the call site).

  Args:
    apply_fp, var_fp: the float network `apply(variables, x, t) -> eps` (t: int32 [B]) and
      its variables.
    apply_q, var_q: the quantized network and its variables.
    sampler: the sampler the correction is for (its steps and timesteps).
    x_T: [B, H, W, C] calibration starting noise; key: its step-noise key.
    fit: a method name (`METHODS`; `tcec_safe` goes through `calibrate_safe`) or a FitConfig.
    phi: [N, C] propagation gains of the carried error estimate (default a_i).
    check_finite: raise when the trajectories hold NaN/inf (skipped under jit).
    schedule: the noise schedule, needed by `stepbaq` (its shifted timesteps).
    reference_config: hyperparameters of the reference methods.
  Returns:
    CorrectionParams with a leading axis of N sampler steps.
  """
  C = x_T.shape[-1]
  phi = default_phi(sampler.coeffs, C) if phi is None else jnp.asarray(phi, jnp.float32)
  if isinstance(fit, str):
    if fit == SAFE_METHOD:
      raise ValueError(f"{SAFE_METHOD!r} validates on held-out seeds outside one scan: call "
                       "errors.calibrate_safe (not under jit).")
    if fit in REFERENCE_METHODS:
      step, sequential = reference.fit_step(fit, sampler, apply_fp, var_fp, apply_q, var_q, schedule,
                                            reference_config)
      return calibration_scan(step, sampler, apply_fp, var_fp, x_T, key, phi, sequential,
                              check_finite)
    fit = get_fit_config(fit)
    if fit is None:
      check_calibration_noise(x_T)
      return zero_params(sampler.coeffs.num_steps, C, sampler.coeffs.t, phi)
  step = least_squares_fit_step(fit, sampler, apply_fp, var_fp, apply_q, var_q)
  return calibration_scan(step, sampler, apply_fp, var_fp, x_T, key, phi, fit.sequential,
                          check_finite)


@dataclasses.dataclass(frozen=True)
class SafeConfig:
  """How `calibrate_safe` validates a correction."""
  base: str = "tcec"                          # the method whose strength is chosen
  strengths: Tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # grid for each of the 2 terms
  val_fraction: float = 0.5                   # share of calibration seeds held out
  min_gain_db: float = 0.05                   # needed over no correction on validation
  quality_tol: float = 0.05                   # extra |log std ratio| + |log sharpness ratio|
  fd_guard: bool = True                       # (b): validation FD vs float <= (1 + fd_tol) x none's
  fd_tol: float = 0.0                         # (< 0: a margin, FD must drop by at least that share)
  fd_confidence: float = 0.9                  # share of paired bootstrap resamples of the validation
  fd_resamples: int = 200                     # seeds where (b) must hold (0 resamples: the set as drawn)
  segments: int = 1                           # > 1: then refine the strengths per contiguous
                                              # block of steps (coordinate search on the grid)

  def __post_init__(self):
    if self.base == SAFE_METHOD or self.base == "none":
      raise ValueError(f"SafeConfig.base must be a fitted method, got {self.base!r}.")
    if not 0.0 < self.val_fraction < 1.0:
      raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}.")
    if 0.0 not in self.strengths or any(s < 0 for s in self.strengths):
      raise ValueError(f"strengths must be >= 0 and include 0 (no correction), got {self.strengths}.")
    if self.segments < 1:
      raise ValueError(f"segments must be >= 1 (1: one strength for all steps), got {self.segments}.")
    if not (np.isfinite(self.fd_tol) and self.fd_tol > -1):
      raise ValueError(f"fd_tol must be finite and > -1 (a relative tolerance), got {self.fd_tol}; "
                       "switch the FD guard off with fd_guard=False.")
    if not 0.0 < self.fd_confidence <= 1.0 or self.fd_resamples < 0:
      raise ValueError(f"fd_confidence must be in (0, 1] and fd_resamples >= 0, got "
                       f"{self.fd_confidence}, {self.fd_resamples}.")


def quality_deviation(std_ratio, sharpness_ratio) -> float:
  """How far contrast and sharpness are from the float model's (0 = equal; inf when a
  candidate's samples are flat or not finite)."""
  ratios = np.asarray([std_ratio, sharpness_ratio], np.float64)
  if not np.all(np.isfinite(ratios) & (ratios > 0)):
    return float("inf")
  return float(np.sum(np.abs(np.log(ratios))))


def _fd_share(row, none, config: SafeConfig) -> Optional[float]:
  """Share of the paired resamples in which `row`'s FD vs float is at most (1 + fd_tol) x
  no correction's (None when the rows carry no resamples)."""
  if row.get("fd_resampled") is None or none.get("fd_resampled") is None:
    return None
  return float(np.mean(row["fd_resampled"] <= none["fd_resampled"] * (1 + config.fd_tol)))


def fd_holds(row, none, config: SafeConfig) -> bool:
  """Whether `row`'s FD vs float is at most (1 + fd_tol) x no correction's: in at least
  `fd_confidence` of the paired resamples when the rows carry them (`fd_resampled`, the same
  resamples in every row), else on the set as drawn."""
  share = _fd_share(row, none, config)
  if share is not None:
    return share >= config.fd_confidence
  return bool(row["fd_vs_float"] <= none["fd_vs_float"] * (1 + config.fd_tol))


def choose_strength(rows, config: SafeConfig) -> Tuple[Dict[str, Any], bool]:
  """(chosen row, fell_back) among validation `rows` (dicts with gain, offset, psnr,
  deviation, fd_vs_float and optionally fd_resampled; the (0, 0) row is no correction).
  Marks each row `admissible`: contrast / sharpness deviation at most no correction's +
  `quality_tol`, and (with `fd_guard`) `fd_holds`. The best admissible PSNR wins unless it
  beats no correction by less than `min_gain_db` (then: fell back)."""
  none = next(r for r in rows if r["gain"] == 0 and r["offset"] == 0)
  for r in rows:
    r["admissible"] = bool(r["deviation"] <= none["deviation"] + config.quality_tol and (
        not config.fd_guard or r is none or fd_holds(r, none, config)))
  best = max((r for r in rows if r["admissible"]), key=lambda r: r["psnr"])
  fell_back = best["psnr"] < none["psnr"] + config.min_gain_db
  return (none if fell_back else best), bool(fell_back)


def _per_segment(value, segments: int) -> Tuple[float, ...]:
  return tuple(value) if isinstance(value, (tuple, list)) else (value,) * segments


def _uniform(values: Tuple[float, ...]):
  """One value when every segment has it (the report's scalar form), else the tuple."""
  return values[0] if len(set(values)) == 1 else tuple(values)


def segment_strengths(value, num_steps: int, segments: int):
  """A strength (scalar) or one per segment (tuple) as what `scale_params` takes: the
  scalar, or a per-step array, segment s covering steps [s N / S, (s + 1) N / S)."""
  if not isinstance(value, (tuple, list)):
    return value
  seg = np.arange(num_steps) * segments // num_steps
  return jnp.asarray(np.asarray(value, np.float32)[seg])


def refine_segments(rows, evaluate, config: SafeConfig, segments: int) -> list:
  """Coordinate search from the best uniform strength in `rows`: each segment's gain,
  then offset, over the grid, keeping the best admissible row so far (one pass).
  `evaluate(gain, offset)` scores a strength; returns the new rows."""
  new, seen = [], {(r["gain"], r["offset"]) for r in rows}
  for seg, term in itertools.product(range(segments), ("gain", "offset")):
    best, _ = choose_strength(rows + new, config)
    current = {k: _per_segment(best[k], segments) for k in ("gain", "offset")}
    for v in config.strengths:
      cand = dict(current, **{term: current[term][:seg] + (v,) + current[term][seg + 1:]})
      key = tuple(_uniform(cand[k]) for k in ("gain", "offset"))
      if key not in seen:
        seen.add(key)
        new.append(evaluate(*key))
  return new


def _summary(report: Dict[str, Any], base: str, guard_fd: bool) -> str:
  rows = report["candidates"]
  return (f"{SAFE_METHOD}: {base} at gain {report['gain']}, offset {report['offset']} "
          f"(validation PSNR {report['val_psnr']:.2f} vs {report['val_psnr_none']:.2f} dB without"
          + (f", FD vs float {report['val_fd']:.1f} vs {report['val_fd_none']:.1f}" if guard_fd else "")
          + (f", FD no worse in {report['val_fd_share']:.0%} of resamples"
             if report.get("val_fd_share") is not None else "")
          + f"; {sum(not r['admissible'] for r in rows)} of {len(rows)} strengths ruled out by the "
          "quality guards)" + (" -- fell back to no correction" if report["fell_back"] else ""))


def split_calibration(x_T: jax.Array, key: jax.Array, val_fraction: float):
  """(x_fit, key_fit, x_val, key_val): disjoint seeds, independent step noise."""
  B = x_T.shape[0]
  n_val = int(round(B * val_fraction))
  if B < 2 or not 1 <= n_val < B:
    raise ValueError(f"{SAFE_METHOD} splits the calibration seeds into a fit and a validation "
                     f"part: got {B} seed(s) with val_fraction={val_fraction}; use >= 2 seeds.")
  return x_T[:B - n_val], key, x_T[B - n_val:], jax.random.fold_in(key, 1)


def _validation_scorer(apply_q, var_q, sampler: Sampler, base: CorrectionParams, x_val, key_val,
                       x_ref, features, config: SafeConfig, segments: int):
  """evaluate(gain, offset) -> the validation row of `base` at that strength (scalars, or one
  value per segment): PSNR, contrast / sharpness ratios and deviation, FD vs float (and on
  `config.fd_resamples` paired bootstrap resamples of the validation seeds)."""
  N = sampler.coeffs.num_steps
  guard_fd = config.fd_guard
  ref_feats = features(to_host(x_ref)) if guard_fd else None
  ref_stats = frechet.gaussian_stats(ref_feats) if guard_fd else None
  resamples = (frechet.bootstrap_indices(x_val.shape[0], config.fd_resamples)
               if guard_fd and config.fd_resamples else None)

  @jax.jit
  def score(params):
    x = sample(apply_q, var_q, compensate(sampler, params), x_val, key_val)[0].x
    q = metrics.quality_ratios(x, x_ref)
    return (jnp.mean(metrics.psnr(x, x_ref)), q["std_ratio"], q["sharpness_ratio"],
            jnp.all(jnp.isfinite(x)), x)

  def evaluate(gain, offset):
    *scores, x = score(scale_params(base, segment_strengths(gain, N, segments),
                                    segment_strengths(offset, N, segments)))
    psnr, std_r, sharp_r, finite = (float(to_host(v)) for v in scores)
    fd, fd_resampled = float("nan"), None
    if guard_fd and not finite:
      fd = float("inf")
      fd_resampled = None if resamples is None else np.full(len(resamples), np.inf)
    elif guard_fd:
      feats = features(to_host(x))
      fd = frechet.frechet_distance_from_stats(*frechet.gaussian_stats(feats), *ref_stats)
      if resamples is not None:
        fd_resampled = frechet.resampled_distances(feats, ref_feats, resamples)
    return {"gain": gain, "offset": offset, "psnr": psnr if finite else float("-inf"),
            "std_ratio": std_r, "sharpness_ratio": sharp_r, "fd_vs_float": fd,
            "fd_resampled": fd_resampled,
            "deviation": quality_deviation(std_r, sharp_r) if finite else float("inf")}

  return evaluate


def calibrate_safe(apply_fp: ApplyFn, var_fp, apply_q: ApplyFn, var_q, sampler: Sampler,
                   x_T: jax.Array, key: jax.Array, config: SafeConfig = SafeConfig(),
                   phi: Optional[jax.Array] = None, schedule: Optional[Schedule] = None,
                   log=None, features: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                   ) -> Tuple[CorrectionParams, Dict[str, Any]]:
  """Fits `config.base` on part of the calibration seeds and picks its strength on the rest.

  Args: as `calibrate`, plus `config` (SafeConfig), `log` (a print-like callable) and
    `features` (host images [B, H, W, C] -> features [B, D] for the FD guard; default
    `metrics.frechet.coarse_features`, which works for any image or latent shape).
  Returns:
    (params, report): the correction at the chosen strength (all zeros when it fell back)
    and a dict with the chosen `gain` / `offset` (scalars, or tuples with one value per
    segment of steps when `config.segments` > 1 found a better non-uniform one),
    `fell_back`, the validation PSNR and FD of no correction and of the choice, and every
    candidate's scores.
  """
  check_calibration_noise(x_T)
  x_fit, key_fit, x_val, key_val = split_calibration(x_T, key, config.val_fraction)
  fit = jax.jit(functools.partial(calibrate, apply_fp, var_fp, apply_q, var_q, sampler,
                                  fit=config.base, phi=phi, check_finite=False, schedule=schedule))
  base = fit(x_fit, key_fit)
  x_ref = jax.jit(lambda x, k: sample(apply_fp, var_fp, sampler, x, k)[0].x)(x_val, key_val)

  guard_fd = config.fd_guard
  N, segments = sampler.coeffs.num_steps, min(config.segments, sampler.coeffs.num_steps)
  evaluate = _validation_scorer(apply_q, var_q, sampler, base, x_val, key_val, x_ref,
                                features or frechet.coarse_features, config, segments)
  rows = [evaluate(g, o) for g, o in itertools.product(config.strengths, config.strengths)]
  if segments > 1:
    rows += refine_segments(rows, evaluate, config, segments)
  chosen, fell_back = choose_strength(rows, config)
  none = next(r for r in rows if r["gain"] == 0 and r["offset"] == 0)
  report = {"base": config.base, "gain": chosen["gain"], "offset": chosen["offset"],
            "fell_back": fell_back, "val_psnr_none": none["psnr"],
            "val_psnr": chosen["psnr"], "val_fd_none": none["fd_vs_float"],
            "val_fd": chosen["fd_vs_float"], "num_fit": int(x_fit.shape[0]),
            "num_val": int(x_val.shape[0]), "val_fd_share": _fd_share(chosen, none, config),
            "candidates": rows}
  if log is not None:
    log(_summary(report, config.base, guard_fd))
  return scale_params(base, segment_strengths(chosen["gain"], N, segments),
                      segment_strengths(chosen["offset"], N, segments)), report
