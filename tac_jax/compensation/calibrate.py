"""Calibration by method name: `calibrate` (the front door, any registered method, the
library's default `tcec_safe` included) and `fit` (the pure scan of a per-step method, to
jit or shard at the call site)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from tac_jax.compensation import registry
from tac_jax.compensation.params import (CorrectionParams, check_params_finite, default_phi,
                                         zero_params)
from tac_jax.compensation.scan import (FitContext, Net, ScanOutput, calibration_scan,
                                       check_calibration_noise)
from tac_jax.diffusion.samplers import Sampler, batch_timestep, network_input
from tac_jax.host import to_host
from tac_jax.validate import check_applies


@dataclasses.dataclass(frozen=True)
class Calibration:
  """What `calibrate` returns for every method: the fitted params, the seconds it took,
  and the report of a validated method (`safe.SafeReport` for tcec_safe; None otherwise)."""
  method: str
  params: CorrectionParams
  seconds: float
  report: Optional[Any] = None


def is_multistep(sampler: Sampler) -> bool:
  """Whether a step also takes the previous step's output or state (nonzero c or d)."""
  c = sampler.coeffs
  return any(getattr(c, f, None) is not None and bool(np.any(np.asarray(getattr(c, f)) != 0))
             for f in ("c", "d"))


def _context(fp: Net, q: Net, sampler: Sampler, method: registry.Method, options) -> FitContext:
  if not method.multistep and is_multistep(sampler):
    raise ValueError(f"{method.name} models each step as x_next = a x + b eps, but this sampler "
                     "also mixes the previous step's output (a multistep solver); use a "
                     "method that supports it (none, ptqd, tac, per_step, tcec, tcec_safe) or a DDIM / "
                     "DDPM / Euler sampler.")
  if method.needs_schedule and sampler.schedule is None:
    raise ValueError(f"{method.name} re-derives the sampler's steps from its noise schedule, "
                     "but this sampler carries none: build it with samplers.ddim / ddpm / "
                     "make_sampler from a Schedule.")
  return FitContext(fp, q, sampler, registry.resolve_options(method, options))


NETS_FIX = ("x_T must be [B, H, W, C] with the model's image size and channel count, and each "
            "network's variables must be the ones of its model (fp: the float params; q: the "
            "quantized model's variables)")


def check_nets_apply(fp: Net, q: Net, sampler: Sampler, x_T: jax.Array, key: jax.Array) -> None:
  """Raises ValueError (`validate.check_applies`) when the float or the quantized network
  cannot take the call calibration makes first: the sampler's first network input from x_T
  (x and a [B] timestep; a guided net's conditions travel in its variables). Traces only."""
  first = lambda x, k: network_input(sampler, sampler.init(x, k), 0)
  x_in, t_in = jax.eval_shape(first, x_T, key)
  t = jax.eval_shape(batch_timestep, t_in, x_in)
  for name, net in (("float network fp", fp), ("quantized network q", q)):
    check_applies(net.apply, net.variables, (x_in, t), f"calibration: the {name}", NETS_FIX)


def _phi(sampler: Sampler, x_T, phi):
  return default_phi(sampler.coeffs, x_T.shape[-1]) if phi is None else jnp.asarray(phi, jnp.float32)


def fit_scan(fp: Net, q: Net, sampler: Sampler, x_T: jax.Array, key: jax.Array,
             method: str = "tcec", options=None, phi=None) -> ScanOutput:
  """The calibration scan of a per-step method (jittable): params and per-step NaN flags.
  A method that also has a `run` (tac's option search) is scanned at the `options` given."""
  m = registry.get(method)
  if m.run is not None and m.fit is None:
    raise ValueError(f"{method!r} calibrates outside one scan (it validates on held-out "
                     "seeds): call compensation.calibrate, not under jit.")
  ctx, phi = _context(fp, q, sampler, m, options), _phi(sampler, x_T, phi)
  if m.fit is None:
    check_calibration_noise(x_T)
    c = sampler.coeffs
    return ScanOutput(zero_params(c.num_steps, x_T.shape[-1], c.t, phi),
                      jnp.zeros((c.num_steps,), bool))
  return calibration_scan(m.fit(ctx), ctx, x_T, key, phi, registry.is_sequential(m, ctx.options),
                          None if m.init_aux is None else m.init_aux(x_T))


def fit(fp: Net, q: Net, sampler: Sampler, x_T: jax.Array, key: jax.Array,
        method: str = "tcec", options=None, phi=None) -> CorrectionParams:
  """`fit_scan`'s params: a per-step method's correction, fitted in one `lax.scan`."""
  return fit_scan(fp, q, sampler, x_T, key, method, options, phi).params


def calibrate(fp: Net, q: Net, sampler: Sampler, x_T: jax.Array, key: jax.Array,
              method: str = registry.DEFAULT_METHOD, options=None, phi=None) -> Calibration:
  """Fits a compensation method on calibration noise `x_T` (step-noise `key`).

  Args:
    fp, q: the float and the quantized network (`Net(apply, variables)`).
    sampler: the sampler the correction is for (its steps, timesteps and schedule).
    x_T: [B, H, W, C] calibration starting noise (may be sharded over devices).
    key: its step-noise key.
    method: a registered name (`registry.names()`); default the library's `tcec_safe`.
    options: the method's options (its `Method.options` type), default its defaults.
    phi: [N, C] propagation gains of the carried error estimate (default a_i).
  Returns:
    Calibration(method, params, seconds, report).
  Raises ValueError naming fp or q when a network does not accept the first call from x_T
  (`check_nets_apply`: e.g. x_T's channel count is not the model's).
  """
  m = registry.get(method)
  t0 = time.perf_counter()
  ctx = _context(fp, q, sampler, m, options)
  check_calibration_noise(x_T)
  check_nets_apply(fp, q, sampler, x_T, key)
  if m.run is not None:
    params, report = m.run(ctx, x_T, key, _phi(sampler, x_T, phi))
  else:
    run = jax.jit(lambda fp_, q_, x, k, p: fit_scan(fp_, q_, sampler, x, k, method, options, p))
    out, report = jax.block_until_ready(run(fp, q, x_T, key, _phi(sampler, x_T, phi))), None
    bad = to_host(out.bad)
    if bad.any():
      raise ValueError(f"{method} calibration: trajectories contain NaN/inf (first bad step "
                       f"{int(bad.argmax())}); check the quantized model and the input noise.")
    params = out.params
  check_params_finite(params, f"{method} calibration")
  return Calibration(method, params, time.perf_counter() - t0, report)


def online_sampler(method: str, sampler: Sampler, params: Optional[CorrectionParams],
                   q: Net) -> Sampler:
  """The sampler that applies `method`'s fitted `params` with the quantized network `q`."""
  return registry.get(method).online(sampler, params, q)
