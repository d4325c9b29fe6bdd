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

Variants (one code path): `none` (identity); `ptqd` (PTQD-style: same-input target, one
scale per tensor, no intercept, fitted on uncompensated trajectories; the residual's
variance is absorbed into the sampler noise of stochastic samplers); `per_step`
(same-input target, per channel with intercept, uncompensated trajectories); `tcec`
(cumulative target, per channel with intercept, sequential); `tcec_ehat` (`tcec` plus the
carried error estimate e_hat as a regressor, D ~ K eps_q + G e_hat + beta, a 3x3 solve
per channel and step).
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
from tac_jax.host import to_host
from tac_jax.diffusion.samplers import ApplyFn, Sampler, batch_timestep, step_noise
from tac_jax.quant import observers


@dataclasses.dataclass(frozen=True)
class FitConfig:
  """How a correction is fitted. `VARIANTS` names the presets."""
  target: str = "cumulative"      # 'cumulative' (D_i) or 'same_input' (d_i = eps_q(x_c) - eps(x_c))
  sequential: bool = True         # fit on trajectories already compensated at earlier steps
  per_channel: bool = True        # one (K, beta) per channel, else one per tensor
  intercept: bool = True          # fit beta (else beta = 0)
  ridge: float = 1e-6             # relative Tikhonov term on var(eps_q)
  e_hat_regressor: bool = False   # also regress on the carried error estimate (G e_hat)
  absorb_variance: bool = False   # PTQD: fit the part correlated with the float output, and
                                  # lower the sampler noise by the variance of the rest

  def __post_init__(self):
    if self.target not in TARGETS:
      raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}.")
    if self.e_hat_regressor and not (self.per_channel and self.intercept):
      raise ValueError("e_hat_regressor needs per_channel=True and intercept=True.")


TARGETS = ("cumulative", "same_input")


VARIANTS: Dict[str, Optional[FitConfig]] = {
    "none": None,
    "per_step": FitConfig(target="same_input", sequential=False, per_channel=True, intercept=True),
    "tcec": FitConfig(target="cumulative", sequential=True, per_channel=True, intercept=True),
    "ptqd": FitConfig(target="same_input", sequential=False, per_channel=False, intercept=False,
                      absorb_variance=True),
    "tcec_ehat": FitConfig(target="cumulative", sequential=True, per_channel=True,
                           intercept=True, e_hat_regressor=True),
}


def get_fit_config(variant: str) -> Optional[FitConfig]:
  if variant not in VARIANTS:
    raise ValueError(f"unknown compensation variant {variant!r}; choose one of {list(VARIANTS)}.")
  return VARIANTS[variant]


@flax.struct.dataclass
class TCECParams:
  """Per-step, per-channel correction d_hat = K eps_q + beta (+ G e_hat), propagation
  gains phi, and (PTQD) the residual variance absorbed into the sampler noise."""
  K: jax.Array          # [N, C]
  beta: jax.Array       # [N, C]
  phi: jax.Array        # [N, C]
  timesteps: jax.Array  # [N] the sampler's t_k the params were fitted for
  G: Optional[jax.Array] = None          # [N, C] coefficient of e_hat (tcec_ehat)
  noise_var: Optional[jax.Array] = None  # [N] residual variance of eps (ptqd)

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


def default_phi(coeffs, channels: int) -> jax.Array:
  """Propagation gains phi_i = a_i per channel (the error's own decay, Jacobian ignored)."""
  return coeffs.a[:, None] * jnp.ones((1, channels))


