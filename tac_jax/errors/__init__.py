"""Error propagation model, closed-form cumulative error, and compensation methods."""

from tac_jax.errors.compensation import (METHODS, REFERENCE_METHODS, SAFE_METHOD, VARIANTS,
                                         CompensatedState, CorrectionParams, ErrorState,
                                         FitConfig, TCECParams, check_params_finite,
                                         compensate, correction,
                                         get_fit_config, load_params, resample_params,
                                         save_params, scale_params, zero_params)
from tac_jax.errors.methods import SafeConfig, calibrate, calibrate_safe, choose_strength
from tac_jax.errors.propagation import (PropagationTrace, cumulative_error_recurrence,
                                        cumulative_error_scan, cumulative_error_solve,
                                        fit_channel_gains, joint_run, propagation_report)
from tac_jax.errors.reference import ReferenceConfig
