"""Compensation of quantization error in the sampler (DESIGN.md s.2-3, docs/METHOD.md s.3-4).

One family of per-step parameters (`CorrectionParams`) covers every method: a state shift
before the network call, a latent scale and timestep for the call, and a correction of
its output,

    d_hat = K_i eps_q + beta_i (+ G_i e_hat) (+ K_prev_i eps_q_prev)   [optionally masked]
    x     = a_i (x - x_shift_i) + b_i (eps_q - d_hat) (+ sigma_i' z_i)
    e_hat = phi_i e_hat + b_i d_hat         # ErrorState: error plain PTQ would accumulate

Calibration is one jitted `lax.scan` (`calibration_scan`) whose carry is (float state,
compensated state, e_hat, cached eps_q, a method's own array); each method contributes a
per-step fit. Here: the least-squares family (`FitConfig`: `per_step`, `tcec`, `tcec_vp`,
`tcec_ehat`), whose cumulative target at scan position i, with e_i = x_c - x_fp, is

    D_i = (eps_q - eps) + (a_i / b_i) e_i

(the correction that puts x_c back on the float trajectory), fitted per channel as
D_i ~ K_i eps_q + beta_i from sufficient statistics. The field's methods are in
`reference.py`, calibration by name and the safe default in `methods.py`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from tac_jax import files
from tac_jax.host import to_host
from tac_jax.diffusion.samplers import ApplyFn, Sampler, batch_timestep
from tac_jax.validate import check_finite_data, check_finite_tree


@dataclasses.dataclass(frozen=True)
class FitConfig:
  """How a least-squares correction is fitted. `VARIANTS` names the presets."""
  target: str = "cumulative"      # 'cumulative' (D_i) or 'same_input' (d_i = eps_q(x_c) - eps(x_c))
  sequential: bool = True         # fit on trajectories already compensated at earlier steps
  per_channel: bool = True        # one (K, beta) per channel, else one per tensor
  intercept: bool = True          # fit beta (else beta = 0)
  ridge: float = 1e-6             # relative Tikhonov term on var(eps_q)
  e_hat_regressor: bool = False   # also regress on the carried error estimate (G e_hat)
  preserve_variance: bool = False  # rescale the corrected eps to the float eps's per-channel
                                   # std at that step (no shrinkage toward the mean)

  def __post_init__(self):
    if self.target not in TARGETS:
      raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}.")
    if self.e_hat_regressor and not (self.per_channel and self.intercept):
      raise ValueError("e_hat_regressor needs per_channel=True and intercept=True.")
    if self.e_hat_regressor and self.preserve_variance:
      raise ValueError("preserve_variance cannot be combined with e_hat_regressor.")


TARGETS = ("cumulative", "same_input")


VARIANTS: Dict[str, Optional[FitConfig]] = {
    "none": None,
    "per_step": FitConfig(target="same_input", sequential=False, per_channel=True, intercept=True),
    "tcec": FitConfig(target="cumulative", sequential=True, per_channel=True, intercept=True),
    "tcec_vp": FitConfig(target="cumulative", sequential=True, per_channel=True, intercept=True,
                         preserve_variance=True),
    "tcec_ehat": FitConfig(target="cumulative", sequential=True, per_channel=True,
                           intercept=True, e_hat_regressor=True),
}

# The field's methods as their papers define them (tac_jax/errors/reference.py).
REFERENCE_METHODS = ("ptqd", "tac", "stepbaq", "paper_m1")
# Validated on held-out calibration seeds, falls back to no correction (errors/safe.py).
SAFE_METHOD = "tcec_safe"
METHODS = tuple(VARIANTS) + REFERENCE_METHODS + (SAFE_METHOD,)


def get_fit_config(variant: str) -> Optional[FitConfig]:
  if variant not in VARIANTS:
    raise ValueError(f"unknown compensation method {variant!r}; choose one of {list(METHODS)}.")
  return VARIANTS[variant]


@flax.struct.dataclass
class CorrectionParams:
  """Per-step parameters of a compensator (leading axis: scan position i).

  Before the network call the state is shifted, x <- x - x_shift, and the network sees
  (in_scale (x - x_shift), t_in). Its output eps_q is corrected to eps_q - d_hat with

      d_hat = K eps_q + beta (+ G e_hat) (+ K_prev eps_q_prev)

  applied only where |eps_q| > mask_threshold * mean|eps_q| (per sample and channel) when a
  threshold is set. Optional fields are None when a method does not use them.
  """
  K: jax.Array          # [N, C]
  beta: jax.Array       # [N, C]
  phi: jax.Array        # [N, C] propagation gains of the carried estimate e_hat
  timesteps: jax.Array  # [N] the sampler's t_k the params were fitted for
  G: Optional[jax.Array] = None               # [N, C] coefficient of e_hat (tcec_ehat)
  noise_var: Optional[jax.Array] = None       # [N] residual variance absorbed (ptqd, eta > 0)
  x_shift: Optional[jax.Array] = None         # [N, H, W, C] input bias (tac IBC, stepbaq mu)
  in_scale: Optional[jax.Array] = None        # [N] latent adjustment (stepbaq)
  t_in: Optional[jax.Array] = None            # [N] network timestep (stepbaq tau)
  K_prev: Optional[jax.Array] = None          # [N, C] gain on the cached eps_q of step i-1
  mask_threshold: Optional[jax.Array] = None  # [N] (tac NER)

  @property
  def num_steps(self) -> int:
    return int(self.K.shape[0])

  @property
  def num_channels(self) -> int:
    return int(self.K.shape[1])


TCECParams = CorrectionParams  # the name used before reference methods shared the type
OPTIONAL_FIELDS = ("G", "noise_var", "x_shift", "in_scale", "t_in", "K_prev", "mask_threshold")


def zero_params(num_steps: int, channels: int, timesteps, phi=None) -> CorrectionParams:
  z = jnp.zeros((num_steps, channels), jnp.float32)
  return CorrectionParams(K=z, beta=z, phi=z if phi is None else jnp.asarray(phi, jnp.float32),
                          timesteps=jnp.asarray(timesteps, jnp.int32))


def at_step(params: CorrectionParams, i) -> CorrectionParams:
  """The parameters of scan position i (leading axis dropped)."""
  return jax.tree.map(lambda a: a[i], params)


def scale_params(params: CorrectionParams, gain, offset) -> CorrectionParams:
  """The correction at a strength: `gain` scales the terms proportional to the network
  output (K, G, K_prev), `offset` the additive ones (beta, x_shift); each a scalar or one
  value per step ([N]). (0, 0) is the identity."""

  def sc(a, s):
    if a is None:
      return None
    s = jnp.asarray(s, a.dtype)
    return a * s.reshape(s.shape + (1,) * (a.ndim - s.ndim))

  return params.replace(K=sc(params.K, gain), beta=sc(params.beta, offset), G=sc(params.G, gain),
                        K_prev=sc(params.K_prev, gain), x_shift=sc(params.x_shift, offset))


# ----------------------------------------------------------------------------- the correction

def correction(p: CorrectionParams, eps_q, e_hat, eps_q_prev):
  """d_hat of one step (`p` = `at_step(params, i)`): what is subtracted from eps_q."""
  d_hat = p.K * eps_q + p.beta
  if p.G is not None:
    d_hat = d_hat + p.G * e_hat
  if p.K_prev is not None:
    d_hat = d_hat + p.K_prev * eps_q_prev
  if p.mask_threshold is not None:
    mag = jnp.abs(eps_q)
    mean = jnp.mean(mag, axis=tuple(range(1, eps_q.ndim - 1)), keepdims=True)
    d_hat = jnp.where(mag > p.mask_threshold * mean, d_hat, 0.0)
  return d_hat


def shifted_state(p: CorrectionParams, x):
  """The state after the input bias correction (x - x_shift)."""
  return x if p.x_shift is None else x - p.x_shift


def corrected_input(p: CorrectionParams, x, t):
  """(x_in, t_in) the network sees at this step under the correction `p` (the sampler-level
  counterpart is `samplers.network_input`)."""
  x = shifted_state(p, x)
  x_in = x if p.in_scale is None else p.in_scale * x
  return x_in, (t if p.t_in is None else p.t_in)


def corrected_step(sampler: Sampler, p: CorrectionParams, i, inner, eps_q, e_hat, eps_q_prev):
  """One compensated sampler step: (new inner state, new e_hat, d_hat)."""
  c = sampler.coeffs
  x = shifted_state(p, inner.x)
  if p.x_shift is not None:
    inner = inner._replace(x=x)
  d_hat = correction(p, eps_q, e_hat, eps_q_prev)
  if p.noise_var is not None and c.stochastic:
    # PTQD: the uncorrected residual adds variance b^2 rho; take it out of the step noise.
    sigma = c.sigma[i]
    reduced = jnp.sqrt(jnp.maximum(sigma ** 2 - c.b[i] ** 2 * p.noise_var, 0.0))
    scale = jnp.where(sigma > 0, reduced / jnp.where(sigma > 0, sigma, 1.0), 1.0)
    new = sampler.step(inner, eps_q - d_hat, i, noise_scale=scale)
  else:
    new = sampler.step(inner, eps_q - d_hat, i)
  return new, p.phi * e_hat + c.b[i] * d_hat, d_hat


# ----------------------------------------------------------------------------- least squares

class AffineStats(NamedTuple):
  """Sufficient statistics of y ~ K x + beta, per channel: sums over samples."""
  n: jax.Array
  sx: jax.Array
  sy: jax.Array
  sxx: jax.Array
  sxy: jax.Array


def reduce_axes(x, per_channel: bool = True):
  return tuple(range(x.ndim - 1)) if per_channel else tuple(range(x.ndim))


def affine_stats(x: jax.Array, y: jax.Array, per_channel: bool = True) -> AffineStats:
  axes = reduce_axes(x, per_channel)
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


def channel_moments(x, per_channel: bool = True):
  """(mean, variance) over all but the channel axis (or over everything)."""
  axes = reduce_axes(x, per_channel)
  m = jnp.mean(x, axis=axes)
  return m, jnp.mean(x * x, axis=axes) - m * m


def preserve_variance(K, beta, eps_q, eps_fp, per_channel: bool = True):
  """(K', beta') whose corrected output eps_q - (K' eps_q + beta') = g eps_q + h has the same
  mean as with (K, beta) and the float output's per-channel std, g = std_fp / std_q > 0 (no
  shrinkage, and no sign flip where the least-squares slope overshoots)."""
  m_q, v_q = channel_moments(eps_q, per_channel)
  _, v_fp = channel_moments(eps_fp, per_channel)
  mean_corrected = (1.0 - K) * m_q - beta
  g_new = jnp.sqrt(v_fp / (v_q + 1e-12))
  return 1.0 - g_new, g_new * m_q - mean_corrected


# ----------------------------------------------------------------------------- calibration

def check_calibration_noise(x_T):
  if x_T.ndim < 2 or x_T.shape[0] == 0:
    raise ValueError(f"calibration needs at least one sample: got x_T of shape {x_T.shape}.")
  check_finite_data(x_T, "calibration starting noise x_T")


def default_phi(coeffs, channels: int) -> jax.Array:
  """Propagation gains phi_i = a_i per channel (the error's own decay, Jacobian ignored)."""
  return coeffs.a[:, None] * jnp.ones((1, channels))


class StepInputs(NamedTuple):
  """What a method's per-step fit sees at scan position i."""
  i: jax.Array
  t: jax.Array            # [B] the sampler's timestep
  x_fp: jax.Array         # float trajectory
  x_c: jax.Array          # compensated quantized trajectory
  eps_fp: jax.Array       # eps(x_fp, t)
  e_hat: jax.Array        # carried estimate of plain PTQ's error
  eps_q_prev: jax.Array   # eps_q of step i-1 on the compensated trajectory (0 at i = 0)
  aux: jax.Array          # a method's own carried array, like x (zeros at i = 0)


def calibration_scan(fit_step, sampler: Sampler, apply_fp: ApplyFn, var_fp, x_T, key,
                     phi, sequential: bool = True, check_finite: bool = True):
  """The calibration scan every method shares.

  Carry: (float state, compensated state, e_hat, cached eps_q, aux). At each step
  `fit_step(StepInputs) -> (p_i, eps_q, aux)` returns the step's parameters (phi excluded),
  the quantized output at the input they imply and the method's next carried array (e.g.
  StepbaQ's accumulated error); both trajectories then advance, the
  compensated one with p_i applied exactly as `compensate` applies it online (or without
  it when `sequential` is False). Returns the stacked CorrectionParams.
  """
  check_calibration_noise(x_T)
  c = sampler.coeffs

  def body(carry, i):
    s_fp, s_c, e_hat, q_prev, aux = carry
    t = batch_timestep(c.t[i], x_T)
    eps_fp = apply_fp(var_fp, s_fp.x, t)
    p_i, eps_q, aux = fit_step(StepInputs(i, t, s_fp.x, s_c.x, eps_fp, e_hat, q_prev, aux))
    p_i = p_i.replace(phi=phi[i], timesteps=c.t[i])
    if sequential:
      s_c, e_hat, _ = corrected_step(sampler, p_i, i, s_c, eps_q, e_hat, q_prev)
    else:
      e_hat = phi[i] * e_hat + c.b[i] * correction(p_i, eps_q, e_hat, q_prev)
      s_c = sampler.step(s_c, eps_q, i)
    bad = ~jnp.all(jnp.isfinite(eps_q)) | ~jnp.all(jnp.isfinite(s_c.x))
    return (sampler.step(s_fp, eps_fp, i), s_c, e_hat, eps_q, aux), (p_i, bad)

  init = (sampler.init(x_T, key), sampler.init(x_T, key), jnp.zeros_like(x_T),
          jnp.zeros_like(x_T), jnp.zeros_like(x_T))
  _, (params, bad) = jax.lax.scan(body, init, jnp.arange(c.num_steps))
  if check_finite and not isinstance(bad, jax.core.Tracer) and bool(jnp.any(bad)):
    raise ValueError("calibration trajectories contain NaN/inf (first bad step "
                     f"{int(jnp.argmax(bad))}); check the quantized model and the input noise.")
  return params


def _solve_with_e_hat(eps_q, e_hat, target, ridge):
  """Per-channel least squares target ~ K eps_q + G e_hat + beta (3x3 normal equations)."""
  X = jnp.stack([eps_q, e_hat, jnp.ones_like(eps_q)], axis=-1)      # [..., C, 3]
  xtx = jnp.einsum("...ci,...cj->cij", X, X)
  xty = jnp.einsum("...ci,...c->ci", X, target)
  diag = jnp.diagonal(xtx, axis1=-2, axis2=-1)
  reg = ridge * diag + 1e-12 * jnp.mean(diag) + jnp.array([0.0, 1e-9, 0.0])  # e_hat = 0 at step 0
  w = jnp.linalg.solve(xtx + jax.vmap(jnp.diag)(reg), xty[..., None])[..., 0]
  return w[:, 0], w[:, 2], w[:, 1]


def least_squares_fit_step(fit: FitConfig, sampler: Sampler, apply_fp, var_fp, apply_q, var_q):
  """Per-step fit of the FitConfig family (per_step, tcec, tcec_vp, tcec_ehat):

      D_i = (eps_q - eps) + (a_i / b_i) e_i  ~  K_i eps_q + beta_i (+ G_i e_hat)
  """
  c = sampler.coeffs

  def fit_step(s: StepInputs):
    eps_q = apply_q(var_q, s.x_c, s.t)
    if fit.target == "cumulative":
      D = (eps_q - s.eps_fp) + (c.a[s.i] / c.b[s.i]) * (s.x_c - s.x_fp)
    else:
      D = eps_q - apply_fp(var_fp, s.x_c, s.t)
    C = eps_q.shape[-1]
    G = None
    if fit.e_hat_regressor:
      K, beta, G = _solve_with_e_hat(eps_q, s.e_hat, D, fit.ridge)
    else:
      K, beta = solve_affine(affine_stats(eps_q, D, fit.per_channel), fit.intercept, fit.ridge)
      if fit.preserve_variance:
        K, beta = preserve_variance(K, beta, eps_q, s.eps_fp, fit.per_channel)
    K, beta = jnp.broadcast_to(K, (C,)), jnp.broadcast_to(beta, (C,))
    return CorrectionParams(K=K, beta=beta, phi=None, timesteps=None, G=G), eps_q, s.aux

  return fit_step


def check_params_finite(params: CorrectionParams, where: str = "calibration") -> CorrectionParams:
  """Raises ValueError when fitted parameters hold NaN/inf (skips traced leaves: a jitted
  calibration is checked by its caller)."""
  check_finite_tree(params, f"correction params ({where})")
  return params


def resample_params(params: CorrectionParams, sampler: Sampler) -> CorrectionParams:
  """Params fitted for one step count, linearly interpolated in t to `sampler`'s timesteps
  (calibrate once, sample with another step count); phi is reset to the new a_k."""
  if params.t_in is not None or params.mask_threshold is not None or params.K_prev is not None:
    raise ValueError("resample_params supports per_step, tcec* and ptqd; the shifted timesteps "
                     "(stepbaq), masks (tac) and step-coefficient terms (paper_m1) do not "
                     "interpolate: calibrate this method for the new sampler instead.")
  src = to_host(params.timesteps).astype(np.float64)
  dst = np.asarray(sampler.coeffs.t, np.float64)
  order = np.argsort(src)

  def interp(a):
    if a is None:
      return None
    a = to_host(a).astype(np.float64)
    cols = a.reshape(a.shape[0], -1)
    out = np.stack([np.interp(dst, src[order], cols[order, j]) for j in range(cols.shape[1])], 1)
    return jnp.asarray(out.reshape((dst.shape[0],) + a.shape[1:]), jnp.float32)

  C = params.num_channels
  return CorrectionParams(K=interp(params.K), beta=interp(params.beta),
                          phi=default_phi(sampler.coeffs, C), timesteps=sampler.coeffs.t,
                          G=interp(params.G), noise_var=interp(params.noise_var),
                          x_shift=interp(params.x_shift))


# ----------------------------------------------------------------------------- online use

class ErrorState(NamedTuple):
  e_hat: jax.Array        # closed-form estimate of the error plain PTQ would accumulate


class CompensatedState(NamedTuple):
  inner: Any
  error: ErrorState
  eps_q_prev: Any = None  # the previous step's quantized output (methods with K_prev)

  @property
  def x(self):
    return self.inner.x


def check_shapes(params: CorrectionParams) -> None:
  """Raises ValueError when the fields of `params` disagree in shape."""
  if params.K.ndim != 2:
    raise ValueError(f"correction params: K must be [steps, channels], got {tuple(params.K.shape)}.")
  n, C = params.K.shape
  want = {"beta": (n, C), "phi": (n, C), "G": (n, C), "K_prev": (n, C), "noise_var": (n,),
          "in_scale": (n,), "t_in": (n,), "mask_threshold": (n,), "timesteps": (n,)}
  for name, shape in want.items():
    a = getattr(params, name)
    if a is not None and tuple(a.shape) != shape:
      raise ValueError(f"correction params: {name} has shape {tuple(a.shape)}, want {shape} "
                       f"(K is {(n, C)}).")
  if params.x_shift is not None and (params.x_shift.shape[0] != n or params.x_shift.shape[-1] != C):
    raise ValueError(f"correction params: x_shift has shape {tuple(params.x_shift.shape)}, want "
                     f"({n}, H, W, {C}).")


def check_params(params: CorrectionParams, sampler: Sampler, channels: Optional[int] = None) -> None:
  """Raises ValueError when `params` do not fit `sampler` (steps, timesteps) or `channels`."""
  n = sampler.coeffs.num_steps
  if params.K.shape[0] != n:
    raise ValueError(f"correction params were fitted for {params.K.shape[0]} sampler steps but "
                     f"the sampler runs {n}; calibrate for this sampler.")
  check_shapes(params)
  if not isinstance(params.timesteps, jax.core.Tracer) and not np.array_equal(
      to_host(params.timesteps), to_host(sampler.coeffs.t)):
    raise ValueError("correction params were fitted for different timesteps than this "
                     "sampler's; calibrate with the same schedule, step count and spacing.")
  if channels is not None and params.K.shape[1] != channels:
    raise ValueError(f"correction params have {params.K.shape[1]} channels but the samples have "
                     f"{channels}; they were fitted for another model.")


def compensate(sampler: Sampler, params: Optional[CorrectionParams]) -> Sampler:
  """Wraps a sampler so each step corrects eps_q; `params=None` is the identity (`none`).

  Args:
    sampler: any affine sampler (`samplers.ddim`, `samplers.ddpm`, ...).
    params: fitted CorrectionParams for this sampler's steps, or None.
  Returns:
    A Sampler whose state is CompensatedState(inner, ErrorState(e_hat), eps_q_prev).
  """
  c = sampler.coeffs
  if params is not None:
    check_params(params, sampler)
    check_params_finite(params, "compensate")

  def init(x_T, key):
    if params is not None:
      check_params(params, sampler, x_T.shape[-1])
    return CompensatedState(sampler.init(x_T, key), ErrorState(jnp.zeros_like(x_T)),
                            jnp.zeros_like(x_T))

  def prepare(state: CompensatedState, i):
    return corrected_input(at_step(params, i), state.x, c.t[i])

  def step(state: CompensatedState, eps_q, i):
    if params is None:
      return state._replace(inner=sampler.step(state.inner, eps_q, i))
    inner, e_hat, _ = corrected_step(sampler, at_step(params, i), i, state.inner, eps_q,
                                     state.error.e_hat, state.eps_q_prev)
    return CompensatedState(inner, ErrorState(e_hat), eps_q)

  needs_prepare = params is not None and (params.x_shift is not None or params.in_scale is not None
                                          or params.t_in is not None)
  return Sampler(coeffs=c, init=init, step=step, prepare=prepare if needs_prepare else None,
                 affine=sampler.affine)


# ----------------------------------------------------------------------------- persistence

PARAMS_JSON = "tcec.json"


def save_params(directory: str, params: CorrectionParams,
                meta: Optional[Dict[str, Any]] = None) -> str:
  """Saves fitted parameters as the directory `directory` (tcec/ orbax tree + tcec.json with
  checksums), written as a whole: a previous save there survives until this one is complete."""
  check_shapes(params)
  check_params_finite(params, "save_params")
  tree = {k: v for k, v in dataclasses.asdict(params).items() if v is not None}
  with files.staged_directory(directory) as tmp:
    files.save_tree(os.path.join(tmp, "tcec"), tree)
    files.write_json_atomic(os.path.join(tmp, PARAMS_JSON), {
        "num_steps": params.num_steps, "channels": params.num_channels, **(meta or {}),
        "checksums": files.tree_checksums(os.path.join(tmp, "tcec"))})
  return os.path.abspath(directory)


def load_params(directory: str, sampler: Optional[Sampler] = None,
                channels: Optional[int] = None) -> CorrectionParams:
  """Loads CorrectionParams; verifies checksums, shapes, finiteness, and `sampler` /
  `channels` if given."""
  directory = os.path.abspath(directory)
  path = os.path.join(directory, "tcec")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no correction params at {directory} (missing tcec/); run "
                            "calibration first.")
  record = files.read_json(os.path.join(directory, PARAMS_JSON), "correction params")
  files.verify_checksums(path, record.get("checksums", {}), f"correction params at {directory}")
  tree = files.restore_tree(path, "correction params")
  required = {"K", "beta", "phi", "timesteps"}
  if not required <= set(tree) <= required | set(OPTIONAL_FIELDS):
    raise ValueError(f"corrupt correction params at {path}: keys {sorted(tree)}.")
  params = CorrectionParams(**{k: jnp.asarray(v) for k, v in tree.items()})
  try:
    check_shapes(params)
  except ValueError as e:
    raise ValueError(f"corrupt correction params at {path}: {e}") from None
  check_params_finite(params, f"correction params at {path}")
  if sampler is not None:
    check_params(params, sampler, channels)
  elif channels is not None and params.num_channels != channels:
    raise ValueError(f"correction params have {params.num_channels} channels, expected {channels}.")
  return params
