"""Train a diffusion UNet or DiT (epsilon or flow matching, optionally class-conditional).

  python experiments/train.py --config=configs/default_model.py --workdir=runs/default \
      [--export_dir=runs/default_export] [--figure=docs/default_model_samples.png] \
      [--config.num_train_steps=500]
  python experiments/train.py --config=configs/dit_flow_model.py --workdir=runs/dit_flow

Checkpoints and a sample grid go to --workdir (a run there resumes). --export_dir, if given,
receives the EMA params as a model folder: it must be new, or an earlier export (it holds
model.json) replaced with --overwrite; it is checked before training starts. Nothing is
written anywhere else (--figure names an extra copy of the grid).
"""

import os
import time

import jax
from absl import flags

from tac_jax import files
from tac_jax.app import launch
from tac_jax.app import train as train_lib
from tac_jax.app import viz

_CONFIG = launch.define_config("config", "configs/default_model.py", "Training config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default_model", "Checkpoints and samples go here.")
_EXPORT = flags.DEFINE_string("export_dir", None, "Also export the EMA params as a model dir.")
_FIGURE = flags.DEFINE_string("figure", None, "Also write the sample grid (PNG) to this path.")


def main():
  config = _CONFIG.value
  export = _EXPORT.value
  if export:
    export = files.check_output_dir(export, launch.OVERWRITE.value, flag="--overwrite",
                                    marker=files.META_JSON, what="a tac_jax model")
  if _FIGURE.value and os.path.isdir(_FIGURE.value):
    raise ValueError(f"--figure={_FIGURE.value} is a folder; name a .png file.")
  t0 = time.time()
  out = train_lib.train(config, _WORKDIR.value, export_dir=export)
  minutes = (time.time() - t0) / 60
  print(f"training took {minutes:.1f} min on {jax.device_count()} {jax.devices()[0].platform} device(s)")
  imgs, cols = train_lib.sample_grid(config, out)
  if jax.process_index() != 0:
    return
  for p in [os.path.join(_WORKDIR.value, "samples.png")] + ([_FIGURE.value] if _FIGURE.value else []):
    viz.save_grid(p, imgs, cols=cols)
    print(f"wrote {p}")


if __name__ == "__main__":
  launch.main(main)
