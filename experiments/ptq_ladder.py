"""The base-PTQ ladder without compensation: every preset of `quant.presets` at W4A8 and
W4A4 on one shipped model, PSNR / SSIM / contrast / sharpness against the float model on
the main job's seeds (same noise), and the memory each preset stores. A flow model
(the DiT) is sampled with Euler, a DDPM-family one with DDIM.

  python experiments/ptq_ladder.py                                   # default model
  python experiments/ptq_ladder.py --checkpoint=tac_jax/assets/gray28_model --spacing=leading
  python experiments/ptq_ladder.py --checkpoint=dit_flow --outdir=docs/results_dit_ladder

`--variant="name;keep_8bit;exclude"` (repeatable) also runs each preset with those layer
regexes (config.quant.keep_8bit / exclude; empty: the default), e.g. the DiT's adaLN
modulations at 8 bits or in float:

  python experiments/ptq_ladder.py --checkpoint=dit_flow --presets=minmax \
      --variant="adaLN 8-bit;^.*/norm1/.*$;" --variant="adaLN float;;^.*/norm1/.*$"
"""

import time

from absl import flags

from tac_jax import files
from tac_jax.app import launch, report, stages
from tac_jax.app.settings import SETTINGS, SamplerSpec
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
_VARIANTS = flags.DEFINE_multi_string("variant", [], "'name;keep_8bit regex;exclude regex' "
                                      "(empty: the default); the default layers always run.")
_OUT = flags.DEFINE_string("outdir", "", "If set, write results.md and manifest.json there.")
_CONFIG_FLAGS = ("checkpoint", "spacing", "steps", "num_calib", "num_eval", "settings",
                 "presets", "attention_matmuls", "variant")


def variants():
  """[(name, quant overrides)]: the default layers first, then each --variant."""
  out = [("default layers", {})]
  for v in _VARIANTS.value:
    parts = v.split(";")
    if len(parts) != 3 or not parts[0]:
      raise ValueError(f"--variant={v!r}: write it as 'name;keep_8bit regex;exclude regex'.")
    name, keep, exclude = parts
    out.append((name, {k: r for k, r in (("keep_8bit", keep), ("exclude", exclude)) if r}))
  return out


def main():
  args = flags.FLAGS
  outdir = files.check_output_dir(_OUT.value, launch.OVERWRITE.value) if _OUT.value else None
  cases = variants()
  model = stages.load_model(args.checkpoint)
  kind = "euler" if model.prediction == "flow" else "ddim"
  jit = stages.Compiled(model, SamplerSpec(kind, args.steps, spacing=args.spacing).build(
      model.schedule))
  noise = stages.seed_noise(0, args.num_calib, args.num_eval, model.shape)   # the main job's
  ref = stages.float_reference(jit, model, noise.x_eval, noise.key_eval)
  calib = stages.calibration_batches(jit, model, noise)
  rows = []
  for setting in args.settings:
    for preset in args.presets:
      for name, overrides in cases:
        t0 = time.time()
        section = presets.quant_defaults()
        section.update(overrides)
        qm = stages.quantize(model, calib, presets.quant_config(
            section, *SETTINGS[setting], preset, attention_matmuls=args.attention_matmuls))
        ev = stages.evaluate(jit, qm, jit.none, noise.x_eval, noise.key_eval, ref,
                             decode=model.decode)
        mem = qm.memory_report(model.params)
        rows.append([setting, preset, name, f"{ev['psnr']['mean']:.2f} ± {ev['psnr']['std']:.2f}",
                     f"{ev['ssim']['mean']:.3f}", f"{ev['std_ratio']:.3f}",
                     f"{ev['sharpness_ratio']:.3f}",
                     f"{(mem['layers_stored'] + mem['layers_overhead']) / 1e6:.3f}",
                     f"{mem['model_quantized'] / 1e6:.3f}",
                     f"{mem['low_rank_float32'] / 1e6:.3f}"])
        print(f"[{time.time() - t0:5.1f}s] {setting} {preset} {name}: PSNR "
              f"{ev['psnr']['mean']:.2f} dB", flush=True)
  table = report.markdown_table(
      ["setting", "preset", "layers", "PSNR (dB)", "SSIM", "std ratio", "sharpness ratio",
       "quantized layers (MB)", "whole model (MB)", "low-rank branch (MB)"], rows)
  text = (f"{model.meta.get('architecture', 'model')} {args.checkpoint or 'default'}, {kind} "
          f"{args.steps} steps, {args.num_calib} calibration / {args.num_eval} evaluation "
          f"seeds, no compensation. Float model: {mem['model_float32'] / 1e6:.3f} MB. "
          "Quantized layers: their integer weights and scales; whole model: every array "
          "the quantized model holds (layers left in float included).\n\n"
          + "\n".join(table) + "\n\nLayers: " + "; ".join(
              f"{n}: {o or 'the quant section defaults'}" for n, o in cases) + "\n")
  print("\n" + text)
  if outdir:
    config = {f: flags.FLAGS[f].value for f in _CONFIG_FLAGS}
    print(f"wrote {files.write_report(outdir, text, config)}")


if __name__ == "__main__":
  launch.main(main)
