"""The parameters every compensator fits: one pytree, `CorrectionParams`, and its checks.

Per scan position i (leading axis), before the network call the state is shifted and
scaled, and the network's output eps_q is corrected to eps_q - d_hat with

    d_hat = K eps_q + beta (+ G e_hat) (+ K_prev eps_q_prev)   [optionally masked]
    x     = a_i (x - x_shift_i) + b_i (eps_q - d_hat) (+ sigma_i' z_i)
    e_hat = phi_i e_hat + b_i d_hat     # estimate of the error plain PTQ would accumulate

Optional fields are None when a method does not use them (`docs/METHOD.md` s.3-4).
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from tac_jax.diffusion.samplers import Sampler, StepCoeffs
from tac_jax.host import to_host
from tac_jax.validate import check_finite_tree


@flax.struct.dataclass
class CorrectionParams:
  """Per-step parameters of a compensator (leading axis: scan position i).

  Before the network call the state is shifted, x <- x - x_shift, and the network sees
  (in_scale (x - x_shift), t_in). Its output eps_q is corrected to eps_q - d_hat with

      d_hat = K eps_q + beta (+ G e_hat) (+ K_prev eps_q_prev)

  applied only where |eps_q| > mask_threshold * mean|eps_q| (per sample and channel) when a
  threshold is set; the step then consumes out_gain (eps_q - d_hat) and its noise is scaled
  by noise_gain. Optional fields are None when a method does not use them.
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
  noise_gain: Optional[jax.Array] = None      # [N] factor on the step noise (ptqd, eta > 0)
  out_gain: Optional[jax.Array] = None        # [N] factor on the corrected output (ptqd, eta > 0)
  probe: Optional[jax.Array] = None           # [N] 1 where the output bias is re-estimated (qncd)

  @property
  def num_steps(self) -> int:
    return int(self.K.shape[0])

  @property
  def num_channels(self) -> int:
    return int(self.K.shape[1])


OPTIONAL_FIELDS = ("G", "noise_var", "x_shift", "in_scale", "t_in", "K_prev", "mask_threshold",
                   "noise_gain", "out_gain", "probe")


def step_params(K, channels: int, **fields) -> CorrectionParams:
  """One step's parameters (no leading axis) as a per-step fit returns them: K and beta
  (default 0) broadcast to [C]; phi and timesteps are filled in by the calibration scan."""
  K = jnp.broadcast_to(jnp.asarray(K, jnp.float32), (channels,))
  beta = jnp.broadcast_to(jnp.asarray(fields.pop("beta", 0.0), jnp.float32), (channels,))
  return CorrectionParams(K=K, beta=beta, phi=None, timesteps=None, **fields)


def default_phi(coeffs: StepCoeffs, channels: int) -> jax.Array:
  """Propagation gains phi_i = a_i per channel (the error's own decay, Jacobian ignored)."""
  return coeffs.a[:, None] * jnp.ones((1, channels))


def zero_params(num_steps: int, channels: int, timesteps, phi=None) -> CorrectionParams:
  """The identity correction (plain PTQ)."""
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


def check_params_finite(params: CorrectionParams, where: str = "calibration") -> CorrectionParams:
  """Raises ValueError when fitted parameters hold NaN/inf (skips traced leaves: a jitted
  calibration is checked by its caller)."""
  check_finite_tree(params, f"correction params ({where})")
  return params


def check_shapes(params: CorrectionParams) -> None:
  """Raises ValueError when the fields of `params` disagree in shape."""
  if params.K.ndim != 2:
    raise ValueError(f"correction params: K must be [steps, channels], got {tuple(params.K.shape)}.")
  n, C = params.K.shape
  want = {"beta": (n, C), "phi": (n, C), "G": (n, C), "K_prev": (n, C), "noise_var": (n,),
          "in_scale": (n,), "t_in": (n,), "mask_threshold": (n,), "timesteps": (n,),
          "noise_gain": (n,), "out_gain": (n,), "probe": (n,)}
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


def resample_params(params: CorrectionParams, sampler: Sampler) -> CorrectionParams:
  """Params fitted for one step count, linearly interpolated in t to `sampler`'s timesteps
  (calibrate once, sample with another step count); phi is reset to the new a_k."""
  if any(getattr(params, f) is not None for f in ("t_in", "mask_threshold", "K_prev", "noise_gain",
                                              "out_gain", "probe")):
    raise ValueError("resample_params supports per_step, tcec* and ptqd at eta = 0; shifted "
                     "timesteps (stepbaq), masks (tac), step-coefficient terms (paper_m1) and "
                     "noise gains do not interpolate: calibrate this method for the new sampler.")
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
