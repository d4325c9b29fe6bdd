"""Rectified flow (flow matching): schedules, Euler and Heun samplers, training loss.

The forward process interpolates data and noise linearly in s in [0, 1],

    x_s = (1 - s) x0 + s eps,        v = dx_s / ds = eps - x0,

and the network predicts the velocity v(x_s, t) at the timestep t = s T (T =
num_train_timesteps, a *float*: diffusers passes sigma * 1000). Sampling integrates
dx/ds = v from s = 1 to 0 over diffusers' FlowMatchEulerDiscreteScheduler sigmas
s_0 = 1 > s_1 > ... > s_{N-1} > s_N = 0, shifted by

    s' = shift s / (1 + (shift - 1) s)       (static shift, SD3 uses 3.0)
    s' = e^mu / (e^mu + 1/s - 1)             (dynamic shifting with mu, 'exponential')

Euler is affine with the package's step form (sigma = 0):

    x_{i+1} = x_i + (s_{i+1} - s_i) v_i,       a_i = 1, b_i = s_{i+1} - s_i.

Heun (FlowMatchHeunDiscreteScheduler) interleaves 2N - 1 network calls: a predictor at
even scan positions (the Euler step) and, for all but the last interval, a corrector at odd
ones that averages the two velocities, x_{i+1} = x_{i-1} + dt (v_{i-1} + v_i) / 2: a
multistep step (multistep.py) with a = 0, b = c = dt / 2, d = 1.

Timesteps: the network is called with the float timestep s_i T, which the sampler's
`prepare(state, i)` returns as (x_i, float32 scalar). `coeffs.t` holds round(s_i T) as
int32 for bookkeeping only (calibration batches, correction params, logs), since
`StepCoeffs.t` is an int32 array everywhere else; never feed it to a flow network.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from tac_jax.diffusion.multistep import multistep_coeffs, multistep_sampler
from tac_jax.diffusion.samplers import ApplyFn, Sampler, StepCoeffs, affine_sampler
from tac_jax.diffusion.schedules import check_num_steps
from tac_jax.validate import is_integer


class FlowConfig(NamedTuple):
  """What a flow-matching model was trained with, in place of a DDPM `Schedule`: the
  timestep scale T (the network sees s T) and the sampling grid's default `shift`."""
  num_train_timesteps: int = 1000
  shift: float = 1.0

  @property
  def num_timesteps(self) -> int:
    """T + 1: network timesteps lie in [0, T] (s = 1 gives T), the range PTQ checks and
    splits into timestep groups."""
    return self.num_train_timesteps + 1

  def to_dict(self):
    return {"num_train_timesteps": int(self.num_train_timesteps), "shift": float(self.shift)}


def flow_config(num_train_timesteps: int = 1000, shift: float = 1.0) -> FlowConfig:
  """A checked FlowConfig (ValueError naming the bad argument)."""
  _check_flow_args(shift, num_train_timesteps, None)
  return FlowConfig(int(num_train_timesteps), float(shift))


class FlowSchedule(NamedTuple):
  """A flow sampler's grid, float32 as diffusers keeps it."""
  timesteps: np.ndarray  # [N] network timesteps s_i T, descending
  sigmas: np.ndarray     # [N + 1] shifted, s_0 = 1 > ... > s_{N-1} > s_N = 0


def _check_flow_args(shift, num_train_timesteps, mu) -> None:
  if (isinstance(shift, bool) or not isinstance(shift, (int, float, np.floating))
      or not math.isfinite(shift) or shift <= 0):
    raise ValueError(f"shift must be a finite number > 0, got {shift!r}.")
  if not is_integer(num_train_timesteps) or num_train_timesteps < 2:
    raise ValueError(f"num_train_timesteps must be an integer >= 2, got "
                     f"{num_train_timesteps!r}.")
  if mu is not None:
    if not (isinstance(mu, (int, float, np.floating)) and math.isfinite(mu)):
      raise ValueError(f"mu must be a finite number (or None), got {mu!r}.")
    if shift != 1.0:
      raise ValueError(f"mu (dynamic shifting) replaces the static shift: pass shift=1.0, "
                       f"got shift={shift}.")


def _shift(s, shift):
  return shift * s / (1 + (shift - 1) * s)


