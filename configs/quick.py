"""The one-minute try: the main job on the embedded default model, small enough to finish
in a couple of minutes on 2 CPU cores (W8A8, DDIM 10, 16 + 16 seeds, the default method
against plain PTQ, TAC-Diffusion and tcec). A first look, not a comparison:
configs/quantize.py is the real setting.

  python experiments/quantize.py --config=configs/quick.py --outdir=runs/quick
"""

from tac_jax.config_utils import sibling_config


def get_config():
  c = sibling_config(__file__, "quantize.py")
  c.num_steps = 10
  c.num_calib = 16
  c.num_eval = 16
  c.settings = "W8A8"
  c.methods = "none,tac,tcec,tcec_safe"
  c.safe.fd_resamples = 50
  c.timing_repeats = 0
  return c
