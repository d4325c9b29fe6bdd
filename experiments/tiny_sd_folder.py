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
  import numpy as np   # pylint: disable=import-outside-toplevel
  import torch   # pylint: disable=import-outside-toplevel
  import diffusers   # pylint: disable=import-outside-toplevel
  from test_latent import PROMPTS, TOKENS, UNET, VAE   # pylint: disable=import-outside-toplevel

  def randomise(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
      for p in model.parameters():
        p.normal_(0, 0.2)
    return model.eval()

  out = _OUT.value
  randomise(diffusers.UNet2DConditionModel(**UNET), 0).save_pretrained(os.path.join(out, "unet"))
  randomise(diffusers.AutoencoderKL(**VAE), 1).save_pretrained(os.path.join(out, "vae"))
  diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012).save_pretrained(os.path.join(out, "scheduler"))
  rng = np.random.RandomState(2)
  np.savez(os.path.join(out, "prompts.npz"),
           encoder_hidden_states=rng.randn(PROMPTS, TOKENS, 16).astype(np.float32),
           null_encoder_hidden_states=rng.randn(1, TOKENS, 16).astype(np.float32))
  print(f"wrote {out}: unet/, vae/, scheduler/, prompts.npz")


if __name__ == "__main__":
  app.run(main)
