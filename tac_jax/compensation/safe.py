"""The library's default, `tcec_safe`: a fitted correction whose strength is chosen on
held-out calibration seeds, so it cannot do worse than no correction there.

The calibration seeds are split into a fit half and a validation half; each base method
(`SafeConfig.bases`, default tcec and TAC-Diffusion's IBC + NER) is fitted on the first; on the second, every strength
(gain term, offset term) on a grid -- (0, 0), no correction, included -- is sampled and
scored by the final-sample PSNR against the float model. A strength is admissible only if
its samples are (a) no further in contrast and sharpness from the float model's than
plain PTQ's (beyond a tolerance) and (b) no further in distribution: their Frechet
distance to the float model's validation samples, in a feature space the caller gives
(`SafeConfig.features`; the shipped classifier's in the launchers, coarse pixels
otherwise), is at most `1 + fd_tol` times plain PTQ's -- in at least `fd_confidence` of
paired bootstrap resamples of its seeds, because an FD of a few dozen samples is noisy.
PSNR alone can be bought with blur; (a) and (b) stop that. Unless the best admissible
strength beats no correction by `min_gain_db`, the result is no correction (a fallback
the report states). Nothing here looks at evaluation seeds.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from tac_jax import metrics
from tac_jax.compensation import registry
from tac_jax.compensation.calibrate import fit_scan
from tac_jax.compensation.params import CorrectionParams, scale_params
from tac_jax.compensation.scan import (FitContext, check_calibration_noise, float_reference,
                                      split_calibration)
from tac_jax.diffusion.samplers import sample
from tac_jax.host import to_host
from tac_jax.metrics import frechet

SAFE_METHOD = registry.DEFAULT_METHOD


@dataclasses.dataclass(frozen=True)
class SafeConfig:
  """How `tcec_safe` validates a correction (its options)."""
  bases: Tuple[str, ...] = ("tcec", "tac")    # fitted methods whose strengths are searched
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
  features: Optional[Callable[[np.ndarray], np.ndarray]] = dataclasses.field(
      default=None, compare=False)            # images -> FD features (default coarse pixels)

  def __post_init__(self):
    if isinstance(self.bases, str):
      object.__setattr__(self, "bases", tuple(b.strip() for b in self.bases.split(",") if b.strip()))
    if not self.bases or any(b in (SAFE_METHOD, "none") for b in self.bases):
      raise ValueError(f"SafeConfig.bases must name fitted methods, got {self.bases!r}.")
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


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One validated strength of one base method."""
  base: str
  gain: object                   # a scalar, or one value per segment of steps
  offset: object
  psnr: float
  std_ratio: float
  sharpness_ratio: float
  deviation: float               # |log std ratio| + |log sharpness ratio| (inf: not finite)
  fd_vs_float: float = float("nan")
  fd_resampled: Optional[np.ndarray] = dataclasses.field(default=None, compare=False)

  @property
  def is_none(self) -> bool:
    return self.gain == 0 and self.offset == 0


@dataclasses.dataclass(frozen=True)
class SafeReport:
  """What `tcec_safe` chose and why."""
  base: str
  gain: object
  offset: object
  fell_back: bool
  val_psnr_none: float
  val_psnr: float
  val_fd_none: float
  val_fd: float
  num_fit: int
  num_val: int
  val_fd_share: Optional[float]
  ruled_out: int                      # strengths ruled out by the quality guards
  candidates: Tuple[Candidate, ...] = dataclasses.field(default=(), repr=False)

  def to_json(self) -> dict:
    """The report without its candidates, as results.json stores it."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "candidates"}

  def summary(self) -> str:
    fd = self.val_fd_share
    return (f"{SAFE_METHOD}: {self.base} at gain {self.gain}, offset {self.offset} (validation "
            f"PSNR {self.val_psnr:.2f} vs {self.val_psnr_none:.2f} dB without"
            + (f", FD vs float {self.val_fd:.1f} vs {self.val_fd_none:.1f}"
               if np.isfinite(self.val_fd_none) else "")
            + (f", FD no worse in {fd:.0%} of resamples" if fd is not None else "")
            + f"; {self.ruled_out} of {len(self.candidates)} strengths ruled out by the quality "
            "guards)" + (" -- fell back to no correction" if self.fell_back else ""))


def quality_deviation(std_ratio, sharpness_ratio) -> float:
  """How far contrast and sharpness are from the float model's (0 = equal; inf when a
  candidate's samples are flat or not finite)."""
  ratios = np.asarray([std_ratio, sharpness_ratio], np.float64)
  if not np.all(np.isfinite(ratios) & (ratios > 0)):
    return float("inf")
  return float(np.sum(np.abs(np.log(ratios))))


