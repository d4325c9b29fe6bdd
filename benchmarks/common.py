"""Shared set-up of the benchmarks: the embedded default model, quantized and calibrated."""

from typing import Any, NamedTuple

import jax

from tac_jax import compensation, models, quant
from tac_jax.app.settings import SETTINGS
from tac_jax.diffusion import make_schedule, samplers
from tac_jax.quant import presets


class Setup(NamedTuple):
  module: Any
  params: Any
  sampler: samplers.Sampler
  qmodel: quant.QuantizedModel
  tcec: compensation.CorrectionParams
  x: jax.Array          # [batch, H, W, C] starting noise
  key: jax.Array


def quantized_default_model(setting: str, steps: int, batch: int) -> Setup:
  """PTQ of the default model at `setting` (ranges from the float trajectories of the batch)
  and TCEC fitted on the same seeds: enough for timing, not for quality figures."""
  module, params, meta = models.load_pretrained("default")
  sampler = samplers.ddim(make_schedule(**meta["schedule"]), steps)
  mc = module.config
  x = jax.random.normal(jax.random.key(0), (batch, mc.sample_size, mc.sample_size, mc.in_channels))
  key = jax.random.key(1)
  var_fp = {"params": params}
  _, traj = samplers.sample(module.apply, var_fp, sampler, x, key, return_trajectory=True)
  calib = samplers.calibration_batches(traj, sampler.coeffs)
  w, a = SETTINGS[setting]
  qm = quant.quantize_model(module, params, calib,
                            presets.quant_config(presets.quant_defaults(), w, a, "minmax"))
  tcec = compensation.calibrate(compensation.Net(module.apply, var_fp),
                                compensation.Net(qm.apply_fn("fake"), qm.variables), sampler, x,
                                key, "tcec").params
  return Setup(module, params, sampler, qm, tcec, x, key)
