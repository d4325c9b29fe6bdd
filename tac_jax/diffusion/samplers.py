"""Samplers as pairs of pure functions (init, step), run by one `lax.scan`.

Every step is affine in the current sample and the noise prediction (DESIGN.md s.1):

    x_{k-1} = a_k x_k + b_k eps(x_k, t_k) + sigma_k z_k

`Sampler.coeffs` exposes a_k, b_k, sigma_k and t_k as arrays indexed by scan position
i = 0..N-1 (i = 0 is step k = N, the noisiest). z_k is drawn from `fold_in(key, i)`, so a
float run and a quantized run given the same key share every noise draw.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from tac_jax.diffusion.schedules import SPACINGS, Schedule, timestep_subsequence

ApplyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]  # (variables, x, t) -> eps


class StepCoeffs(NamedTuple):
  t: jax.Array      # [N] int32 timesteps, descending
  a: jax.Array      # [N]
  b: jax.Array      # [N]
  sigma: jax.Array  # [N]

  @property
  def num_steps(self) -> int:
    return int(self.t.shape[0])

  @property
  def stochastic(self) -> bool:
    """Whether any step adds noise (sigma > 0)."""
    return bool(np.any(np.asarray(self.sigma) > 0))


class SamplerState(NamedTuple):
  x: jax.Array
  key: jax.Array


class Sampler(NamedTuple):
  """init(x_T, key) -> state; step(state, eps, i) -> state. `state.x` is the sample.

  Stochastic samplers' `step` also takes `noise_scale` (default 1): the factor on this
  step's added noise (PTQD's variance absorption lowers it).

  `prepare(state, i) -> (x_in, t_in)` says what the network sees at step i; None means
  (state.x, coeffs.t[i]). Compensators that shift the network input (TAC's input bias
  correction) or its timestep (StepbaQ) set it.
  """
  coeffs: StepCoeffs
  init: Callable[..., Any]
  step: Callable[..., Any]
  prepare: Optional[Callable[..., Any]] = None


def network_input(sampler: Sampler, state, i):
  """(x_in, t_in) the network is called with at scan position i."""
  if sampler.prepare is None:
    return state.x, sampler.coeffs.t[i]
  return sampler.prepare(state, i)


def step_noise(key, i, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.fold_in(key, i), shape, dtype)


def affine_sampler(coeffs: StepCoeffs) -> Sampler:
  """The plain sampler for given coefficients."""
  stochastic = coeffs.stochastic

  def init(x_T, key):
    return SamplerState(x=x_T, key=key)

  def step(state, eps, i, noise_scale=1.0):
    x = coeffs.a[i] * state.x + coeffs.b[i] * eps
    if stochastic:
      x = x + noise_scale * coeffs.sigma[i] * step_noise(state.key, i, x.shape, x.dtype)
    return SamplerState(x=x, key=state.key)

  return Sampler(coeffs=coeffs, init=init, step=step)


def _abar_pairs(schedule: Schedule, num_steps: int, spacing: str):
  ts = timestep_subsequence(schedule.num_timesteps, num_steps, spacing)
  abar = schedule.alphas_cumprod
  abar_t = abar[ts]
  abar_prev = np.concatenate([abar[ts[1:]], [1.0]])  # final step lands on abar = 1
  return ts, abar_t, abar_prev


def _coeffs(ts, a, b, sigma) -> StepCoeffs:
  f32 = lambda v: jnp.asarray(np.asarray(v, np.float64), jnp.float32)
  return StepCoeffs(t=jnp.asarray(ts, jnp.int32), a=f32(a), b=f32(b), sigma=f32(sigma))


def ddim_coeffs(schedule: Schedule, num_steps: int, eta: float = 0.0,
                spacing: str = "uniform") -> StepCoeffs:
  """DDIM (Song et al.) with stochasticity eta in [0, 1]:

      sigma_k = eta sqrt((1 - abar_{k-1}) / (1 - abar_k)) sqrt(1 - abar_k / abar_{k-1})
      a_k = sqrt(abar_{k-1} / abar_k)
      b_k = sqrt(1 - abar_{k-1} - sigma_k^2) - sqrt(abar_{k-1} (1 - abar_k) / abar_k)
  """
  if not 0.0 <= eta <= 1.0:
    raise ValueError(f"eta must be in [0, 1], got {eta}.")
  ts, ab, ab_prev = _abar_pairs(schedule, num_steps, spacing)
  sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab)) * np.sqrt(1 - ab / ab_prev)
  a = np.sqrt(ab_prev / ab)
  b = np.sqrt(np.maximum(1 - ab_prev - sigma ** 2, 0.0)) - np.sqrt(ab_prev * (1 - ab) / ab)
  return _coeffs(ts, a, b, sigma)


def ddpm_coeffs(schedule: Schedule, num_steps: int, spacing: str = "uniform") -> StepCoeffs:
  """DDPM ancestral sampling (Ho et al.) on a timestep subsequence, with
  alpha_k = abar_k / abar_{k-1}, beta_k = 1 - alpha_k and the posterior variance:

      x_{k-1} = (x_k - beta_k / sqrt(1 - abar_k) eps) / sqrt(alpha_k) + sigma_k z,
      sigma_k^2 = beta_k (1 - abar_{k-1}) / (1 - abar_k)
  """
  ts, ab, ab_prev = _abar_pairs(schedule, num_steps, spacing)
  alpha = ab / ab_prev
  beta = 1 - alpha
  a = 1 / np.sqrt(alpha)
  b = -beta / (np.sqrt(alpha) * np.sqrt(1 - ab))
  sigma = np.sqrt(beta * (1 - ab_prev) / (1 - ab))
  return _coeffs(ts, a, b, sigma)


class ClipCoeffs(NamedTuple):
  """A step written through the x0 estimate, for clip_sample (diffusers' option):

      x0 = p x + q eps,   x_prev = u clip(x0, -1, 1) + v x + w eps (+ sigma z),

  with u p + v = a and u q + w = b, so the step is the affine one while |x0| <= 1.
  """
  p: jax.Array
  q: jax.Array
  u: jax.Array
  v: jax.Array
  w: jax.Array


def clipped_sampler(coeffs: StepCoeffs, clip: ClipCoeffs, clip_range: float = 1.0) -> Sampler:
  """The sampler whose x0 estimate is clipped to [-clip_range, clip_range] at every step.
  Not affine where the clip is active: `coeffs` (a, b) describe it where it is not, which
  is what the error model and the compensators use (README: "clip_sample")."""
  plain = affine_sampler(coeffs)
  stochastic = coeffs.stochastic

  def step(state, eps, i, noise_scale=1.0):
    x0 = jnp.clip(clip.p[i] * state.x + clip.q[i] * eps, -clip_range, clip_range)
    x = clip.u[i] * x0 + clip.v[i] * state.x + clip.w[i] * eps
    if stochastic:
      x = x + noise_scale * coeffs.sigma[i] * step_noise(state.key, i, x.shape, x.dtype)
    return SamplerState(x=x, key=state.key)

  return plain._replace(step=step)


def _clip_coeffs(ab, ab_prev, u, v, w) -> ClipCoeffs:
  f32 = lambda z: jnp.asarray(np.asarray(z, np.float64), jnp.float32)
  return ClipCoeffs(p=f32(1 / np.sqrt(ab)), q=f32(-np.sqrt(1 - ab) / np.sqrt(ab)), u=f32(u),
                    v=f32(v), w=f32(w))


def ddim(schedule: Schedule, num_steps: int, eta: float = 0.0, spacing: str = "uniform",
         clip_sample: bool = False) -> Sampler:
  """DDIM; `clip_sample` clips the x0 estimate to [-1, 1] (diffusers' DDIMScheduler)."""
  coeffs = ddim_coeffs(schedule, num_steps, eta, spacing)
  if not clip_sample:
    return affine_sampler(coeffs)
  _, ab, ab_prev = _abar_pairs(schedule, num_steps, spacing)
  sigma = np.asarray(coeffs.sigma, np.float64)
  direction = np.sqrt(np.maximum(1 - ab_prev - sigma ** 2, 0.0))
  return clipped_sampler(coeffs, _clip_coeffs(ab, ab_prev, np.sqrt(ab_prev), 0 * ab, direction))


def ddpm(schedule: Schedule, num_steps: int, spacing: str = "uniform",
         clip_sample: bool = False) -> Sampler:
  """DDPM; `clip_sample` clips the x0 estimate to [-1, 1] and steps to the posterior mean
  of the clipped estimate (diffusers' DDPMScheduler)."""
  coeffs = ddpm_coeffs(schedule, num_steps, spacing)
  if not clip_sample:
    return affine_sampler(coeffs)
  _, ab, ab_prev = _abar_pairs(schedule, num_steps, spacing)
  alpha = ab / ab_prev
  c0 = np.sqrt(ab_prev) * (1 - alpha) / (1 - ab)
  ct = np.sqrt(alpha) * (1 - ab_prev) / (1 - ab)
  return clipped_sampler(coeffs, _clip_coeffs(ab, ab_prev, c0, ct, 0 * ab))


SAMPLERS = ("ddim", "ddpm")


def check_sampler_args(name: str, num_steps: int, eta: float = 0.0,
                       spacing: str = "uniform") -> None:
  """Raises ValueError for a sampler name, step count, eta or spacing that cannot work
  (before any model is loaded); eta applies to DDIM only."""
  if name not in SAMPLERS:
    raise ValueError(f"unknown sampler {name!r}; choose one of {SAMPLERS}.")
  if int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f"num_steps must be an integer >= 1, got {num_steps}.")
  if name == "ddim" and not 0.0 <= eta <= 1.0:
    raise ValueError(f"eta must be in [0, 1] (0 = deterministic DDIM), got {eta}.")
  if name == "ddpm" and eta != 0.0:
    raise ValueError(f"eta={eta} applies to DDIM only: DDPM's step noise is fixed by the "
                     "schedule. Use --config.sampler=ddim with eta, or leave eta at 0.")
  if spacing not in SPACINGS:
    raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}.")


