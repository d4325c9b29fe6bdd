"""Export -> load -> sample on the shipped models: bit identity and size on disk (issue 27).

  python experiments/artifact_check.py [--models=default,gray28,dit_flow] \
      [--outdir=docs/results_artifact]

For each shipped model and each (setting, base PTQ) of the grid, the main job's stages on
a few calibration seeds (float trajectories, PTQ, a tcec fit), then the quantized model
with its correction is exported (tac_jax.app.artifact), loaded back without the float
checkpoint, and both sample the same held-out seeds, fake-quant and on the integer path.
The table gives whether the loaded samples equal the in-memory model's bit for bit, the
largest difference, and the artifact's size on disk next to the float checkpoint's.
"""

import os
import tempfile
import time

import numpy as np
from absl import flags

from tac_jax import files
from tac_jax.app import artifact, launch, stages
from tac_jax.app.settings import SETTINGS, SamplerSpec
from tac_jax.quant import presets

_MODELS = flags.DEFINE_list("models", ["default", "gray28", "dit_flow"], "Shipped models.")
_GRID = flags.DEFINE_list("grid", ["W8A8:minmax", "W4A8:minmax", "W4A4:minmax",
                                   "W8A8:svdquant_bc", "W4A4:svdquant_bc"],
                          "setting:ptq pairs.")
_STEPS = flags.DEFINE_integer("steps", 10, "Sampler steps (DDIM, Euler for flow models).")
_CALIB = flags.DEFINE_integer("num_calib", 8, "Calibration seeds.")
_EVAL = flags.DEFINE_integer("num_eval", 8, "Held-out seeds sampled from both.")
_OUT = flags.DEFINE_string("outdir", "", "If set, write results.md and manifest.json there.")
_CONFIG_FLAGS = ("models", "grid", "steps", "num_calib", "num_eval")


def _check(model, spec, jit, noise, calib, setting, ptq, tmp):
  qm = stages.quantize(model, calib, presets.quant_config(presets.quant_defaults(),
                                                          *SETTINGS[setting], ptq))
  cal = stages.fit_method("tcec", model, jit, qm, noise)
  path = os.path.join(tmp, f"{setting}_{ptq}")
  record = artifact.export(path, model, qm, spec, cal)
  t0 = time.perf_counter()
  art = artifact.load(path)
  load_s = time.perf_counter() - t0
  same, diff = [], 0.0
  for mode in ("fake", "int"):
    want, _, _ = jit.sample(qm.apply_fn(mode), qm.variables, cal, noise.x_eval, noise.key_eval)
    got = np.asarray(art.sample(noise.x_eval, noise.key_eval, mode))
    same.append(np.array_equal(got, np.asarray(want)))
    diff = max(diff, float(np.max(np.abs(got - np.asarray(want)))))
  return {"same": all(same), "diff": diff, "bytes": record["bytes"], "load_s": load_s,
          "float": record["float_checkpoint_bytes"]}


def main():
  outdir = files.check_output_dir(_OUT.value, launch.OVERWRITE.value) if _OUT.value else None
  lines = ["| model | setting | base PTQ | bit-identical (fake, int) | max diff | artifact kB "
           "| float checkpoint kB | ratio | load s |", "|---|---|---|---|---|---|---|---|---|"]
  with tempfile.TemporaryDirectory() as tmp:
    for name in _MODELS.value:
      model = stages.load_model(name)
      spec = SamplerSpec("euler" if model.prediction == "flow" else "ddim", _STEPS.value)
      jit = stages.Compiled(model, spec.build(model.schedule))
      noise = stages.seed_noise(0, _CALIB.value, _EVAL.value, model.shape)
      calib = stages.calibration_batches(jit, model, noise)
      for pair in _GRID.value:
        setting, _, ptq = pair.partition(":")
        r = _check(model, spec, jit, noise, calib, setting, ptq, os.path.join(tmp, name))
        lines.append(f"| {name} | {setting} | {ptq} | {'yes' if r['same'] else 'NO'} | "
                     f"{r['diff']:.1e} | {r['bytes'] / 1e3:.0f} | {r['float'] / 1e3:.0f} | "
                     f"{r['float'] / r['bytes']:.1f}x | {r['load_s']:.2f} |")
        print(lines[-1], flush=True)
  text = "\n".join(lines) + "\n"
  print(text)
  if outdir:
    config = {f: flags.FLAGS[f].value for f in _CONFIG_FLAGS}
    print(f"wrote {files.write_report(outdir, text, config)}")


if __name__ == "__main__":
  launch.main(main)
