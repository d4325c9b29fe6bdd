"""Shared set-up of the benchmarks: the embedded default model, quantized and calibrated."""

from typing import Any, NamedTuple

import jax

from tac_jax.models import checkpoint as ckpt_lib
from tac_jax import errors, quant, stages
from tac_jax.quant import presets
from tac_jax.diffusion import make_schedule, samplers


class Setup(NamedTuple):
  module: Any
  params: Any
  sampler: samplers.Sampler
  qmodel: quant.QuantizedModel
  tcec: errors.TCECParams
  x: jax.Array          # [batch, H, W, C] starting noise
  key: jax.Array


def quantized_default_model(setting: str, steps: int, batch: int) -> Setup:
  """PTQ of the default model at `setting` (ranges from the float trajectories of the batch)
  and TCEC fitted on the same seeds: enough for timing, not for quality figures."""
  module, params, meta = ckpt_lib.load_model(ckpt_lib.default_model_dir())
  sampler = samplers.ddim(make_schedule(**meta["schedule"]), steps)
  mc = module.config
  x = jax.random.normal(jax.random.key(0), (batch, mc.sample_size, mc.sample_size, mc.in_channels))
  key = jax.random.key(1)
  var_fp = {"params": params}
  _, traj = samplers.sample(module.apply, var_fp, sampler, x, key, return_trajectory=True)
  calib = samplers.calibration_batches(traj, sampler.coeffs)
  w, a = stages.SETTINGS[setting]
  qm = quant.quantize_model(module, params, calib,
                            presets.quant_config(presets.quant_defaults(), w, a, "minmax"))
  tcec = jax.jit(lambda v, x: errors.calibrate(module.apply, var_fp, qm.apply_fn("fake"), v,
                                               sampler, x, key))(qm.variables, x)
  return Setup(module, params, sampler, qm, tcec, x, key)
