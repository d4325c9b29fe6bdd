"""Multistep samplers: steps linear in the current and the previous step's (x, eps).

A multistep step at scan position i (i = 0 the noisiest) reads the network output of
this step and of the one before, and is written as

    x_{i+1} = a_i x_i + b_i eps_i + c_i eps_{i-1} + d_i x_{i-1}          (sigma_i = 0)

(in the package's descending notation, x_{k-1} = a_k x_k + b_k eps_k + c_k eps_{k+1}
+ d_k x_{k+1}). c and d are 0 at the first step and at every first-order step, where the
step is the plain affine one. The sampler state carries (x_{i-1}, eps_{i-1}).

Why d: DPM-Solver++ extrapolates in the *data* prediction m_i = (x_i - s_i eps_i) / al_i,
and the previous data prediction m_{i-1} contains x_{i-1} as well as eps_{i-1}, so an
eps-network's step needs both.

DPM-Solver++(2M) (Lu et al. 2022; diffusers' DPMSolverMultistepScheduler with
algorithm_type='dpmsolver++', solver_order=2, solver_type='midpoint',
lower_order_final=True, final_sigmas_type='zero'). On a VP schedule, with
al_i = sqrt(abar_{t_i}), s_i = sqrt(1 - abar_{t_i}), lambda_i = log(al_i / s_i), the final
target al_N = 1, s_N = 0 (lambda_N = inf), h_i = lambda_{i+1} - lambda_i and
phi_i = 1 - exp(-h_i) = 1 - al_i s_{i+1} / (s_i al_{i+1}):

    first order (i = 0 and i = N-1; DDIM):
      x_{i+1} = (s_{i+1} / s_i) x_i + al_{i+1} phi_i m_i
    second order (0 < i < N-1), r_i = h_{i-1} / h_i:
      x_{i+1} = (s_{i+1} / s_i) x_i + al_{i+1} phi_i [(1 + 1/(2 r_i)) m_i - m_{i-1} / (2 r_i)]

so with w_i = al_{i+1} phi_i / (2 r_i) (w_i = 0 at first-order steps):

    a_i = s_{i+1} / s_i + (al_{i+1} phi_i + w_i) / al_i
    b_i = -(al_{i+1} phi_i + w_i) s_i / al_i
    c_i = w_i s_{i-1} / al_{i-1}
    d_i = -w_i / al_{i-1}

Flow-matching Heun (`flow.flow_heun`) has the same form: its corrector is
x_{i+1} = x_{i-1} + dt (v_{i-1} + v_i) / 2.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tac_jax.diffusion.samplers import Sampler, StepCoeffs
from tac_jax.diffusion.schedules import Schedule, check_num_steps

DPM_SPACINGS = ("linspace", "leading", "trailing")


class MultistepCoeffs(NamedTuple):
  """StepCoeffs' fields (same order, same meaning) plus the multistep terms c and d.

  Duck-types StepCoeffs: code that reads `t`, `a`, `b`, `sigma`, `num_steps` and
  `stochastic` works unchanged; `step_coeffs` drops c and d.
  """
  t: jax.Array      # [N] int32 timesteps, descending
  a: jax.Array      # [N] on x_i
  b: jax.Array      # [N] on eps_i
  sigma: jax.Array  # [N] zeros (deterministic)
  c: jax.Array      # [N] on eps_{i-1} (0 at i = 0 and first-order steps)
  d: jax.Array      # [N] on x_{i-1} (0 at i = 0 and first-order steps)

  @property
  def num_steps(self) -> int:
    return int(self.t.shape[0])

  @property
  def stochastic(self) -> bool:
    return bool(np.any(np.asarray(self.sigma) > 0))

  @property
  def step_coeffs(self) -> StepCoeffs:
    return StepCoeffs(t=self.t, a=self.a, b=self.b, sigma=self.sigma)


class MultistepState(NamedTuple):
  """The sample x, the noise key (unused by deterministic steps) and the previous step's
  input x_prev and network output eps_prev (zeros before the first step)."""
  x: jax.Array
  key: jax.Array
  x_prev: jax.Array
  eps_prev: jax.Array


def multistep_coeffs(t, a, b, c, d) -> MultistepCoeffs:
  """MultistepCoeffs from float64 arrays (cast to float32; t to int32; sigma = 0)."""
  f32 = lambda v: jnp.asarray(np.asarray(v, np.float64), jnp.float32)
  return MultistepCoeffs(t=jnp.asarray(t, jnp.int32), a=f32(a), b=f32(b),
                         sigma=f32(np.zeros(len(t))), c=f32(c), d=f32(d))


def multistep_sampler(coeffs: MultistepCoeffs) -> Sampler:
  """The sampler x_{i+1} = a_i x_i + b_i eps_i + c_i eps_{i-1} + d_i x_{i-1}.

  `step(state, eps, i, noise_scale=1.0)` keeps the Sampler contract; noise_scale is
  accepted and ignored (the steps add no noise).
  """
  if coeffs.stochastic:
    raise ValueError("multistep samplers here are deterministic: sigma must be 0.")

  def init(x_T, key):
    zeros = jnp.zeros_like(x_T)
    return MultistepState(x=x_T, key=key, x_prev=zeros, eps_prev=zeros)

  def step(state, eps, i, noise_scale=1.0):
    del noise_scale
    x = (coeffs.a[i] * state.x + coeffs.b[i] * eps + coeffs.c[i] * state.eps_prev
         + coeffs.d[i] * state.x_prev)
    return MultistepState(x=x, key=state.key, x_prev=state.x, eps_prev=eps)

  return Sampler(coeffs=coeffs, init=init, step=step)


def carried_difference(coeffs, i, state, ref):
  """What step i carries from the states `state` and `ref` into the difference of their
  next samples, besides the network outputs of step i: a_i (x - x_ref) and, for a
  multistep sampler, c_i (eps_prev - eps_prev_ref) + d_i (x_prev - x_prev_ref). With it,
  step(state, eps).x - step(ref, eps_ref).x = carried + b_i (eps - eps_ref) exactly."""
  out = coeffs.a[i] * (state.x - ref.x)
  if isinstance(coeffs, MultistepCoeffs):
    out = (out + coeffs.c[i] * (state.eps_prev - ref.eps_prev)
           + coeffs.d[i] * (state.x_prev - ref.x_prev))
  return out


def dpm_timesteps(num_timesteps: int, num_steps: int, spacing: str = "linspace",
                  steps_offset: int = 0) -> np.ndarray:
  """DPMSolverMultistepScheduler.set_timesteps' timesteps (lambda_min_clipped = -inf).

  `linspace` takes N of N+1 rounded points of [0, T-1], dropping 0 (for 10 of 1000: 999,
  899, ..., 100; unlike DDIM's linspace, which ends at 0); `leading` is
  (0..N) * (T // (N+1)) without 0, plus steps_offset; `trailing` is T-1, T-1-T/N, ...
  """
  check_num_steps(num_steps, num_timesteps)
  if spacing not in DPM_SPACINGS:
    raise ValueError(f"unknown DPM-Solver spacing {spacing!r}; choose one of {DPM_SPACINGS}.")
  if int(steps_offset) != steps_offset or steps_offset < 0:
    raise ValueError(f"steps_offset must be an integer >= 0, got {steps_offset}.")
  T = int(num_timesteps)
  if spacing == "linspace":
    ts = np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1]
  elif spacing == "leading":
    ts = (np.arange(num_steps + 1) * (T // (num_steps + 1))).round()[::-1][:-1] + steps_offset
  else:
    ts = np.arange(T, 0, -T / num_steps).round() - 1
  ts = ts.astype(np.int64)
  if np.unique(ts).size != num_steps or ts.size != num_steps or ts.min() < 0 or ts.max() >= T:
    raise ValueError(f"{spacing} spacing gives no {num_steps} distinct timesteps in "
                     f"[0, {T - 1}] (steps_offset={steps_offset}); use fewer steps.")
  return ts.copy()


def dpm_solver_coeffs(schedule: Schedule, num_steps: int, spacing: str = "linspace",
                      steps_offset: int = 0) -> MultistepCoeffs:
  """DPM-Solver++(2M) coefficients (module docstring), computed in float64."""
  ts = dpm_timesteps(schedule.num_timesteps, num_steps, spacing, steps_offset)
  ab = np.asarray(schedule.alphas_cumprod, np.float64)[ts]
  al = np.concatenate([np.sqrt(ab), [1.0]])
  s = np.concatenate([np.sqrt(1.0 - ab), [0.0]])
  n = num_steps
  phi = 1.0 - al[:n] * s[1:] / (s[:n] * al[1:])
  lam = np.log(al[:n] / s[:n])
  second = np.zeros(n, bool)
  second[1:n - 1] = True
  w = np.zeros(n)
  if n > 2:
    h = lam[1:] - lam[:-1]                        # h_i for i < n-1
    r = h[:-1] / h[1:]                            # r_i = h_{i-1} / h_i for 0 < i < n-1
    w[second] = al[1:][second] * phi[second] / (2 * r)
  main = al[1:] * phi + w
  a = s[1:] / s[:n] + main / al[:n]
  b = -main * s[:n] / al[:n]
  al_prev = np.concatenate([[1.0], al[:n - 1]])
  s_prev = np.concatenate([[0.0], s[:n - 1]])
  return multistep_coeffs(ts, a, b, w * s_prev / al_prev, -w / al_prev)


def dpm_solver_2m(schedule: Schedule, num_steps: int, spacing: str = "linspace",
                  steps_offset: int = 0) -> Sampler:
  """DPM-Solver++(2M), deterministic, for an eps-network (wrap v- or x0-networks with
  `prediction.as_epsilon`): diffusers' DPMSolverMultistepScheduler defaults."""
  return multistep_sampler(dpm_solver_coeffs(schedule, num_steps, spacing, steps_offset))