def fd_share(row: Candidate, none: Candidate, config: SafeConfig) -> Optional[float]:
  """Share of the paired resamples in which `row`'s FD vs float is at most (1 + fd_tol) x
  no correction's (None when the rows carry no resamples)."""
  if row.fd_resampled is None or none.fd_resampled is None:
    return None
  return float(np.mean(row.fd_resampled <= none.fd_resampled * (1 + config.fd_tol)))


def fd_holds(row: Candidate, none: Candidate, config: SafeConfig) -> bool:
  """Whether `row`'s FD vs float is at most (1 + fd_tol) x no correction's: in at least
  `fd_confidence` of the paired resamples when the rows carry them, else as drawn."""
  share = fd_share(row, none, config)
  if share is not None:
    return share >= config.fd_confidence
  return bool(row.fd_vs_float <= none.fd_vs_float * (1 + config.fd_tol))


def admissible(row: Candidate, none: Candidate, config: SafeConfig) -> bool:
  """Contrast / sharpness deviation at most no correction's + `quality_tol`, and (with
  `fd_guard`) `fd_holds`."""
  return bool(row.deviation <= none.deviation + config.quality_tol and (
      not config.fd_guard or row is none or fd_holds(row, none, config)))


def choose_strength(rows, config: SafeConfig) -> Tuple[Candidate, bool]:
  """(chosen row, fell_back) among validation `rows` (one of them no correction): the best
  admissible PSNR wins unless it beats no correction by less than `min_gain_db`."""
  none = next(r for r in rows if r.is_none)
  best = max((r for r in rows if admissible(r, none, config)), key=lambda r: r.psnr)
  fell_back = best.psnr < none.psnr + config.min_gain_db
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
  `evaluate(gain, offset)` scores a strength of the chosen row's base; returns new rows."""
  new, seen = [], {(r.base, r.gain, r.offset) for r in rows}
  for seg, term in itertools.product(range(segments), ("gain", "offset")):
    best, _ = choose_strength(rows + new, config)
    current = {k: _per_segment(getattr(best, k), segments) for k in ("gain", "offset")}
    for v in config.strengths:
      cand = dict(current, **{term: current[term][:seg] + (v,) + current[term][seg + 1:]})
      key = tuple(_uniform(cand[k]) for k in ("gain", "offset"))
      if (best.base,) + key not in seen:
        seen.add((best.base,) + key)
        new.append(evaluate(best.base, *key))
  return new


