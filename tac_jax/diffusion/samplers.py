"""Samplers as pairs of pure functions (init, step), run by one `lax.scan`.

Every step is affine in the current sample and the noise prediction (docs/METHOD.md s.1):

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

from tac_jax.diffusion.schedules import (SPACINGS, Schedule, check_num_steps,
                                         timestep_subsequence)

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

  `affine` is False for steps that bound the x0 estimate (clip_sample, thresholding):
  `coeffs` (a, b) then describe the step only where the bound is inactive, and `linearise`
  gives the error model the step's average derivatives instead.

  `schedule` is the noise schedule the steps were derived from (None for samplers built
  from bare coefficients); compensators that re-derive steps (StepbaQ) read it.
  """
  coeffs: StepCoeffs
  init: Callable[..., Any]
  step: Callable[..., Any]
  prepare: Optional[Callable[..., Any]] = None
  affine: bool = True
  schedule: Optional[Schedule] = None


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


def _abar_pairs(schedule: Schedule, num_steps: int, spacing: str, steps_offset: int = 0):
  ts = timestep_subsequence(schedule.num_timesteps, num_steps, spacing, steps_offset)
  abar = schedule.alphas_cumprod
  abar_t = abar[ts]
  abar_prev = np.concatenate([abar[ts[1:]], [1.0]])  # final step lands on abar = 1
  return ts, abar_t, abar_prev


def _coeffs(ts, a, b, sigma) -> StepCoeffs:
  f32 = lambda v: jnp.asarray(np.asarray(v, np.float64), jnp.float32)
  return StepCoeffs(t=jnp.asarray(ts, jnp.int32), a=f32(a), b=f32(b), sigma=f32(sigma))


def ddim_direction(ab_t, ab_prev, sig2, xp=np):
  """b: the DDIM coefficient of eps, sqrt(1 - abar_prev - sigma^2) - sqrt(abar_prev (1 -
  abar_t) / abar_t), in numpy (`xp=np`) or traced (`xp=jax.numpy`)."""
  return xp.sqrt(xp.maximum(1 - ab_prev - sig2, 0.0)) - xp.sqrt(ab_prev * (1 - ab_t) / ab_t)


def ddim_coeffs(schedule: Schedule, num_steps: int, eta: float = 0.0,
                spacing: str = "uniform", steps_offset: int = 0) -> StepCoeffs:
  """DDIM (Song et al.) with stochasticity eta in [0, 1]:

      sigma_k = eta sqrt((1 - abar_{k-1}) / (1 - abar_k)) sqrt(1 - abar_k / abar_{k-1})
      a_k = sqrt(abar_{k-1} / abar_k)
      b_k = sqrt(1 - abar_{k-1} - sigma_k^2) - sqrt(abar_{k-1} (1 - abar_k) / abar_k)
  """
  if not 0.0 <= eta <= 1.0:
    raise ValueError(f"eta must be in [0, 1], got {eta}.")
  ts, ab, ab_prev = _abar_pairs(schedule, num_steps, spacing, steps_offset)
  sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab)) * np.sqrt(1 - ab / ab_prev)
  a = np.sqrt(ab_prev / ab)
  b = ddim_direction(ab, ab_prev, sigma ** 2)
  return _coeffs(ts, a, b, sigma)


def ddpm_coeffs(schedule: Schedule, num_steps: int, spacing: str = "uniform",
                steps_offset: int = 0) -> StepCoeffs:
  """DDPM ancestral sampling (Ho et al.) on a timestep subsequence, with
  alpha_k = abar_k / abar_{k-1}, beta_k = 1 - alpha_k and the posterior variance:

      x_{k-1} = (x_k - beta_k / sqrt(1 - abar_k) eps) / sqrt(alpha_k) + sigma_k z,
      sigma_k^2 = beta_k (1 - abar_{k-1}) / (1 - abar_k)
  """
  ts, ab, ab_prev = _abar_pairs(schedule, num_steps, spacing, steps_offset)
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


class X0Rule(NamedTuple):
  """How a step bounds its x0 estimate (diffusers' scheduler options of the same names).

  `clip_sample` clips it to [-1, 1]. `thresholding` in (0, 1) is Imagen's dynamic
  thresholding with that quantile (diffusers' `dynamic_thresholding_ratio`, e.g. 0.995): per
  image, s = clamp(quantile(|x0|, ratio), 1, sample_max_value), x0 <- clip(x0, -s, s) / s.
  It takes precedence over clip_sample, as in diffusers. All zero/False: the plain step.
  """
  clip_sample: bool = False
  thresholding: float = 0.0
  sample_max_value: float = 1.0

  @property
  def active(self) -> bool:
    return bool(self.clip_sample) or self.thresholding > 0

  def check(self) -> None:
    if not 0.0 <= self.thresholding < 1.0:
      raise ValueError(f"thresholding is the quantile of |x0| (diffusers' "
                       f"dynamic_thresholding_ratio), in (0, 1) or 0 for off; got "
                       f"{self.thresholding}.")
    if not self.sample_max_value >= 1.0:
      raise ValueError(f"sample_max_value must be >= 1 (the largest threshold), got "
                       f"{self.sample_max_value}.")

  def __call__(self, x0: jax.Array) -> jax.Array:
    if self.thresholding > 0:
      flat = jnp.abs(x0.reshape(x0.shape[0], -1))
      s = jnp.clip(jnp.quantile(flat, self.thresholding, axis=1), 1.0, self.sample_max_value)
      s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
      return jnp.clip(x0, -s, s) / s
    return jnp.clip(x0, -1.0, 1.0)


