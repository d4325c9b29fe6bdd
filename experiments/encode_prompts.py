"""Prompt embeddings for a diffusers Stable Diffusion folder, with its own text encoder(s):
the conditions .npz of the latent text-to-image path.

  python experiments/encode_prompts.py --folder=sd15/ --prompts="a red fox,a lighthouse" \
      --out=prompts.npz                      # or --prompts_file=prompts.txt (one per line)
  python experiments/quantize.py --config=configs/quantize.py \
      --config.model=diffusers:sd15/ --config.conditions=prompts.npz ...

SD 1.x / 2.x and SDXL folders (tac_jax.models.text_encoders). Needs torch and
transformers: pip install -e '.[torch]'.
"""

from absl import flags

from tac_jax.app import launch
from tac_jax.models import text_encoders

_FOLDER = flags.DEFINE_string("folder", None, "diffusers pipeline folder", required=True)
_PROMPTS = flags.DEFINE_list("prompts", [], "comma-separated prompts")
_FILE = flags.DEFINE_string("prompts_file", "", "a text file with one prompt per line")
_OUT = flags.DEFINE_string("out", None, "the conditions .npz to write", required=True)
_SIZE = flags.DEFINE_integer("size", 0, "SDXL: image size for time_ids (0: from the folder)")


def main():
  prompts = list(_PROMPTS.value)
  if _FILE.value:
    with open(_FILE.value) as f:
      prompts += [line.strip() for line in f if line.strip()]
  if not prompts:
    raise ValueError("no prompts: pass --prompts=... or --prompts_file=...")
  size = (_SIZE.value, _SIZE.value) if _SIZE.value else None
  arrays = text_encoders.encode_prompts(_FOLDER.value, prompts, size)
  path = text_encoders.save_conditions(_OUT.value, arrays)
  shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in sorted(arrays.items()))
  print(f"wrote {path}: {len(prompts)} prompts ({shapes})")


if __name__ == "__main__":
  launch.main(main)