def make_sampler(name: str, schedule: Schedule, num_steps: int, eta: float = 0.0,
                 spacing: str = "uniform", clip_sample: bool = False) -> Sampler:
  check_sampler_args(name, num_steps, eta, spacing)
  if name == "ddim":
    return ddim(schedule, num_steps, eta, spacing, clip_sample)
  if name == "ddpm":
    return ddpm(schedule, num_steps, spacing, clip_sample)
  raise ValueError(f"unknown sampler {name!r}; choose 'ddim' or 'ddpm'.")


def batch_timestep(t, x):
  return jnp.full((x.shape[0],), t, jnp.int32)


def sample(apply_fn: ApplyFn, variables, sampler: Sampler, x_T: jax.Array, key: jax.Array,
           return_trajectory: bool = False) -> Tuple[Any, Optional[jax.Array]]:
  """Runs the sampler with one `lax.scan`.

  Args:
    apply_fn: the noise model, `apply_fn(variables, x, t) -> eps` with t an int32 [B]
      array of timesteps (one per sample).
    variables: its variables (float params, or {'params', 'quant'} of a QuantizedModel).
    sampler: a Sampler (`ddim`, `ddpm`, or one wrapped by `errors.compensate`).
    x_T: [B, H, W, C] starting noise.
    key: PRNG key of the step noise (stochastic samplers).
    return_trajectory: also return x at the *input* of every step, [N, *x.shape]
      (traj[0] = x_T).
  Returns:
    (final sampler state, whose `.x` is the sample; trajectory or None).
  """
  coeffs = sampler.coeffs

  def body(state, i):
    x = state.x
    x_in, t_in = network_input(sampler, state, i)
    eps = apply_fn(variables, x_in, batch_timestep(t_in, x_in))
    new = sampler.step(state, eps, i)
    return new, (x if return_trajectory else None)

  state, traj = jax.lax.scan(body, sampler.init(x_T, key), jnp.arange(coeffs.num_steps))
  return state, traj


def step_outputs(traj: jax.Array, x_final: jax.Array) -> jax.Array:
  """x at the output of every step, [N, ...], from `sample`'s trajectory (the inputs)."""
  return jnp.concatenate([traj[1:], x_final[None]])


def calibration_batches(traj: jax.Array, coeffs: StepCoeffs):
  """PTQ calibration batches [(x_i, t_i)] from a trajectory: one per sampler step."""
  return [(traj[i], int(coeffs.t[i])) for i in range(coeffs.num_steps)]
