"""The evaluation sweep (experiments/sweep.py) on the embedded default model."""

import ml_collections

from tac_jax.quant import presets


def get_config():
  c = ml_collections.ConfigDict()
  c.model = ""                      # any Flax eps model: "package.module:factory" (README)
  c.plugins = ""                    # modules to import first (e.g. registering a compensator)
  c.checkpoint = ""                       # "" = the embedded default model
  c.seeds = "0,1,2"                       # each seed: its own calibration + evaluation noise
  c.settings = "W8A8,W4A8,W4A4"
  c.methods = "none,ptqd,tac,stepbaq,paper_m1,qncd,per_step,tcec,tcec_safe"  # compensation.names()
  c.samplers = "ddim10,ddim25,ddim50,ddpm50"   # ddim<steps> / ddpm<steps>
  c.ref_sampler = "ddim25"                # PTQ calibration, PTQ options, FD, ablations
  c.spacing = "uniform"                   # every sampler: uniform, leading, trailing, ...
  c.steps_offset = 0                      # diffusers' options, as in configs/quantize.py
  c.clip_sample = False
  c.thresholding = 0.0
  c.sample_max_value = 1.0
  c.ptq_options = "minmax,mse,minmax_tg4,svdquant" # presets[_tg<groups>]; first = main grid's
  c.num_calib = 64
  c.num_eval = 128
  c.num_fd = 1000                         # Frechet distance samples (first seed); 0 = skip
  c.fd_methods = "none,ptqd,tac,stepbaq,paper_m1,qncd,per_step,tcec,tcec_safe"  # get an FD
  c.fd_data = "digits"
  c.fd_data_seed = 1000                   # colors of the real-data reference set
  c.ablation_settings = "W4A8,W4A4"
  c.ablations = "tcec,same_input,one_shot,per_tensor,no_intercept,ehat"  # sweep.ABLATIONS
  c.calib_sizes = "8,32,256"
  c.quant = presets.quant_defaults()   # tac_jax/quant/presets.py: shared with the sweep
  return c
