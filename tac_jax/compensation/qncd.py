"""QNCD's inter-step noise correction (code: huanpengchu/QNCD, `ldm/models/diffusion/
plms.py`, MIT; ../shared/REFERENCES.md), on any DDIM / DDPM sampler.

Nothing is fitted offline. While sampling, at every `interval`-th step (scan positions i
with (i - 1) mod interval = interval // 2, as the reference code counts) the step is first
taken with the uncorrected output, giving a tentative x_prev; x_prev is re-noised one step
with a known eps, x_re = sqrt(abar_t / abar_prev) x_prev + sqrt(1 - abar_t / abar_prev) eps,
the quantized network is called on (x_re, t), and the scalar mean of (eps_q(x_re) - eps)
becomes the bias estimate m. The step is then retaken with eps_q - m, and every following
step subtracts m until the next re-estimate (the reference sets its std term to 0). One
extra network call per `interval` steps. The intra-step embedding smoothing of the paper
is a PTQ-side change of the UNet's resblocks and is not part of this compensator.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from tac_jax.compensation.ddim import ddim_terms
from tac_jax.compensation.online import ErrorState
from tac_jax.compensation.params import check_params, zero_params
from tac_jax.compensation.registry import Method, register
from tac_jax.compensation.scan import FitContext, Net
from tac_jax.diffusion.samplers import Sampler, batch_timestep, step_noise

PROBE_STREAM = 0x51C   # fold_in stream of the known eps (apart from the step noise)


@dataclasses.dataclass(frozen=True)
class QNCDOptions:
  interval: int = 10        # re-estimate the output bias every `interval` steps

  def __post_init__(self):
    if int(self.interval) != self.interval or self.interval < 1:
      raise ValueError(f"QNCDOptions.interval must be an integer >= 1, got {self.interval}.")


def probe_steps(num_steps: int, interval: int) -> jax.Array:
  i = jnp.arange(num_steps)
  return ((i - 1) % interval == interval // 2).astype(jnp.float32)


def qncd_run(ctx: FitContext, x_T, key, phi):
  """The params QNCD needs (which steps re-estimate); nothing else is calibrated."""
  del key
  ddim_terms(ctx.sampler, "qncd")
  c = ctx.sampler.coeffs
  params = zero_params(c.num_steps, x_T.shape[-1], c.t, phi)
  return params.replace(probe=probe_steps(c.num_steps, ctx.options.interval)), None


class QNCDState(NamedTuple):
  inner: Any
  error: ErrorState
  bias: jax.Array           # the current scalar estimate m

  @property
  def x(self):
    return self.inner.x


def qncd_sampler(sampler: Sampler, params, q: Net) -> Sampler:
  """`sampler` with QNCD's run-time bias estimate (`params.probe` marks the steps)."""
  check_params(params, sampler)
  terms = ddim_terms(sampler, "qncd")
  renoise = jnp.asarray(terms.ab_t / terms.ab_prev, jnp.float32)   # abar_t / abar_prev
  c = sampler.coeffs

  def init(x_T, key):
    return QNCDState(sampler.init(x_T, key), ErrorState(jnp.zeros_like(x_T)), jnp.zeros(()))

  def estimate(state, eps_q, i):
    x_prev = sampler.step(state.inner, eps_q, i).x
    eps = step_noise(jax.random.fold_in(state.inner.key, PROBE_STREAM), i, x_prev.shape,
                     x_prev.dtype)
    x_re = jnp.sqrt(renoise[i]) * x_prev + jnp.sqrt(1.0 - renoise[i]) * eps
    return jnp.mean(q(x_re, batch_timestep(c.t[i], x_re)) - eps)

  def step(state: QNCDState, eps_q, i):
    bias = jax.lax.cond(params.probe[i] > 0, lambda: estimate(state, eps_q, i),
                        lambda: state.bias)
    return QNCDState(sampler.step(state.inner, eps_q - bias, i), state.error, bias)

  return sampler._replace(init=init, step=step)


register(Method("qncd", "QNCD: run-time output bias re-estimated every `interval` steps "
                "(one extra network call each)", run=qncd_run, options=QNCDOptions(),
                online=qncd_sampler, needs_schedule=True, extra_calls=0.1, calibration_calls=0))
