"""The DDIM step re-derived from a sampler's noise schedule, for compensators that change
its timestep or its noise (StepbaQ's step-size adaptation, PTQD's variance absorption)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from tac_jax.diffusion.samplers import Sampler, ddim_direction


class DDIMTerms(NamedTuple):
  abar: np.ndarray      # [T] the schedule's abar_t (float64)
  ab_t: np.ndarray      # [N] abar at each step's timestep
  ab_prev: np.ndarray   # [N] abar at the next timestep (1 after the last step)
  sig2: np.ndarray      # [N] the step noise's variance


def ddim_terms(sampler: Sampler, who: str) -> DDIMTerms:
  """abar per step of a DDIM / DDPM `sampler`, checked against its coefficients."""
  if sampler.schedule is None:
    raise ValueError(f"{who} needs the sampler's noise schedule: build the sampler with "
                     "samplers.ddim / ddpm / make_sampler from a Schedule.")
  c = sampler.coeffs
  abar = np.asarray(sampler.schedule.alphas_cumprod, np.float64)
  t = np.asarray(c.t)
  ab_t = abar[t]
  ab_prev = np.concatenate([abar[t[1:]], [1.0]])
  sig2 = np.asarray(c.sigma, np.float64) ** 2
  b = ddim_direction(ab_t, ab_prev, sig2)
  if not (np.allclose(np.sqrt(ab_prev / ab_t), np.asarray(c.a), rtol=1e-4)
          and np.allclose(b, np.asarray(c.b), rtol=1e-3, atol=1e-5)):
    raise ValueError(f"{who} needs a DDIM or DDPM sampler built from its schedule (it "
                     "re-derives the DDIM coefficients); this sampler's a, b differ.")
  return DDIMTerms(abar, ab_t, ab_prev, sig2)

