from tac_jax.diffusion.schedules import Schedule, make_schedule, timestep_subsequence
from tac_jax.diffusion.samplers import (Sampler, SamplerState, StepCoeffs, X0Rule, affine_sampler,
                                        ddim, ddim_coeffs, ddpm, ddpm_coeffs, linearise,
                                        make_sampler, sample)
