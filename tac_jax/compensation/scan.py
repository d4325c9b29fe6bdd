"""The calibration scan every compensator shares, and the pair `Net(apply, variables)`.

Calibration is one jitted `lax.scan` over the sampler's steps whose carry is an explicit
pytree: (float state, compensated state, e_hat, cached eps_q, a method's own array). At
each step a method's per-step fit sees `StepInputs` and returns that step's
`CorrectionParams`; the compensated trajectory then advances with them applied exactly as
`compensate` applies them online, so every step is fitted on the error it will really
inherit (docs/METHOD.md s.3).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Tuple

import flax.struct
import jax
import jax.numpy as jnp

from tac_jax.compensation.online import correction, corrected_step
from tac_jax.compensation.params import CorrectionParams
from tac_jax.diffusion.samplers import ApplyFn, Sampler, batch_timestep, network_input, sample
from tac_jax.validate import check_finite_data


@flax.struct.dataclass
class Net:
  """A network as a pytree: `apply(variables, x, t) -> eps` (static, hashable) and its
  variables (leaves). `net(x, t)` calls it."""
  apply: ApplyFn = flax.struct.field(pytree_node=False)
  variables: Any

  def __call__(self, x, t):
    return self.apply(self.variables, x, t)


class StepInputs(NamedTuple):
  """What a method's per-step fit sees at scan position i."""
  i: jax.Array
  t: jax.Array            # [B] the sampler's timestep
  x_fp: jax.Array         # float trajectory
  x_c: jax.Array          # compensated quantized trajectory
  eps_fp: jax.Array       # eps(x_fp, t)
  e_hat: jax.Array        # carried estimate of plain PTQ's error
  eps_q_prev: jax.Array   # eps_q of step i-1 on the compensated trajectory (0 at i = 0)
  aux: Any                # a method's own carried pytree (`Method.init_aux`, zeros like x)
  state_c: Any            # the compensated sampler state (x_c and its step-noise key)
  state_fp: Any = None    # the float sampler state (a multistep sampler's previous x, eps)


# fit_step(StepInputs) -> (step params, eps_q at the network input they imply, next aux).
FitStep = Callable[[StepInputs], Tuple[CorrectionParams, jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class FitContext:
  """What a method needs to build its per-step fit: the float and quantized networks,
  the sampler (with its schedule) and the method's options."""
  fp: Net
  q: Net
  sampler: Sampler
  options: Any = None


def check_calibration_noise(x_T):
  if x_T.ndim < 2 or x_T.shape[0] == 0:
    raise ValueError(f"calibration needs at least one sample: got x_T of shape {x_T.shape}.")
  check_finite_data(x_T, "calibration starting noise x_T")


class ScanOutput(NamedTuple):
  params: CorrectionParams
  bad: jax.Array            # [N] whether step i produced NaN/inf


def calibration_scan(fit_step: FitStep, ctx: FitContext, x_T, key, phi,
                     sequential: bool = True, aux=None) -> ScanOutput:
  """Runs `fit_step` at every step of `ctx.sampler` from x_T (see the module docstring).

  `sequential=False` advances the quantized trajectory uncorrected (a method fitted on
  plain PTQ's trajectories); `aux` is the method's initial carried pytree (default zeros
  like x_T).
  """
  check_calibration_noise(x_T)
  sampler, fp = ctx.sampler, ctx.fp
  c = sampler.coeffs

  def body(carry, i):
    s_fp, s_c, e_hat, q_prev, aux = carry
    x_in, t_in = network_input(sampler, s_fp, i)
    t = batch_timestep(t_in, x_T)
    eps_fp = fp(x_in, t)
    p_i, eps_q, aux = fit_step(StepInputs(i, t, s_fp.x, s_c.x, eps_fp, e_hat, q_prev, aux, s_c,
                                                s_fp))
    p_i = p_i.replace(phi=phi[i], timesteps=c.t[i])
    if sequential:
      s_c, e_hat, _ = corrected_step(sampler, p_i, i, s_c, eps_q, e_hat, q_prev)
    else:
      e_hat = phi[i] * e_hat + c.b[i] * correction(p_i, eps_q, e_hat, q_prev)
      s_c = sampler.step(s_c, eps_q, i)
    bad = ~jnp.all(jnp.isfinite(eps_q)) | ~jnp.all(jnp.isfinite(s_c.x))
    return (sampler.step(s_fp, eps_fp, i), s_c, e_hat, eps_q, aux), (p_i, bad)

  init = (sampler.init(x_T, key), sampler.init(x_T, key), jnp.zeros_like(x_T),
          jnp.zeros_like(x_T), jnp.zeros_like(x_T) if aux is None else aux)
  _, (params, bad) = jax.lax.scan(body, init, jnp.arange(c.num_steps))
  return ScanOutput(params, bad)


def check_split(num_seeds: int, val_fraction: float, who: str = "tcec_safe",
                fix: str = "(and a val_fraction that leaves both parts a seed)") -> int:
  """The number of validation seeds of `num_seeds` calibration seeds; ValueError unless both
  the fit and the validation part get at least one."""
  n_val = int(round(num_seeds * val_fraction))
  if num_seeds < 2 or not 1 <= n_val < num_seeds:
    raise ValueError(f"{who} splits the calibration seeds into a fit and a validation "
                     f"part: got {num_seeds} seed(s) with val_fraction={val_fraction}; use "
                     f"config.num_calib >= 2 {fix}.")
  return n_val


def split_calibration(x_T: jax.Array, key: jax.Array, val_fraction: float, **check):
  """(x_fit, key_fit, x_val, key_val): disjoint seeds, independent step noise."""
  B = x_T.shape[0]
  n_val = check_split(B, val_fraction, **check)
  return x_T[:B - n_val], key, x_T[B - n_val:], jax.random.fold_in(key, 1)


def float_reference(fp: Net, sampler: Sampler, x_val: jax.Array, key_val: jax.Array) -> jax.Array:
  """The float network's final samples from the validation seeds: what a method scores its
  candidates against when it chooses on held-out calibration seeds (tcec_safe, tac)."""
  return jax.jit(lambda n, x, k: sample(n.apply, n.variables, sampler, x, k)[0].x)(fp, x_val, key_val)
