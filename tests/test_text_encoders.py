"""Prompt embeddings from a folder's own text encoders (models.text_encoders) equal what
diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline compute in `encode_prompt`,
on tiny random CLIP encoders with a tiny tokenizer (torch extra)."""

import json
import os
import string

import numpy as np
import pytest

from tac_jax.models import latent, text_encoders
from test_latent import write_tiny_sd
from torch_extra import torch_and_diffusers

PROMPTS = ["a red fox", "the quick brown dog jumps"]
MAX_LEN = 12   # tokens, prompts padded / truncated to it


def _tokenizer(transformers, directory):
  """A CLIP BPE tokenizer over lowercase letters (no merges: one token per letter)."""
  os.makedirs(directory, exist_ok=True)
  vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
  for c in string.ascii_lowercase:
    vocab[c] = len(vocab)
    vocab[c + "</w>"] = len(vocab)
  with open(os.path.join(directory, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(directory, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n")
  tok = transformers.CLIPTokenizer(os.path.join(directory, "vocab.json"),
                                   os.path.join(directory, "merges.txt"),
                                   model_max_length=MAX_LEN)
  tok.save_pretrained(directory)
  return transformers.AutoTokenizer.from_pretrained(directory), len(vocab)


def _encoder(torch, transformers, vocab_size, hidden, seed, projection=None):
  torch.manual_seed(seed)
  config = transformers.CLIPTextConfig(
      vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
      num_attention_heads=2, num_hidden_layers=3, max_position_embeddings=MAX_LEN,
      bos_token_id=0, eos_token_id=1, pad_token_id=1,
      **({} if projection is None else {"projection_dim": projection}))
  cls = transformers.CLIPTextModel if projection is None else transformers.CLIPTextModelWithProjection
  return cls(config).eval()


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
  torch, diffusers = torch_and_diffusers()
  transformers = pytest.importorskip("transformers")
  root = str(tmp_path_factory.mktemp("sd_text"))
  unet, vae, _ = write_tiny_sd(root, torch, diffusers)
  scheduler = diffusers.DDIMScheduler.from_pretrained(os.path.join(root, "scheduler"))
  tok, n = _tokenizer(transformers, os.path.join(root, "tokenizer"))
  enc = _encoder(torch, transformers, n, 16, 0)
  enc.save_pretrained(os.path.join(root, "text_encoder"))
  return torch, diffusers, transformers, root, unet, vae, scheduler, tok, enc, n


def test_sd_prompt_embeddings_equal_diffusers_and_load_as_conditions(parts, tmp_path):
  torch, diffusers, _, root, unet, vae, scheduler, tok, enc, _ = parts
  arrays = text_encoders.encode_prompts(root, PROMPTS)
  pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=enc, tokenizer=tok, unet=unet,
                                           scheduler=scheduler, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
  with torch.no_grad():
    cond, null = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
  np.testing.assert_allclose(arrays["encoder_hidden_states"], cond.numpy(), atol=1e-6)
  np.testing.assert_allclose(arrays["null_encoder_hidden_states"], null.numpy()[:1], atol=1e-6)
  assert arrays["encoder_hidden_states"].shape == (2, MAX_LEN, 16)
  path = text_encoders.save_conditions(str(tmp_path / "prompts.npz"), arrays)
  pipeline = latent.load_pipeline(root, path, scale=2.0)   # the main job's loader takes it
  assert pipeline.num_prompts == 2


def test_sdxl_prompt_embeddings_equal_diffusers(parts, tmp_path):
  torch, diffusers, transformers, root, unet, vae, scheduler, tok, enc, n = parts
  xl = str(tmp_path / "sdxl")
  os.makedirs(xl)
  for sub in ("unet", "vae", "scheduler", "tokenizer", "text_encoder"):
    os.symlink(os.path.join(root, sub), os.path.join(xl, sub))
  tok2, _ = _tokenizer(transformers, os.path.join(xl, "tokenizer_2"))
  enc2 = _encoder(torch, transformers, n, 8, 1, projection=6)
  enc2.save_pretrained(os.path.join(xl, "text_encoder_2"))
  for zeros in (False, True):
    with open(os.path.join(xl, "model_index.json"), "w") as f:
      json.dump({"_class_name": "StableDiffusionXLPipeline",
                 "force_zeros_for_empty_prompt": zeros}, f)
    arrays = text_encoders.encode_prompts(xl, PROMPTS)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=enc, text_encoder_2=enc2, tokenizer=tok, tokenizer_2=tok2,
        unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=zeros)
    with torch.no_grad():
      cond, null, pooled, null_pooled = pipe.encode_prompt(PROMPTS, device="cpu")
    np.testing.assert_allclose(arrays["encoder_hidden_states"], cond.numpy(), atol=1e-6)
    np.testing.assert_allclose(arrays["text_embeds"], pooled.numpy(), atol=1e-6)
    np.testing.assert_allclose(arrays["null_encoder_hidden_states"], null.numpy()[:1], atol=1e-6)
    np.testing.assert_allclose(arrays["null_text_embeds"], null_pooled.numpy()[:1], atol=1e-6)
    assert not zeros or not np.any(arrays["null_encoder_hidden_states"])
  size = pipe.default_sample_size * pipe.vae_scale_factor
  np.testing.assert_array_equal(arrays["time_ids"], [[size, size, 0, 0, size, size]] * 2)
  assert arrays["encoder_hidden_states"].shape == (2, MAX_LEN, 16 + 8)


def test_encode_prompts_errors(parts, tmp_path):
  root = parts[3]
  with pytest.raises(ValueError, match="non-empty list of strings"):
    text_encoders.encode_prompts(root, "a red fox")
  with pytest.raises(FileNotFoundError, match="not found"):
    text_encoders.encode_prompts(str(tmp_path / "nowhere"), PROMPTS)
  os.symlink(os.path.join(root, "unet"), tmp_path / "unet")
  with pytest.raises(FileNotFoundError, match="no tokenizer/"):
    text_encoders.encode_prompts(str(tmp_path), PROMPTS)
