"""The base-PTQ ladder without compensation: every preset of `quant.presets` at W4A8 and
W4A4 on one shipped model, PSNR / SSIM / contrast / sharpness against the float model on
the main job's seeds (same noise), and the weight memory each preset stores.

  python experiments/ptq_ladder.py                                   # default model
  python experiments/ptq_ladder.py --checkpoint=tac_jax/assets/gray28_model --spacing=leading
"""

import time

from absl import flags

from tac_jax.app import launch, report, stages
from tac_jax.app.settings import SETTINGS
from tac_jax.diffusion import samplers
from tac_jax.quant import presets

_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "Model directory; '' = the default model.")
_SPACING = flags.DEFINE_string("spacing", "uniform", "Timestep spacing (diffusers' names).")
_STEPS = flags.DEFINE_integer("steps", 20, "DDIM steps.")
_NUM_CALIB = flags.DEFINE_integer("num_calib", 64, "Calibration seeds (the main job's).")
_NUM_EVAL = flags.DEFINE_integer("num_eval", 128, "Evaluation seeds (the main job's).")
_SETTINGS = flags.DEFINE_list("settings", ["W4A8", "W4A4"], "Settings.")
_PRESETS = flags.DEFINE_list("presets", ["minmax", "mse", "minmax_bc", "qdiff", "groupwise",
                                         "smoothquant", "svdquant", "svdquant_bc"], "PTQ presets.")
_ATTENTION = flags.DEFINE_bool("attention_matmuls", False,
                               "Also quantize the attention matmuls (q k^T, softmax v).")


def main():
  args = flags.FLAGS
  model = stages.load_model(args.checkpoint)
  jit = stages.Compiled(model, samplers.make_sampler("ddim", model.schedule, args.steps, 0.0,
                                                     args.spacing))
  noise = stages.seed_noise(0, args.num_calib, args.num_eval, model.shape)   # the main job's
  ref = stages.float_reference(jit, model, noise.x_eval, noise.key_eval)
  calib = stages.calibration_batches(jit, model, noise)
  rows = []
  for setting in args.settings:
    for preset in args.presets:
      t0 = time.time()
      qm = stages.quantize(model, calib, presets.quant_config(
          presets.quant_defaults(), *SETTINGS[setting], preset,
          attention_matmuls=args.attention_matmuls))
      ev = stages.evaluate(jit, qm, jit.none, noise.x_eval, noise.key_eval, ref)
      mem = qm.memory_report(model.params)
      rows.append([setting, preset, f"{ev['psnr']['mean']:.2f} ± {ev['psnr']['std']:.2f}",
                   f"{ev['ssim']['mean']:.3f}", f"{ev['std_ratio']:.3f}",
                   f"{ev['sharpness_ratio']:.3f}",
                   f"{(mem['layers_stored'] + mem['layers_overhead']) / 1e6:.3f}",
                   f"{mem['low_rank_float32'] / 1e6:.3f}"])
      print(f"[{time.time() - t0:5.1f}s] {setting} {preset}: PSNR {ev['psnr']['mean']:.2f} dB",
            flush=True)
  print(f"\nfloat layers: {mem['layers_float32'] / 1e6:.3f} MB (8x limit "
        f"{mem['layers_float32'] / 8e6:.3f} MB)\n")
  print("\n".join(report.markdown_table(
      ["setting", "preset", "PSNR (dB)", "SSIM", "std ratio", "sharpness ratio",
       "weights + scales (MB)", "low-rank branch (MB)"], rows)))


if __name__ == "__main__":
  launch.main(main)
