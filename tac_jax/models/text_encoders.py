"""Prompt embeddings for a diffusers Stable Diffusion folder, computed with its own PyTorch
text encoder(s): the conditions `.npz` that `--config.conditions` and
`latent.load_pipeline` take (the arrays are listed in `tac_jax.models.latent`).

    arrays = text_encoders.encode_prompts("sd15/", ["a red fox", "a lighthouse at dusk"])
    text_encoders.save_conditions("prompts.npz", arrays)

or `python experiments/encode_prompts.py --folder=sd15/ --prompts="a red fox" --out=prompts.npz`.

It does what diffusers' pipelines do in `encode_prompt` (no prompt weighting, no clip
skip, no LoRA scale):
- SD 1.x / 2.x (`tokenizer/`, `text_encoder/`): each prompt padded to the tokenizer's
  `model_max_length` and truncated; the encoder's last hidden state (with the attention
  mask only where its config asks for one). The null condition is the empty prompt's.
- SDXL (also `tokenizer_2/`, `text_encoder_2/`): the penultimate hidden states of both
  encoders concatenated, the second encoder's projected pooled output as `text_embeds`,
  and `time_ids` (original size, crop top-left, target size) = (H, W, 0, 0, H, W) with H, W
  the image size (the UNet's sample size times the VAE's downsampling). The null condition
  is all zeros where the folder's `model_index.json` sets `force_zeros_for_empty_prompt`
  (SDXL base does), else the empty prompt's embeddings.

Needs torch and transformers (`pip install -e '.[torch]'`); the rest of tac_jax does not.
"""

from __future__ import annotations

import importlib
import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from tac_jax import files

EXTRA = "pip install -e '.[torch]'"


def _imports():
  try:
    torch = importlib.import_module("torch")
    transformers = importlib.import_module("transformers")
  except ImportError as e:
    raise ImportError(f"encoding prompts needs torch and transformers ({e.name} is missing): "
                      f"{EXTRA}") from None
  return torch, transformers


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  return files.read_json(path, "diffusers config")


def _load_pair(torch, transformers, directory: str, suffix: str, projection: bool):
  tok_dir = os.path.join(directory, "tokenizer" + suffix)
  enc_dir = os.path.join(directory, "text_encoder" + suffix)
  for d in (tok_dir, enc_dir):
    if not os.path.isdir(d):
      raise FileNotFoundError(f"diffusers folder {directory}: no {os.path.basename(d)}/ (the "
                              "text encoder and its tokenizer); pass precomputed embeddings "
                              "with --config.conditions instead.")
  tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir)
  cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
  encoder = cls.from_pretrained(enc_dir, torch_dtype=torch.float32).eval()
  return tokenizer, encoder


def _encode(torch, tokenizer, encoder, prompts: Sequence[str], penultimate: bool):
  """(hidden states [P, L, D], the encoder's first output: pooled / projected [P, E])."""
  ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                  truncation=True, return_tensors="pt")
  mask = ids.attention_mask if getattr(encoder.config, "use_attention_mask", False) else None
  with torch.no_grad():
    out = encoder(ids.input_ids, attention_mask=mask, output_hidden_states=penultimate)
  hidden = out.hidden_states[-2] if penultimate else out[0]
  return hidden.float().numpy(), out[0].float().numpy()


def _image_size(directory: str) -> Tuple[int, int]:
  unet = _read_json(os.path.join(directory, "unet", "config.json"))
  vae = _read_json(os.path.join(directory, "vae", "config.json"))
  if "sample_size" not in unet:
    raise ValueError(f"diffusers folder {directory}: unet/config.json has no sample_size; pass "
                     "size=(H, W).")
  size = unet["sample_size"] * 2 ** (len(vae.get("block_out_channels", [0])) - 1)
  return int(size), int(size)


def encode_prompts(directory: str, prompts: Sequence[str],
                   size: Optional[Tuple[int, int]] = None) -> Dict[str, np.ndarray]:
  """The conditions arrays of `prompts` (and of the null prompt) for the SD-family folder
  `directory` (module docstring); `size` (H, W): SDXL's image size for `time_ids` (None:
  the UNet's sample size times the VAE's downsampling)."""
  if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
    raise ValueError("prompts must be a non-empty list of strings, got "
                     f"{type(prompts).__name__} {prompts!r:.80}.")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"diffusers folder {directory!r} not found.")
  torch, transformers = _imports()
  index = _read_json(os.path.join(directory, "model_index.json"))
  if not os.path.isdir(os.path.join(directory, "text_encoder_2")):
    tokenizer, encoder = _load_pair(torch, transformers, directory, "", projection=False)
    cond, _ = _encode(torch, tokenizer, encoder, prompts, penultimate=False)
    null, _ = _encode(torch, tokenizer, encoder, [""], penultimate=False)
    return {"encoder_hidden_states": cond, "null_encoder_hidden_states": null}
  pairs = [_load_pair(torch, transformers, directory, "", projection=False),
           _load_pair(torch, transformers, directory, "_2", projection=True)]
  zeros = bool(index.get("force_zeros_for_empty_prompt", True))
  arrays: Dict[str, np.ndarray] = {}
  for name, rows in (("", prompts), ("null_", None if zeros else [""])):
    if rows is None:
      continue
    outs = [_encode(torch, tok, enc, rows, penultimate=True) for tok, enc in pairs]
    arrays[name + "encoder_hidden_states"] = np.concatenate([h for h, _ in outs], axis=-1)
    arrays[name + "text_embeds"] = outs[-1][1]
  if zeros:
    arrays["null_encoder_hidden_states"] = np.zeros_like(arrays["encoder_hidden_states"][:1])
    arrays["null_text_embeds"] = np.zeros_like(arrays["text_embeds"][:1])
  h, w = _image_size(directory) if size is None else size
  ids = np.array([[h, w, 0, 0, h, w]], np.float32)
  arrays["time_ids"] = np.repeat(ids, len(prompts), axis=0)
  arrays["null_time_ids"] = ids
  return arrays


def save_conditions(path: str, arrays: Dict[str, np.ndarray]) -> str:
  """Writes `arrays` as the conditions `.npz` at `path` (atomically); returns its path."""
  path = os.path.abspath(path)
  files.write_atomic(path, lambda f: np.savez(f, **{k: np.asarray(v, np.float32)
                                                    for k, v in arrays.items()}), binary=True)
  return path
