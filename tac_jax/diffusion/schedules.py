"""Noise schedules (abar_t) and timestep subsequences for few-step sampling."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from tac_jax.validate import is_integer, is_real

SCHEDULES = ("linear", "scaled_linear", "cosine")
SPACINGS = ("uniform", "linspace", "quadratic", "leading", "trailing")
# The smallest alphas_cumprod a schedule may reach: sampler coefficients divide by sqrt(abar).
MIN_ALPHAS_CUMPROD = 1e-20


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
  """A discrete forward process: betas[t] and abar[t] = prod_{s<=t} (1 - betas[s])."""
  name: str
  betas: np.ndarray

  @property
  def num_timesteps(self) -> int:
    return int(self.betas.shape[0])

  @property
  def alphas_cumprod(self) -> np.ndarray:
    return np.cumprod(1.0 - self.betas)

  def check_timesteps(self, t) -> np.ndarray:
    t = np.asarray(t)
    if t.size and (t.min() < 0 or t.max() >= self.num_timesteps):
      raise ValueError(f"timesteps must lie in [0, {self.num_timesteps - 1}] for this "
                       f"{self.name} schedule, got range [{t.min()}, {t.max()}].")
    return t


def check_num_steps(num_steps, num_timesteps=None, bound: str = "the schedule's num_timesteps"
                    ) -> int:
  """num_steps as an int; ValueError unless it is an integer >= 1 (bools are not) and, given
  `num_timesteps` (named `bound` in the error), at most that."""
  if not is_integer(num_steps) or num_steps < 1:
    raise ValueError(f"num_steps must be an integer >= 1 (the number of sampling steps), got "
                     f"{num_steps!r}.")
  if num_timesteps is not None and num_steps > num_timesteps:
    raise ValueError(f"num_steps must be in [1, {num_timesteps}] ({bound}), got {num_steps}; "
                     "use fewer sampling steps.")
  return int(num_steps)


def check_schedule_args(name: str, num_timesteps: int, beta_start: float, beta_end: float,
                        cosine_s: float = 8e-3) -> None:
  """Raises ValueError naming the argument of `make_schedule` that cannot work."""
  if name not in SCHEDULES:
    raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}.")
  if not is_integer(num_timesteps) or num_timesteps < 2:
    raise ValueError(f"num_timesteps must be an integer >= 2 (the number of training "
                     f"timesteps, e.g. 1000), got {num_timesteps!r}.")
  for field, v in (("beta_start", beta_start), ("beta_end", beta_end), ("cosine_s", cosine_s)):
    if not (is_real(v) and math.isfinite(v)):
      raise ValueError(f"{field} must be a finite number, got {v!r}.")


def _check_betas(name, betas, hint) -> None:
  if not np.all((betas > 0) & (betas < 1)):
    raise ValueError(f"the {name} schedule's betas must lie in (0, 1), got [{betas.min():g}, "
                     f"{betas.max():g}]; {hint}.")
  abar = np.cumprod(1.0 - betas)
  if not abar[-1] >= MIN_ALPHAS_CUMPROD:
    first = int(np.argmax(~(abar >= MIN_ALPHAS_CUMPROD)))
    raise ValueError(f"the {name} schedule's alphas_cumprod falls to {abar[-1]:.3g} (below "
                     f"{MIN_ALPHAS_CUMPROD:g} from t = {first}), which makes the samplers' "
                     f"coefficients overflow; {hint}.")


def make_schedule(name: str = "linear", num_timesteps: int = 1000, beta_start: float = 1e-4,
                  beta_end: float = 0.02, cosine_s: float = 8e-3) -> Schedule:
  """`linear` (DDPM, Ho et al.), `scaled_linear` (Stable Diffusion: linear in sqrt(beta)) or
  `cosine` (Nichol & Dhariwal) schedule, float64.

  ValueError, naming the argument, for a non-integer num_timesteps (or < 2), non-finite
  betas' ends, betas outside (0, 1), or an alphas_cumprod that falls below
  MIN_ALPHAS_CUMPROD (the samplers divide by it)."""
  check_schedule_args(name, num_timesteps, beta_start, beta_end, cosine_s)
  if name == "linear":
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    hint = f"check beta_start={beta_start} and beta_end={beta_end} (DDPM uses 1e-4 and 0.02)"
  elif name == "scaled_linear":   # Stable Diffusion's: linear in sqrt(beta)
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=np.float64) ** 2
    hint = (f"check beta_start={beta_start} and beta_end={beta_end} (Stable Diffusion uses "
            "0.00085 and 0.012)")
  else:
    hint = f"check cosine_s={cosine_s} (Nichol & Dhariwal use 8e-3)"
    s = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((s + cosine_s) / (1 + cosine_s) * np.pi / 2) ** 2
    betas = np.clip(1.0 - f[1:] / f[:-1], 0.0, 0.999)
  _check_betas(name, betas, hint)
  return Schedule(name=name, betas=betas)


def timestep_subsequence(num_timesteps: int, num_steps: int, spacing: str = "uniform",
                         steps_offset: int = 0) -> np.ndarray:
  """Descending distinct timesteps t_N > ... > t_1 for an N-step sampler.

  `uniform` spaces them evenly over [0, T-1] (diffusers calls it `linspace`; both names
  work); `quadratic` (DDIM paper) crowds them near t = 0 where the images gain detail;
  `leading` and `trailing` are diffusers' spacings (for 20 of 1000: 950, 900, ..., 0 and
  999, 949, ..., 49). `leading` never starts at t = T-1, where a cosine schedule's
  abar ~ 0 makes the x0 estimate blow up. `steps_offset` shifts `leading` timesteps up, as
  diffusers' `steps_offset` does (Stable Diffusion's schedulers use 1: 951, ..., 1); the
  other spacings ignore it, as diffusers does.
  """
  check_num_steps(num_steps, num_timesteps)
  if spacing not in SPACINGS:
    raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}.")
  if int(steps_offset) != steps_offset or steps_offset < 0:
    raise ValueError(f"steps_offset must be an integer >= 0, got {steps_offset}.")
  if num_steps == 1:   # one step denoises from pure noise (diffusers' `leading` gives t = 0)
    ts = np.array([num_timesteps - 1], np.int64)
  elif spacing in ("uniform", "linspace"):
    ts = np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int64)
  elif spacing == "leading":
    ts = np.arange(num_steps, dtype=np.int64) * (num_timesteps // num_steps) + int(steps_offset)
    if ts[-1] >= num_timesteps:
      raise ValueError(f"steps_offset={steps_offset} puts the first of {num_steps} leading "
                       f"timesteps at {ts[-1]} >= T = {num_timesteps}; lower it.")
  elif spacing == "trailing":
    ts = np.round(np.arange(num_timesteps, 0, -num_timesteps / num_steps)).astype(np.int64) - 1
  elif spacing == "quadratic":
    ts = np.round(np.linspace(0, np.sqrt((num_timesteps - 1)), num_steps) ** 2).astype(np.int64)
  else:
    raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}.")
  ts = np.unique(ts)
  if ts.size != num_steps:
    raise ValueError(f"{spacing} spacing gives only {ts.size} distinct timesteps for "
                     f"num_steps={num_steps}; use uniform spacing or fewer steps.")
  return ts[::-1].copy()
