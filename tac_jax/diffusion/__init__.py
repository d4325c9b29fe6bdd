"""Noise schedules, parameterisations and samplers as (init, step) pairs run by one
`lax.scan`: DDIM / DDPM (`samplers`), rectified-flow Euler / Heun (`flow`), DPM-Solver++ 2M
(`multistep`), epsilon / v / x0 prediction (`prediction`)."""

from tac_jax.diffusion.schedules import Schedule, make_schedule, timestep_subsequence
from tac_jax.diffusion.samplers import (Sampler, SamplerState, StepCoeffs, X0Rule, affine_sampler,
                                        ddim, ddim_coeffs, ddpm, ddpm_coeffs, linearise,
                                        make_sampler, sample)
from tac_jax.diffusion.flow import flow_euler, flow_heun, flow_matching_loss, flow_sigmas
from tac_jax.diffusion.multistep import dpm_solver_2m
from tac_jax.diffusion.prediction import as_epsilon
from tac_jax.diffusion.guidance import (ClassGuided, Condition, Guided, GuidedApply,
                                        calibration_batches, guided, unconditional)
