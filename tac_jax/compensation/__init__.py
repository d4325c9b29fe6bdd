"""Compensation of quantization error in diffusion samplers (docs/METHOD.md).

    from tac_jax import compensation as comp
    cal = comp.calibrate(comp.Net(model.apply, fp_vars), comp.Net(q_apply, q_vars),
                         sampler, x_T, key)                 # default method: tcec_safe
    s = comp.online_sampler(cal.method, sampler, cal.params, comp.Net(q_apply, q_vars))

Layout: `params` (the CorrectionParams pytree and its checks), `lstsq` (least squares
from sufficient statistics), `online` (the corrected step and `compensate`), `scan` (the
calibration scan and `Net`), `registry` (one `Method` per compensator), `calibrate`
(calibration by name), one module per method (`least_squares`: none / per_step / tcec*,
`ptqd`, `tac`, `stepbaq`, `paper_m1`, `qncd`, `safe`: tcec_safe), `io` (save / load) and
`propagation` (the error model and its closed form).
"""

# Importing a method's module registers it; the order is the registry's (and reports').
from tac_jax.compensation import least_squares, ptqd, tac, stepbaq, paper_m1, qncd, safe  # noqa: F401
from tac_jax.compensation.calibrate import (Calibration, calibrate, fit, fit_scan, is_multistep,
                                           online_sampler)
from tac_jax.compensation.io import load_params, save_params
from tac_jax.compensation.least_squares import FitConfig
from tac_jax.compensation.online import CompensatedState, ErrorState, compensate, correction
from tac_jax.compensation.paper_m1 import PaperM1Options
from tac_jax.compensation.params import (CorrectionParams, check_params, check_params_finite,
                                         default_phi, resample_params, scale_params, zero_params)
from tac_jax.compensation.propagation import (PropagationTrace, cumulative_error_recurrence,
                                              cumulative_error_scan, cumulative_error_solve,
                                              fit_channel_gains, joint_run, propagation_report)
from tac_jax.compensation.qncd import QNCDOptions
from tac_jax.compensation.registry import DEFAULT_METHOD, Method, get, names, register, unregister
from tac_jax.compensation.safe import SafeConfig, SafeReport
from tac_jax.compensation.scan import FitContext, Net, StepInputs, check_split
from tac_jax.compensation.tac import TACOptions, TACReport