def flow_sigmas(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000,
                mu: Optional[float] = None) -> FlowSchedule:
  """FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift).set_timesteps(num_steps).

  As diffusers does: the training grid s = (T, ..., 1) / T is shifted once (float32) to
  give s_max = 1 and s_min = shift(1/T); N timesteps are spaced linearly from s_max T to
  s_min T and shifted again. `mu` is `use_dynamic_shifting=True` with
  `set_timesteps(mu=mu)` (exponential time shift; the training grid is then unshifted).
  The defaults are diffusers' defaults (shift 1, no dynamic shifting, T = 1000).
  """
  _check_flow_args(shift, num_train_timesteps, mu)
  check_num_steps(num_steps)   # may exceed T: flow time is continuous (as in diffusers)
  T = num_train_timesteps
  train = np.array([T, 1], np.float32) / T            # ends of the training grid, float32
  if mu is None:
    train = _shift(train, float(shift))               # still float32 (NEP 50), as in torch
  s_max, s_min = (float(v) for v in train)
  s = np.linspace(s_max * T, s_min * T, num_steps) / T
  if mu is None:
    s = _shift(s, float(shift))
  else:
    s = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
  s = s.astype(np.float32)
  return FlowSchedule(timesteps=s * np.float32(T), sigmas=np.concatenate([s, [np.float32(0)]]))


def _int_timesteps(timesteps) -> jax.Array:
  return jnp.asarray(np.rint(np.asarray(timesteps, np.float64)), jnp.int32)


def with_float_timesteps(sampler: Sampler, timesteps) -> Sampler:
  """The sampler whose network input at scan position i is (x_i, timesteps[i]) with a
  float32 timestep (diffusers' flow convention) instead of the int32 coeffs.t[i]."""
  table = jnp.asarray(np.asarray(timesteps, np.float32))

  def prepare(state, i):
    return state.x, table[i]

  return sampler._replace(prepare=prepare)


def flow_euler_coeffs(fs: FlowSchedule) -> StepCoeffs:
  """a_i = 1, b_i = s_{i+1} - s_i (float32, as diffusers' dt), sigma_i = 0."""
  b = (fs.sigmas[1:] - fs.sigmas[:-1]).astype(np.float32)
  n = b.shape[0]
  return StepCoeffs(t=_int_timesteps(fs.timesteps), a=jnp.ones((n,), jnp.float32),
                    b=jnp.asarray(b), sigma=jnp.zeros((n,), jnp.float32))


def flow_euler(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000,
               mu: Optional[float] = None) -> Sampler:
  """Euler on a flow-matching velocity network (FlowMatchEulerDiscreteScheduler).

  The network `apply(variables, x, t) -> v` gets float32 timesteps s_i T through
  `prepare`; `coeffs.t` is their rounded int32 copy (module docstring).
  """
  fs = flow_sigmas(num_steps, shift, num_train_timesteps, mu)
  return with_float_timesteps(affine_sampler(flow_euler_coeffs(fs)), fs.timesteps)


