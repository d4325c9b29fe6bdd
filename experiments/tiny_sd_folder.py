"""Writes a tiny random Stable Diffusion-like diffusers folder (unet/, vae/, scheduler/) and
a prompts .npz, for running the main job on the latent text-to-image path without weights:

  python experiments/tiny_sd_folder.py --out=/tmp/tiny_sd
  python experiments/quantize.py --config=configs/quantize.py \
      --config.model=diffusers:/tmp/tiny_sd --config.conditions=/tmp/tiny_sd/prompts.npz \
      --config.guidance_scale=3 --config.frechet=False --outdir=docs/results_tiny_sd

A smoke test of the whole path (random weights: no quality claim). Needs the torch extra.
The same folder as tests/test_latent.py builds.
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))

_OUT = flags.DEFINE_string("out", None, "folder to write", required=True)


def main(_):
  import torch   # pylint: disable=import-outside-toplevel
  import diffusers   # pylint: disable=import-outside-toplevel
  from test_latent import write_tiny_sd   # pylint: disable=import-outside-toplevel
  write_tiny_sd(_OUT.value, torch, diffusers)
  print(f"wrote {_OUT.value}: unet/, vae/, scheduler/, prompts.npz")


if __name__ == "__main__":
  app.run(main)
