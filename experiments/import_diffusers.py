"""Import a diffusers UNet2DModel (e.g. the DDPM CIFAR-10 32x32 model) as a tac_jax model.

  python experiments/import_diffusers.py --source=path/to/ddpm-cifar10-32 --outdir=runs/cifar10
  python experiments/quantize.py --config.checkpoint=runs/cifar10 --outdir=runs/cifar10_ptq

`--source` is a diffusers model directory (config.json + diffusion_pytorch_model.safetensors
or .bin, possibly under unet/); a scheduler_config.json beside it sets the noise schedule.
Nothing is downloaded: fetch the model with your own tools first. An existing --outdir is
replaced only if it is a tac_jax model folder (it holds model.json) and --overwrite is given.
"""

import time

import jax
import numpy as np
from absl import flags

from tac_jax import files
from tac_jax.app import launch
from tac_jax.models import checkpoint
from tac_jax.models import convert

_SOURCE = flags.DEFINE_string("source", None, "diffusers model directory.", required=True)
_WEIGHTS = flags.DEFINE_string("weights", None, "Weights file, if not in --source.")
_OUTDIR = flags.DEFINE_string("outdir", None, "tac_jax model directory to write.", required=True)


def main():
  t0 = time.time()
  outdir = files.check_output_dir(_OUTDIR.value, launch.OVERWRITE.value, marker=files.META_JSON,
                                  what="a tac_jax model")
  out = convert.export_checkpoint(_SOURCE.value, outdir, _WEIGHTS.value)
  module, params, meta = checkpoint.load_model(out)  # read back: the written files are complete
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  print(f"imported {n:,} parameters ({meta['model']['block_out_channels']} channels, "
        f"{meta['model']['sample_size']}px) in {time.time() - t0:.1f}s -> {out}")
  print(f"quantize it with: python experiments/quantize.py --config.checkpoint={out}")


if __name__ == "__main__":
  launch.main(main)