class _Scorer:
  """evaluate(base, gain, offset) -> the validation Candidate of that base's fitted params
  at that strength: PSNR, contrast / sharpness ratios and deviation, FD vs float (and on
  `config.fd_resamples` paired bootstrap resamples of the validation seeds)."""

  def __init__(self, ctx: FitContext, fitted, x_val, key_val, x_ref):
    config: SafeConfig = ctx.options
    self.ctx, self.fitted, self.config = ctx, fitted, config
    self.segments = min(config.segments, ctx.sampler.coeffs.num_steps)
    self.features = config.features or frechet.coarse_features
    self.ref_feats = self.features(to_host(x_ref)) if config.fd_guard else None
    self.ref_stats = frechet.gaussian_stats(self.ref_feats) if config.fd_guard else None
    self.resamples = (frechet.bootstrap_indices(x_val.shape[0], config.fd_resamples)
                      if config.fd_guard and config.fd_resamples else None)
    q, sampler = ctx.q, ctx.sampler

    def score(base_params, online):   # static on `online`: bases applied alike share one program
      s = online(sampler, base_params, q)
      x = sample(q.apply, q.variables, s, x_val, key_val)[0].x
      r = metrics.quality_ratios(x, x_ref)
      return (jnp.mean(metrics.psnr(x, x_ref)), r["std_ratio"], r["sharpness_ratio"],
              jnp.all(jnp.isfinite(x)), x)

    self.score = jax.jit(score, static_argnums=1)

  def params(self, base, gain, offset) -> CorrectionParams:
    N = self.ctx.sampler.coeffs.num_steps
    return scale_params(self.fitted[base], segment_strengths(gain, N, self.segments),
                        segment_strengths(offset, N, self.segments))

  def __call__(self, base, gain, offset) -> Candidate:
    *scores, x = self.score(self.params(base, gain, offset), registry.get(base).online)
    psnr, std_r, sharp_r, finite = (float(to_host(v)) for v in scores)
    fd, resampled = float("nan"), None
    if self.config.fd_guard and not finite:
      fd = float("inf")
      resampled = None if self.resamples is None else np.full(len(self.resamples), np.inf)
    elif self.config.fd_guard:
      feats = self.features(to_host(x))
      fd = frechet.frechet_distance_from_stats(*frechet.gaussian_stats(feats), *self.ref_stats)
      if self.resamples is not None:
        resampled = frechet.resampled_distances(feats, self.ref_feats, self.resamples)
    return Candidate(base, gain, offset, psnr if finite else float("-inf"), std_r, sharp_r,
                     quality_deviation(std_r, sharp_r) if finite else float("inf"), fd, resampled)


def _fit_bases(ctx: FitContext, x_fit, key_fit, phi):
  out = {}
  for base in ctx.options.bases:
    m = registry.get(base)
    if (m.fit is None and m.run is not None) or m.online is not registry.plain_online:
      raise ValueError(f"{SAFE_METHOD} can search the strength of per-step methods applied by "
                       f"`compensate` (tcec, tac, ptqd, ...), not {base!r}.")
    run = jax.jit(lambda fp, q, x, k, p, b=base: fit_scan(fp, q, ctx.sampler, x, k, b, None, p).params)
    out[base] = run(ctx.fp, ctx.q, x_fit, key_fit, phi)
  return out


def safe_run(ctx: FitContext, x_T, key, phi) -> Tuple[CorrectionParams, SafeReport]:
  """Fits each base on part of the calibration seeds and picks one and its strength on
  the rest (the `run` of the registered `tcec_safe`)."""
  config: SafeConfig = ctx.options
  check_calibration_noise(x_T)
  x_fit, key_fit, x_val, key_val = split_calibration(x_T, key, config.val_fraction)
  fitted = _fit_bases(ctx, x_fit, key_fit, phi)
  fp, sampler = ctx.fp, ctx.sampler
  x_ref = float_reference(fp, sampler, x_val, key_val)
  evaluate = _Scorer(ctx, fitted, x_val, key_val, x_ref)
  none = evaluate(config.bases[0], 0.0, 0.0)
  rows = [none] + [evaluate(b, g, o) for b in config.bases
                   for g, o in itertools.product(config.strengths, config.strengths) if g or o]
  if evaluate.segments > 1:
    rows += refine_segments(rows, evaluate, config, evaluate.segments)
  chosen, fell_back = choose_strength(rows, config)
  report = SafeReport(
      base=chosen.base, gain=chosen.gain, offset=chosen.offset, fell_back=fell_back,
      val_psnr_none=none.psnr, val_psnr=chosen.psnr, val_fd_none=none.fd_vs_float,
      val_fd=chosen.fd_vs_float, num_fit=int(x_fit.shape[0]), num_val=int(x_val.shape[0]),
      val_fd_share=fd_share(chosen, none, config),
      ruled_out=sum(not admissible(r, none, config) for r in rows), candidates=tuple(rows))
  return evaluate.params(chosen.base, chosen.gain, chosen.offset), report


registry.register(registry.Method(
    SAFE_METHOD, "the default: tcec or tac at the strength validated on held-out calibration "
    "seeds, no correction when nothing is safely better", run=safe_run,
    options=SafeConfig(), calibration_calls=2, multistep=True))
