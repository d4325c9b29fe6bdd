"""The full comparison published in docs/results and docs/results_gray28 (the leaderboard):
the main job with every compensation method, including the ones the default config leaves
out (paper_m1, qncd, per_step). About 20 minutes on 2 CPU cores per model.

  python experiments/quantize.py --config=configs/full.py --outdir=runs/full
  python experiments/quantize.py --config=configs/full.py --outdir=runs/full_gray28 \
      --config.checkpoint=tac_jax/assets/gray28_model --config.spacing=leading
"""

from tac_jax.config_utils import sibling_config


def get_config():
  c = sibling_config(__file__, "quantize.py")
  c.methods = "none,ptqd,tac,stepbaq,paper_m1,qncd,per_step,tcec,tcec_safe"
  c.timing_repeats = 4
  return c
