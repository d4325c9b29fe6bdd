"""The full comparison published in docs/results and docs/results_gray28 (the leaderboard):
the main job with every compensation method, including the ones the default config leaves
out (paper_m1, qncd, per_step). About 20 minutes on 2 CPU cores per model.

  python experiments/quantize.py --config=configs/full.py --outdir=runs/full
  python experiments/quantize.py --config=configs/full.py --outdir=runs/full_gray28 \
      --config.checkpoint=tac_jax/assets/gray28_model --config.spacing=leading
"""

import importlib.util
import os


def get_config():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quantize.py")
  spec = importlib.util.spec_from_file_location("configs_quantize", path)
  base = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(base)
  c = base.get_config()
  c.methods = "none,ptqd,tac,stepbaq,paper_m1,qncd,per_step,tcec,tcec_safe"
  c.timing_repeats = 4
  return c
