"""Shared set-up of the benchmarks: the embedded default model, quantized and calibrated."""

from typing import Any, NamedTuple

import jax

from tac_jax import checkpoint as ckpt_lib
from tac_jax import errors, pipeline, quant
from tac_jax.diffusion import make_schedule, samplers

KEEP_8BIT = r"^(conv_in|conv_out|time_embedding/.*)$"


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
  w, a = pipeline.SETTINGS[setting]
  qm = quant.quantize_model(module, params, calib,
                            quant.QuantConfig(w_bits=w, a_bits=a, keep_8bit=KEEP_8BIT))
  tcec = jax.jit(lambda v, x: errors.calibrate(module.apply, var_fp, qm.apply_fn("fake"), v,
                                               sampler, x, key))(qm.variables, x)
  return Setup(module, params, sampler, qm, tcec, x, key)