def clipped_sampler(coeffs: StepCoeffs, clip: ClipCoeffs, rule: X0Rule = X0Rule(True)) -> Sampler:
  """The sampler whose x0 estimate is bounded by `rule` at every step. Not affine where
  the rule is active: `coeffs` (a, b) describe it where it is not, which is what the error
  model and the compensators use (README: "clip_sample")."""
  plain = affine_sampler(coeffs)
  stochastic = coeffs.stochastic

  def step(state, eps, i, noise_scale=1.0):
    x0 = rule(clip.p[i] * state.x + clip.q[i] * eps)
    x = clip.u[i] * x0 + clip.v[i] * state.x + clip.w[i] * eps
    if stochastic:
      x = x + noise_scale * coeffs.sigma[i] * step_noise(state.key, i, x.shape, x.dtype)
    return SamplerState(x=x, key=state.key)

  return plain._replace(step=step, affine=False)


def _clip_coeffs(ab, u, v, w) -> ClipCoeffs:
  f32 = lambda z: jnp.asarray(np.asarray(z, np.float64), jnp.float32)
  return ClipCoeffs(p=f32(1 / np.sqrt(ab)), q=f32(-np.sqrt(1 - ab) / np.sqrt(ab)), u=f32(u),
                    v=f32(v), w=f32(w))


def ddim(schedule: Schedule, num_steps: int, eta: float = 0.0, spacing: str = "uniform",
         clip_sample: bool = False, *, steps_offset: int = 0, thresholding: float = 0.0,
         sample_max_value: float = 1.0) -> Sampler:
  """DDIM. `clip_sample` / `thresholding` / `sample_max_value` bound the x0 estimate and
  `spacing` / `steps_offset` place the timesteps as diffusers' DDIMScheduler options of the
  same names do (X0Rule, timestep_subsequence)."""
  rule = X0Rule(clip_sample, thresholding, sample_max_value)
  rule.check()
  coeffs = ddim_coeffs(schedule, num_steps, eta, spacing, steps_offset)
  if not rule.active:
    return affine_sampler(coeffs)._replace(schedule=schedule)
  _, ab, ab_prev = _abar_pairs(schedule, num_steps, spacing, steps_offset)
  sigma = np.asarray(coeffs.sigma, np.float64)
  direction = np.sqrt(np.maximum(1 - ab_prev - sigma ** 2, 0.0))
  return clipped_sampler(coeffs, _clip_coeffs(ab, np.sqrt(ab_prev), 0 * ab, direction),
                         rule)._replace(schedule=schedule)


def ddpm(schedule: Schedule, num_steps: int, spacing: str = "uniform",
         clip_sample: bool = False, *, steps_offset: int = 0, thresholding: float = 0.0,
         sample_max_value: float = 1.0) -> Sampler:
  """DDPM; with an x0 rule it steps to the posterior mean of the bounded x0 estimate
  (diffusers' DDPMScheduler). Options as for `ddim`."""
  rule = X0Rule(clip_sample, thresholding, sample_max_value)
  rule.check()
  coeffs = ddpm_coeffs(schedule, num_steps, spacing, steps_offset)
  if not rule.active:
    return affine_sampler(coeffs)._replace(schedule=schedule)
  _, ab, ab_prev = _abar_pairs(schedule, num_steps, spacing, steps_offset)
  alpha = ab / ab_prev
  c0 = np.sqrt(ab_prev) * (1 - alpha) / (1 - ab)
  ct = np.sqrt(alpha) * (1 - ab_prev) / (1 - ab)
  return clipped_sampler(coeffs, _clip_coeffs(ab, c0, ct, 0 * ab), rule)._replace(schedule=schedule)


SAMPLERS = ("ddim", "ddpm")


