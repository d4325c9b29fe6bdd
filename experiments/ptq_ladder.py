"""The base-PTQ ladder without compensation: every preset of `quant.presets` at W4A8 and
W4A4 on one shipped model, PSNR / SSIM / contrast / sharpness against the float model on
the main job's seeds (same noise), and the weight memory each preset stores.

  python experiments/ptq_ladder.py                                   # default model
  python experiments/ptq_ladder.py --checkpoint=tac_jax/assets/gray28_model --spacing=leading
"""

import argparse
import time

from tac_jax import report, stages
from tac_jax.diffusion import samplers
from tac_jax.quant import presets


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--checkpoint", default="")
  ap.add_argument("--spacing", default="uniform")
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--num_calib", type=int, default=64)
  ap.add_argument("--num_eval", type=int, default=128)
  ap.add_argument("--settings", default="W4A8,W4A4")
  ap.add_argument("--presets", default="minmax,mse,minmax_bc,qdiff,groupwise,smoothquant,svdquant,"
                                       "svdquant_bc")
  ap.add_argument("--attention_matmuls", action="store_true",
                  help="also quantize the attention matmuls (q k^T, softmax v)")
  args = ap.parse_args()
  model = stages.load_model(args.checkpoint)
  jit = stages.Compiled(model, samplers.make_sampler("ddim", model.schedule, args.steps, 0.0,
                                                     args.spacing))
  noise = stages.seed_noise(0, args.num_calib, args.num_eval, model.shape)   # the main job's
  ref = stages.float_reference(jit, model, noise.x_eval, noise.key_eval)
  calib = stages.calibration_batches(jit, model, noise)
  rows = []
  for setting in args.settings.split(","):
    for preset in args.presets.split(","):
      t0 = time.time()
      qm = stages.quantize(model, calib, presets.quant_config(
          presets.quant_defaults(), *stages.SETTINGS[setting], preset,
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
  main()
