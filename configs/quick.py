"""The one-minute try: the main job on the embedded default model, small enough to finish
in a couple of minutes on 2 CPU cores (W8A8, DDIM 10, 16 + 16 seeds, the default method
against plain PTQ, TAC-Diffusion and tcec). A first look, not a comparison:
configs/quantize.py is the real setting.

  python experiments/quantize.py --config=configs/quick.py --outdir=runs/quick
"""

import importlib.util
import os


def get_config():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quantize.py")
  spec = importlib.util.spec_from_file_location("configs_quantize", path)
  base = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(base)
  c = base.get_config()
  c.num_steps = 10
  c.num_calib = 16
  c.num_eval = 16
  c.settings = "W8A8"
  c.methods = "none,tac,tcec,tcec_safe"
  c.safe.fd_resamples = 50
  c.timing_repeats = 0
  return c