def heun_grid(fs: FlowSchedule):
  """FlowMatchHeunDiscreteScheduler's 2N - 1 network timesteps and per-position dt:
  (t_0, t_1, t_1, ..., t_{N-1}, t_{N-1}), the interval of each predictor/corrector pair."""
  ts = np.concatenate([fs.timesteps[:1], np.repeat(fs.timesteps[1:], 2)])
  dt = (fs.sigmas[1:] - fs.sigmas[:-1]).astype(np.float32)   # [N], one per interval
  return ts.astype(np.float32), dt[np.arange(ts.shape[0]) // 2]  # positions 2j, 2j+1: j


def flow_heun(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> Sampler:
  """Heun's second-order method on a velocity network (FlowMatchHeunDiscreteScheduler,
  s_churn = 0): 2 num_steps - 1 network calls, so `coeffs.num_steps` = 2 N - 1. Even scan
  positions are Euler predictors, odd ones correctors (module docstring)."""
  fs = flow_sigmas(num_steps, shift, num_train_timesteps)
  ts, dt = heun_grid(fs)
  dt = dt.astype(np.float64)
  corrector = (np.arange(ts.shape[0]) % 2 == 1)
  a = np.where(corrector, 0.0, 1.0)
  b = np.where(corrector, dt / 2, dt)
  c = np.where(corrector, dt / 2, 0.0)
  d = np.where(corrector, 1.0, 0.0)
  coeffs = multistep_coeffs(_int_timesteps(ts), a, b, c, d)
  return with_float_timesteps(multistep_sampler(coeffs), ts)


def flow_interpolate(x0: jax.Array, eps: jax.Array, s: jax.Array) -> jax.Array:
  """x_s = (1 - s) x0 + s eps, with per-sample s [B] (or a scalar)."""
  s = jnp.asarray(s, x0.dtype)
  s = s.reshape(s.shape + (1,) * (x0.ndim - s.ndim))
  return (1 - s) * x0 + s * eps


def flow_matching_loss(apply_fn: ApplyFn, variables, x0: jax.Array, key: jax.Array,
                       num_train_timesteps: int = 1000) -> jax.Array:
  """Conditional flow-matching loss E ||v(x_s, s T) - (eps - x0)||^2 (a scalar), pure.

  `key` splits into (k_s, k_eps): s ~ U[0, 1) per sample from k_s, eps ~ N(0, I) like x0
  from k_eps; the network is called as `apply_fn(variables, x_s, s * T)` with float32
  timesteps, as the flow samplers call it.
  """
  k_s, k_eps = jax.random.split(key)
  s = jax.random.uniform(k_s, (x0.shape[0],), jnp.float32)
  eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
  v = apply_fn(variables, flow_interpolate(x0, eps, s), s * num_train_timesteps)
  return jnp.mean(jnp.square(v - (eps - x0)))


# ----------------------------------------------------------------------------- other conventions

NOISE_ENDS = (1, 0)
VELOCITIES = ("noise_minus_data", "data_minus_noise")


@dataclasses.dataclass(frozen=True)
class FlowConvention:
  """A velocity network of another time convention, seen in this module's: the sampler
  calls `apply(variables, x, t)` with t = s T (noise at s = 1, velocity eps - x0), and the
  wrapped `module.apply` gets the time it was trained with,

      tau = s * time_scale         (noise_at=1: noise at tau = time_scale, as diffusers)
      tau = (1 - s) * time_scale   (noise_at=0: data at tau = time_scale, e.g. torchcfm)

  and its output is negated when it predicts data - noise. Hashable and compared by value
  (a static argument of jitted code), so PTQ and the samplers treat it as the module."""
  module: Any
  num_train_timesteps: int = 1000
  time_scale: float = 1.0
  noise_at: int = 1
  velocity: str = "noise_minus_data"

  def model_time(self, t):
    s = jnp.asarray(t, jnp.float32) / self.num_train_timesteps
    return (s if self.noise_at == 1 else 1.0 - s) * self.time_scale

  def apply(self, variables, x, t, *args, **kwargs):
    out = self.module.apply(variables, x, self.model_time(t), *args, **kwargs)
    if self.velocity == "noise_minus_data":
      return out
    if "mutable" in kwargs:     # (output, state): PTQ's statistics passes
      return (-out[0],) + tuple(out[1:])
    return -out


def flow_model(schedule: Dict[str, Any], module):
  """(FlowConfig, module or FlowConvention) of a factory's flow declaration

      {"type": "flow", "num_train_timesteps": 1000, "shift": 1.0,       # sampling grid
       "time_scale": 1000, "noise_at": 1, "velocity": "noise_minus_data"}   # the network's

  (the last three are what the network was trained with; the defaults are diffusers'
  convention, which needs no adapter). ValueError naming a bad field."""
  d = dict(schedule)
  d.pop("type", None)
  known = ("num_train_timesteps", "shift", "time_scale", "noise_at", "velocity")
  unknown = sorted(set(d) - set(known))
  if unknown:
    raise ValueError(f"flow model declaration: unknown fields {unknown}; fields are {list(known)}.")
  cfg = flow_config(d.get("num_train_timesteps", 1000), d.get("shift", 1.0))
  scale = d.get("time_scale", cfg.num_train_timesteps)
  noise_at, velocity = d.get("noise_at", 1), d.get("velocity", VELOCITIES[0])
  if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
    raise ValueError(f"flow model declaration: time_scale must be a number > 0 (1 for time in "
                     f"[0, 1], 1000 for diffusers' timesteps), got {scale!r}.")
  if noise_at not in NOISE_ENDS or isinstance(noise_at, bool):
    raise ValueError(f"flow model declaration: noise_at must be 1 (noise at the largest time, "
                     f"as diffusers) or 0 (noise at time 0), got {noise_at!r}.")
  if velocity not in VELOCITIES:
    raise ValueError(f"flow model declaration: velocity must be one of {list(VELOCITIES)} "
                     f"(what the network predicts), got {velocity!r}.")
  if (scale, noise_at, velocity) == (cfg.num_train_timesteps, 1, VELOCITIES[0]):
    return cfg, module
  return cfg, FlowConvention(module, cfg.num_train_timesteps, float(scale), int(noise_at),
                             velocity)


def is_flow_declaration(schedule) -> bool:
  return isinstance(schedule, dict) and schedule.get("type") == "flow"