def _solve_with_e_hat(eps_q, e_hat, target, ridge):
  """Per-channel least squares target ~ K eps_q + G e_hat + beta (3x3 normal equations)."""
  X = jnp.stack([eps_q, e_hat, jnp.ones_like(eps_q)], axis=-1)      # [..., C, 3]
  xtx = jnp.einsum("...ci,...cj->cij", X, X)
  xty = jnp.einsum("...ci,...c->ci", X, target)
  diag = jnp.diagonal(xtx, axis1=-2, axis2=-1)
  reg = ridge * diag + 1e-12 * jnp.mean(diag) + jnp.array([0.0, 1e-9, 0.0])  # e_hat = 0 at step 0
  w = jnp.linalg.solve(xtx + jax.vmap(jnp.diag)(reg), xty[..., None])[..., 0]
  return w[:, 0], w[:, 2], w[:, 1]


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
  phi = default_phi(c, C) if phi is None else jnp.asarray(phi, jnp.float32)

  def body(carry, i):
    s_fp, s_c, e_hat = carry
    t = batch_timestep(c.t[i], x_T)
    eps_q = apply_q(var_q, s_c.x, t)
    G, rho = jnp.zeros((C,)), jnp.zeros(())
    if fit.target == "cumulative":
      eps = apply_fp(var_fp, s_fp.x, t)
      target = (eps_q - eps) + (c.a[i] / c.b[i]) * (s_c.x - s_fp.x)
      s_fp = sampler.step(s_fp, eps, i)
    else:
      eps_at_c = apply_fp(var_fp, s_c.x, t)
      target = eps_q - eps_at_c
    if fit.absorb_variance:
      # PTQD: eps_q - eps = k eps + r with r uncorrelated with the float output eps, so
      # eps_q / (1 + k) = eps + r / (1 + k): d_hat = k / (1 + k) eps_q, and r's variance
      # (over 1 + k) is what the sampler noise can absorb.
      ref = eps_at_c if fit.target == "same_input" else eps
      kf, _ = solve_affine(affine_stats(ref, target, fit.per_channel), False, fit.ridge)
      k, beta = kf / (1 + kf), jnp.zeros_like(kf)
      rho = jnp.mean((target - kf * ref) ** 2) / jnp.mean((1 + kf) ** 2)
    elif fit.e_hat_regressor:
      k, beta, G = _solve_with_e_hat(eps_q, e_hat, target, fit.ridge)
    else:
      k, beta = solve_affine(affine_stats(eps_q, target, fit.per_channel), fit.intercept, fit.ridge)
    k, beta = jnp.broadcast_to(k, (C,)), jnp.broadcast_to(beta, (C,))
    d_hat = k * eps_q + beta + G * e_hat
    s_c = sampler.step(s_c, eps_q - d_hat if fit.sequential else eps_q, i)
    e_hat = phi[i] * e_hat + c.b[i] * d_hat
    bad = ~jnp.all(jnp.isfinite(target))
    return (s_fp, s_c, e_hat), (k, beta, G, rho, bad)

  init = (sampler.init(x_T, key), sampler.init(x_T, key), jnp.zeros_like(x_T))
  _, (K, beta, G, rho, bad) = jax.lax.scan(body, init, jnp.arange(c.num_steps))
  if check_finite and not isinstance(bad, jax.core.Tracer) and bool(jnp.any(bad)):
    raise ValueError("calibration trajectories contain NaN/inf (first bad step "
                     f"{int(jnp.argmax(bad))}); check the quantized model and the input noise.")
  return TCECParams(K=K, beta=beta, phi=phi, timesteps=c.t,
                    G=G if fit.e_hat_regressor else None,
                    noise_var=rho if fit.absorb_variance else None)


def check_params_finite(params: TCECParams, where: str = "calibration") -> TCECParams:
  """Raises ValueError when fitted K / beta hold NaN/inf (for jitted calibrations, whose
  in-scan check cannot raise)."""
  arrays = [a for a in (params.K, params.beta, params.G, params.noise_var) if a is not None]
  if not all(np.all(np.isfinite(to_host(a))) for a in arrays):
    raise ValueError(f"{where} produced NaN/inf parameters; check the quantized model and the "
                     "input noise.")
  return params