def check_sampler_args(name: str, num_steps: int, eta: float = 0.0,
                       spacing: str = "uniform", **options) -> None:
  """Raises ValueError for a sampler name, step count, eta, spacing or x0 option that
  cannot work (before any model is loaded); eta applies to DDIM only."""
  if name not in SAMPLERS:
    raise ValueError(f"unknown sampler {name!r}; choose one of {SAMPLERS}.")
  check_num_steps(num_steps)
  if name == "ddim" and not 0.0 <= eta <= 1.0:
    raise ValueError(f"eta must be in [0, 1] (0 = deterministic DDIM), got {eta}.")
  if name == "ddpm" and eta != 0.0:
    raise ValueError(f"eta={eta} applies to DDIM only: DDPM's step noise is fixed by the "
                     "schedule. Use --config.sampler=ddim with eta, or leave eta at 0.")
  if spacing not in SPACINGS:
    raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}.")
  unknown = sorted(set(options) - {"steps_offset", *X0Rule._fields})
  if unknown:
    raise ValueError(f"unknown sampler options {unknown}; choose from steps_offset, "
                     f"{', '.join(X0Rule._fields)}.")
  options = dict(options)
  offset = options.pop("steps_offset", 0)
  if int(offset) != offset or offset < 0:
    raise ValueError(f"steps_offset must be an integer >= 0, got {offset}.")
  X0Rule(**options).check()


def make_sampler(name: str, schedule: Schedule, num_steps: int, eta: float = 0.0,
                 spacing: str = "uniform", clip_sample: bool = False, **options) -> Sampler:
  """`ddim` or `ddpm` by name; `options` are their keyword-only ones (steps_offset,
  thresholding, sample_max_value)."""
  check_sampler_args(name, num_steps, eta, spacing, clip_sample=clip_sample, **options)
  if name == "ddim":
    return ddim(schedule, num_steps, eta, spacing, clip_sample, **options)
  return ddpm(schedule, num_steps, spacing, clip_sample, **options)


def linearise(sampler: Sampler, apply_fn: ApplyFn, variables, x_T: jax.Array,
              key: jax.Array) -> Sampler:
  """The sampler with coeffs (a_i, b_i) replaced by its step's derivatives d x_{i+1} / d x_i
  and d x_{i+1} / d eps, averaged over every pixel of the float trajectories from x_T (a jvp
  through the step at each scan position). The steps themselves are unchanged: only the
  error model (propagation analysis, cumulative fit target, e_hat) sees the new
  coefficients. For a clipped DDIM step a_i becomes a_i times the fraction of pixels whose
  x0 estimate is inside the clip. Affine samplers come back unchanged.
  """
  if sampler.affine:
    return sampler
  coeffs = sampler.coeffs

  def body(state, i):
    x_in, t_in = network_input(sampler, state, i)
    eps = apply_fn(variables, x_in, batch_timestep(t_in, x_in))
    move = lambda x, e: sampler.step(state._replace(x=x), e, i, noise_scale=0.0).x
    ones = jnp.ones_like(state.x)
    da = jax.jvp(lambda x: move(x, eps), (state.x,), (ones,))[1]
    db = jax.jvp(lambda e: move(state.x, e), (eps,), (ones,))[1]
    return sampler.step(state, eps, i), (jnp.mean(da), jnp.mean(db))

  _, (a, b) = jax.lax.scan(body, sampler.init(x_T, key), jnp.arange(coeffs.num_steps))
  return sampler._replace(coeffs=coeffs._replace(a=a.astype(jnp.float32),
                                                 b=b.astype(jnp.float32)))


def batch_timestep(t, x):
  """t once per sample: int32 for integer timesteps, float32 where a sampler's `prepare`
  gives a float one (flow models take s * T)."""
  t = jnp.asarray(t)
  dtype = jnp.float32 if jnp.issubdtype(t.dtype, jnp.floating) else jnp.int32
  return jnp.full((x.shape[0],), t, dtype)


def sample(apply_fn: ApplyFn, variables, sampler: Sampler, x_T: jax.Array, key: jax.Array,
           return_trajectory: bool = False) -> Tuple[Any, Optional[jax.Array]]:
  """Runs the sampler with one `lax.scan`.

  Args:
    apply_fn: the noise model, `apply_fn(variables, x, t) -> eps` with t a [B] array of
      timesteps (one per sample; int32, or float32 for samplers whose `prepare` gives
      float timesteps, e.g. flow matching's s * 1000).
    variables: its variables (float params, or {'params', 'quant'} of a QuantizedModel).
    sampler: a Sampler (`ddim`, `ddpm`, or one wrapped by `compensation.compensate`).
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


def calibration_batches(traj: jax.Array, sampler):
  """PTQ calibration batches [(x_i, t_i)] from a trajectory: one per sampler step.

  `sampler` a Sampler: t_i is the timestep its network gets (`network_input`: an int, or a
  float for the flow samplers); bare StepCoeffs: the int coeffs.t[i]."""
  if isinstance(sampler, StepCoeffs):
    return [(traj[i], int(sampler.t[i])) for i in range(sampler.num_steps)]
  out = []
  for i in range(sampler.coeffs.num_steps):
    _, t = network_input(sampler, SamplerState(traj[i], jax.random.key(0)), i)
    t = np.asarray(t)
    out.append((traj[i], int(t) if np.issubdtype(t.dtype, np.integer) else float(t)))
  return out
