"""Timestep-aware cumulative error compensation (TCEC), DESIGN.md s.2-3.

Calibration is one jitted `lax.scan` whose carry is (float state, compensated state).
At scan position i, with eps = eps(x_fp), eps_q = eps_q(x_c) and e_i = x_c - x_fp,

    D_i = (eps_q - eps) + (a_i / b_i) e_i          (cumulative target, `tcec`)

is the noise-prediction correction that puts x_c back on the float trajectory:
a_i x_c + b_i (eps_q - D_i) = a_i x_fp + b_i eps. It is fitted per channel by closed-form
least squares, D_i ~ K_i eps_q + beta_i, from sufficient statistics (sums, so they can be
reduced across devices), applied, and both trajectories advance.

Online, a compensator wraps any affine sampler step:

    d_hat = K_i eps_q + beta_i
    x     = a_i x + b_i (eps_q - d_hat) (+ sigma_i z_i)
    e_hat = phi_i e_hat + b_i d_hat         # ErrorState: error plain PTQ would accumulate

Variants (one code path): `none` (identity), `ptqd` (same-input target, one scale per
tensor, no intercept, fitted on uncompensated trajectories), `per_step` (same-input
target, per channel with intercept, uncompensated trajectories) and `tcec` (cumulative
target, per channel with intercept, sequential).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from tac_jax import checkpoint as ckpt_lib
from tac_jax.diffusion.samplers import ApplyFn, Sampler, batch_timestep
from tac_jax.quant import observers


@dataclasses.dataclass(frozen=True)
class FitConfig:
  """How a correction is fitted. `VARIANTS` names the presets."""
  target: str = "cumulative"      # 'cumulative' (D_i) or 'same_input' (d_i = eps_q(x_c) - eps(x_c))
  sequential: bool = True         # fit on trajectories already compensated at earlier steps
  per_channel: bool = True        # one (K, beta) per channel, else one per tensor
  intercept: bool = True          # fit beta (else beta = 0)
  ridge: float = 1e-6             # relative Tikhonov term on var(eps_q)

  def __post_init__(self):
    if self.target not in ("cumulative", "same_input"):
      raise ValueError(f"target must be 'cumulative' or 'same_input', got {self.target!r}.")


VARIANTS: Dict[str, Optional[FitConfig]] = {
    "none": None,
    "ptqd": FitConfig(target="same_input", sequential=False, per_channel=False, intercept=False),
    "per_step": FitConfig(target="same_input", sequential=False, per_channel=True, intercept=True),
    "tcec": FitConfig(target="cumulative", sequential=True, per_channel=True, intercept=True),
}


def get_fit_config(variant: str) -> Optional[FitConfig]:
  if variant not in VARIANTS:
    raise ValueError(f"unknown compensation variant {variant!r}; choose one of {list(VARIANTS)}.")
  return VARIANTS[variant]


@flax.struct.dataclass
class TCECParams:
  """Per-step, per-channel correction d_hat = K eps_q + beta, and propagation gains phi."""
  K: jax.Array          # [N, C]
  beta: jax.Array       # [N, C]
  phi: jax.Array        # [N, C]
  timesteps: jax.Array  # [N] the sampler's t_k the params were fitted for

  @property
  def num_steps(self) -> int:
    return int(self.K.shape[0])

  @property
  def num_channels(self) -> int:
    return int(self.K.shape[1])


def zero_params(num_steps: int, channels: int, timesteps, phi=None) -> TCECParams:
  z = jnp.zeros((num_steps, channels), jnp.float32)
  return TCECParams(K=z, beta=z, phi=z if phi is None else jnp.asarray(phi, jnp.float32),
                    timesteps=jnp.asarray(timesteps, jnp.int32))


# ----------------------------------------------------------------------------- least squares

class AffineStats(NamedTuple):
  """Sufficient statistics of y ~ K x + beta, per channel: sums over samples."""
  n: jax.Array
  sx: jax.Array
  sy: jax.Array
  sxx: jax.Array
  sxy: jax.Array


def affine_stats(x: jax.Array, y: jax.Array, per_channel: bool = True) -> AffineStats:
  axes = tuple(range(x.ndim - 1)) if per_channel else tuple(range(x.ndim))
  n = jnp.asarray(np.prod([x.shape[a] for a in axes]), jnp.float32)
  s = lambda v: jnp.sum(v, axis=axes)
  return AffineStats(n=jnp.broadcast_to(n, s(x).shape), sx=s(x), sy=s(y), sxx=s(x * x), sxy=s(x * y))


def solve_affine(st: AffineStats, intercept: bool = True, ridge: float = 1e-6):
  """Closed-form least squares (K, beta) from sufficient statistics."""
  if intercept:
    mx, my = st.sx / st.n, st.sy / st.n
    var = st.sxx / st.n - mx * mx
    cov = st.sxy / st.n - mx * my
    k = cov / (var * (1 + ridge) + 1e-20)
    return k, my - k * mx
  k = st.sxy / (st.sxx * (1 + ridge) + 1e-20)
  return k, jnp.zeros_like(k)


# ----------------------------------------------------------------------------- calibration

def check_calibration_noise(x_T):
  if x_T.ndim < 2 or x_T.shape[0] == 0:
    raise ValueError(f"calibration needs at least one sample: got x_T of shape {x_T.shape}.")
  observers.check_calibration_data(x_T, "calibration starting noise x_T")


def calibrate(apply_fp: ApplyFn, var_fp, apply_q: ApplyFn, var_q, sampler: Sampler,
              x_T: jax.Array, key: jax.Array, fit: FitConfig | str = "tcec",
              phi: Optional[jax.Array] = None, check_finite: bool = True) -> TCECParams:
  """Fits the correction step by step in one `lax.scan` (jit it at the call site)."""
  check_calibration_noise(x_T)
  if isinstance(fit, str):
    fit = get_fit_config(fit)
    if fit is None:
      return zero_params(sampler.coeffs.num_steps, x_T.shape[-1], sampler.coeffs.t, phi)
  c = sampler.coeffs
  C = x_T.shape[-1]

  def body(carry, i):
    s_fp, s_c = carry
    t = batch_timestep(c.t[i], x_T)
    eps_q = apply_q(var_q, s_c.x, t)
    if fit.target == "cumulative":
      eps = apply_fp(var_fp, s_fp.x, t)
      target = (eps_q - eps) + (c.a[i] / c.b[i]) * (s_c.x - s_fp.x)
      s_fp = sampler.step(s_fp, eps, i)
    else:
      target = eps_q - apply_fp(var_fp, s_c.x, t)
    k, beta = solve_affine(affine_stats(eps_q, target, fit.per_channel), fit.intercept, fit.ridge)
    k, beta = jnp.broadcast_to(k, (C,)), jnp.broadcast_to(beta, (C,))
    s_c = sampler.step(s_c, eps_q - (k * eps_q + beta) if fit.sequential else eps_q, i)
    bad = ~jnp.all(jnp.isfinite(target))
    return (s_fp, s_c), (k, beta, bad)

  init = (sampler.init(x_T, key), sampler.init(x_T, key))
  _, (K, beta, bad) = jax.lax.scan(body, init, jnp.arange(c.num_steps))
  if check_finite and not isinstance(bad, jax.core.Tracer) and bool(jnp.any(bad)):
    raise ValueError("calibration trajectories contain NaN/inf (first bad step "
                     f"{int(jnp.argmax(bad))}); check the quantized model and the input noise.")
  phi = c.a[:, None] * jnp.ones((1, C)) if phi is None else phi
  return TCECParams(K=K, beta=beta, phi=jnp.asarray(phi, jnp.float32), timesteps=c.t)


def check_params_finite(params: TCECParams, where: str = "calibration") -> TCECParams:
  """Raises ValueError when fitted K / beta hold NaN/inf (for jitted calibrations, whose
  in-scan check cannot raise)."""
  if not (np.all(np.isfinite(np.asarray(params.K))) and np.all(np.isfinite(np.asarray(params.beta)))):
    raise ValueError(f"{where} produced NaN/inf parameters; check the quantized model and the "
                     "input noise.")
  return params


# ----------------------------------------------------------------------------- online use

class ErrorState(NamedTuple):
  e_hat: jax.Array        # closed-form estimate of the error plain PTQ would accumulate


class CompensatedState(NamedTuple):
  inner: Any
  error: ErrorState

  @property
  def x(self):
    return self.inner.x


def check_params(params: TCECParams, sampler: Sampler, channels: Optional[int] = None) -> None:
  n = sampler.coeffs.num_steps
  if params.K.shape[0] != n:
    raise ValueError(f"TCEC params were fitted for {params.K.shape[0]} sampler steps but the "
                     f"sampler runs {n}; calibrate for this sampler.")
  if not isinstance(params.timesteps, jax.core.Tracer) and not np.array_equal(
      np.asarray(params.timesteps), np.asarray(sampler.coeffs.t)):
    raise ValueError("TCEC params were fitted for different timesteps than this sampler's; "
                     "calibrate with the same schedule, step count and spacing.")
  if channels is not None and params.K.shape[1] != channels:
    raise ValueError(f"TCEC params have {params.K.shape[1]} channels but the samples have "
                     f"{channels}; they were fitted for another model.")


def compensate(sampler: Sampler, params: Optional[TCECParams]) -> Sampler:
  """Wraps a sampler so each step corrects eps_q; `params=None` is the identity (`none`)."""
  c = sampler.coeffs
  if params is not None:
    check_params(params, sampler)

  def init(x_T, key):
    if params is not None:
      check_params(params, sampler, x_T.shape[-1])
    return CompensatedState(sampler.init(x_T, key), ErrorState(jnp.zeros_like(x_T)))

  def step(state: CompensatedState, eps_q, i):
    if params is None:
      return CompensatedState(sampler.step(state.inner, eps_q, i), state.error)
    d_hat = params.K[i] * eps_q + params.beta[i]
    inner = sampler.step(state.inner, eps_q - d_hat, i)
    e_hat = params.phi[i] * state.error.e_hat + c.b[i] * d_hat
    return CompensatedState(inner, ErrorState(e_hat))

  return Sampler(coeffs=c, init=init, step=step)


# ----------------------------------------------------------------------------- persistence

def save_params(directory: str, params: TCECParams, meta: Optional[Dict[str, Any]] = None) -> str:
  directory = os.path.abspath(directory)
  tree = {"K": params.K, "beta": params.beta, "phi": params.phi, "timesteps": params.timesteps}
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(directory, "tcec"), jax.device_get(tree), force=True)
  ckptr.wait_until_finished()
  ckpt_lib.write_json_atomic(os.path.join(directory, "tcec.json"),
                             {"num_steps": params.num_steps, "channels": params.num_channels,
                              **(meta or {})})
  return directory


def load_params(directory: str, sampler: Optional[Sampler] = None,
                channels: Optional[int] = None) -> TCECParams:
  """Loads TCECParams; validates shapes (and against `sampler` / `channels` if given)."""
  directory = os.path.abspath(directory)
  path = os.path.join(directory, "tcec")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no TCEC params at {directory} (missing tcec/); run calibration first.")
  try:
    tree = ocp.StandardCheckpointer().restore(path)
  except Exception as e:
    raise ValueError(f"could not read TCEC params from {path}: {type(e).__name__}: {e}") from e
  if set(tree) != {"K", "beta", "phi", "timesteps"}:
    raise ValueError(f"corrupt TCEC params at {path}: keys {sorted(tree)}.")
  n, ch = tree["K"].shape
  for name in ("beta", "phi"):
    if tree[name].shape != (n, ch):
      raise ValueError(f"corrupt TCEC params: {name} has shape {tree[name].shape}, want {(n, ch)}.")
  if tree["timesteps"].shape != (n,):
    raise ValueError(f"corrupt TCEC params: timesteps shape {tree['timesteps'].shape}, want {(n,)}.")
  params = TCECParams(**{k: jnp.asarray(v) for k, v in tree.items()})
  if sampler is not None:
    check_params(params, sampler, channels)
  elif channels is not None and ch != channels:
    raise ValueError(f"TCEC params have {ch} channels, expected {channels}.")
  return params