def resample_params(params: TCECParams, sampler: Sampler) -> TCECParams:
  """Params fitted for one step count, linearly interpolated in t to `sampler`'s timesteps
  (calibrate once, sample with another step count); phi is reset to the new a_k."""
  src = to_host(params.timesteps).astype(np.float64)
  dst = np.asarray(sampler.coeffs.t, np.float64)
  order = np.argsort(src)

  def interp(a):
    if a is None:
      return None
    a = to_host(a).astype(np.float64)
    cols = a[:, None] if a.ndim == 1 else a
    out = np.stack([np.interp(dst, src[order], cols[order, j]) for j in range(cols.shape[1])], 1)
    return jnp.asarray(out[:, 0] if a.ndim == 1 else out, jnp.float32)

  C = params.num_channels
  return TCECParams(K=interp(params.K), beta=interp(params.beta),
                    phi=default_phi(sampler.coeffs, C), timesteps=sampler.coeffs.t,
                    G=interp(params.G), noise_var=interp(params.noise_var))


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
      to_host(params.timesteps), to_host(sampler.coeffs.t)):
    raise ValueError("TCEC params were fitted for different timesteps than this sampler's; "
                     "calibrate with the same schedule, step count and spacing.")
  if channels is not None and params.K.shape[1] != channels:
    raise ValueError(f"TCEC params have {params.K.shape[1]} channels but the samples have "
                     f"{channels}; they were fitted for another model.")
  if params.G is not None and params.G.shape != params.K.shape:
    raise ValueError(f"TCEC params: G has shape {params.G.shape}, K {params.K.shape}.")
  if params.noise_var is not None and params.noise_var.shape != (n,):
    raise ValueError(f"TCEC params: noise_var has shape {params.noise_var.shape}, want {(n,)}.")


def compensate(sampler: Sampler, params: Optional[TCECParams]) -> Sampler:
  """Wraps a sampler so each step corrects eps_q; `params=None` is the identity (`none`)."""
  c = sampler.coeffs
  stochastic = c.stochastic
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
    if params.G is not None:
      d_hat = d_hat + params.G[i] * state.error.e_hat
    inner = sampler.step(state.inner, eps_q - d_hat, i)
    if params.noise_var is not None and stochastic:
      # PTQD: the uncorrected residual adds variance b^2 rho; take it out of the step noise.
      sigma = c.sigma[i]
      reduced = jnp.sqrt(jnp.maximum(sigma ** 2 - c.b[i] ** 2 * params.noise_var[i], 0.0))
      z = step_noise(state.inner.key, i, eps_q.shape, eps_q.dtype)
      inner = inner._replace(x=inner.x - (sigma - reduced) * z)
    e_hat = params.phi[i] * state.error.e_hat + c.b[i] * d_hat
    return CompensatedState(inner, ErrorState(e_hat))

  return Sampler(coeffs=c, init=init, step=step)


# ----------------------------------------------------------------------------- persistence

OPTIONAL_FIELDS = ("G", "noise_var")


def save_params(directory: str, params: TCECParams, meta: Optional[Dict[str, Any]] = None) -> str:
  directory = os.path.abspath(directory)
  tree = {"K": params.K, "beta": params.beta, "phi": params.phi, "timesteps": params.timesteps}
  tree.update({k: getattr(params, k) for k in OPTIONAL_FIELDS if getattr(params, k) is not None})
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
  required = {"K", "beta", "phi", "timesteps"}
  if not required <= set(tree) <= required | set(OPTIONAL_FIELDS):
    raise ValueError(f"corrupt TCEC params at {path}: keys {sorted(tree)}.")
  n, ch = tree["K"].shape
  for name in ("beta", "phi", "G"):
    if name in tree and tree[name].shape != (n, ch):
      raise ValueError(f"corrupt TCEC params: {name} has shape {tree[name].shape}, want {(n, ch)}.")
  if "noise_var" in tree and tree["noise_var"].shape != (n,):
    raise ValueError(f"corrupt TCEC params: noise_var shape {tree['noise_var'].shape}, want {(n,)}.")
  if tree["timesteps"].shape != (n,):
    raise ValueError(f"corrupt TCEC params: timesteps shape {tree['timesteps'].shape}, want {(n,)}.")
  params = TCECParams(**{k: jnp.asarray(v) for k, v in tree.items()})
  if sampler is not None:
    check_params(params, sampler, channels)
  elif channels is not None and ch != channels:
    raise ValueError(f"TCEC params have {ch} channels, expected {channels}.")
  return params
