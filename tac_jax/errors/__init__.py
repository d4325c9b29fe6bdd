"""Error propagation model, closed-form cumulative error, and TCEC compensation."""

from tac_jax.errors.compensation import (VARIANTS, CompensatedState, ErrorState, FitConfig,
                                         TCECParams, calibrate, compensate, get_fit_config,
                                         load_params, resample_params, save_params,
                                         zero_params)
from tac_jax.errors.propagation import (PropagationTrace, cumulative_error_recurrence,
                                        cumulative_error_scan, cumulative_error_solve,
                                        fit_channel_gains, joint_run, propagation_report)
