"""The main job on the shipped class-conditional flow-matching DiT (configs/dit_flow_model.py):
Euler 20 steps, classifier-free guidance at the model's w on all ten classes, every method
that holds for a flow sampler (StepbaQ and QNCD re-derive DDPM steps and refuse it), with
label accuracy next to FD, the DiT's first / last / embedding / adaLN layers at 8 bits.
Published in docs/results_dit_flow.

  python experiments/quantize.py --config=configs/quantize_dit.py --outdir=runs/dit_flow
"""

from tac_jax.config_utils import sibling_config
from tac_jax.quant import presets


def get_config():
  c = sibling_config(__file__, "quantize.py")
  c.checkpoint = "dit_flow"
  c.sampler = "euler"
  c.num_steps = 20
  c.methods = "none,ptqd,tac,paper_m1,per_step,tcec,tcec_safe"
  # Patch embedding, output layers, timestep embeddings and adaLN modulations at W8A8
  # (measured: docs/results_dit_layers), as the UNets keep their first / last / time layers.
  c.quant.keep_8bit = presets.DIT_KEEP_8BIT
  return c
