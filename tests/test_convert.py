"""diffusers UNet2DModel import: key layout, transposes, config translation, errors.

The first tests need neither torch nor diffusers: they build a synthetic checkpoint with
the real diffusers key layout from Flax params. The last ones (torch extra) compare the
imported Flax UNet with a randomly initialised diffusers UNet2DModel in the DDPM CIFAR-10
configuration, output to 1e-4.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tac_jax.models import checkpoint, convert
from torch_extra import torch_and_diffusers

# The DDPM CIFAR-10 32x32 UNet2DModel configuration (google/ddpm-cifar10-32).
CIFAR10_DDPM = {
    "_class_name": "UNet2DModel", "sample_size": 32, "in_channels": 3, "out_channels": 3,
    "block_out_channels": [128, 256, 256, 256], "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": None, "norm_eps": 1e-6, "norm_num_groups": 32,
    "flip_sin_to_cos": False, "freq_shift": 1, "downsample_padding": 0, "act_fn": "silu",
    "center_input_sample": False, "mid_block_scale_factor": 1,
    "time_embedding_type": "positional",
}
# The same layout, scaled down for the tests that run without torch.
TINY = dict(CIFAR10_DDPM, sample_size=8, block_out_channels=[8, 16], layers_per_block=1,
            down_block_types=["DownBlock2D", "AttnDownBlock2D"],
            up_block_types=["AttnUpBlock2D", "UpBlock2D"], norm_num_groups=4)


@pytest.fixture(scope="module")
def tiny():
  cfg = convert.config_from_diffusers(TINY)
  # Random values everywhere (norm scales and biases too), so that a transposed or swapped
  # tensor cannot go unnoticed; numpy draws avoid compiling an init for this.
  rng = np.random.RandomState(3)
  flat = traverse_util.flatten_dict(convert.abstract_params(cfg))
  flat = {p: jnp.asarray(rng.randn(*v.shape).astype(np.float32) / np.sqrt(max(v.shape[-2:-1] or (1,))))
          for p, v in flat.items()}
  return cfg, traverse_util.unflatten_dict(flat)


def _x_t(cfg, n=2):
  x = jax.random.normal(jax.random.key(5), (n, cfg.sample_size, cfg.sample_size, cfg.in_channels))
  return x, jnp.array([3, 800][:n])


def test_cifar10_config_translation():
  cfg = convert.config_from_diffusers(CIFAR10_DDPM)
  assert cfg.attention_levels == (1,) and cfg.attention_head_dim is None
  assert not cfg.flip_sin_to_cos and cfg.freq_shift == 1 and cfg.downsample_padding == 0
  assert cfg.layers_per_block == 2 and cfg.norm_eps == 1e-6
  assert convert.config_from_diffusers(convert.config_to_diffusers(cfg)) == cfg


def test_key_mapping_examples():
  assert convert.flax_path("down_blocks.0.resnets.1.conv1.weight") == (
      "down_blocks_0", "resnets_1", "conv1", "weight")
  assert convert.flax_path("mid_block.attentions.0.to_out.0.bias") == (
      "mid_block", "attentions_0", "to_out_0", "bias")
  assert convert.flax_path("down_blocks.1.attentions.0.proj_attn.weight") == (
      "down_blocks_1", "attentions_0", "to_out_0", "weight")
  assert convert.flax_path("time_embedding.linear_1.weight") == (
      "time_embedding", "linear_1", "weight")


def test_export_import_round_trip(tiny, tmp_path):
  cfg, params = tiny
  sd = convert.to_diffusers_state_dict(params)
  assert sd["conv_in.weight"].shape == (8, 3, 3, 3)                  # [O, I, kh, kw]
  assert sd["time_embedding.linear_1.weight"].shape == (32, 8)       # [out, in]
  assert "down_blocks.1.attentions.0.to_out.0.weight" in sd
  d = convert.export_diffusers(str(tmp_path / "diffusers"), params, cfg)
  module, params2, meta = convert.import_diffusers(d)
  assert meta["model"] == cfg.to_dict()
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  x, t = _x_t(cfg)
  np.testing.assert_array_equal(module.apply({"params": params}, x, t),
                                module.apply({"params": params2}, x, t))


def test_legacy_attention_names_and_model_dir(tiny, tmp_path):
  cfg, params = tiny
  sd = convert.to_diffusers_state_dict(params)
  legacy = {k.replace("to_q.", "query.").replace("to_k.", "key.").replace("to_v.", "value.")
            .replace("to_out.0.", "proj_attn."): v for k, v in sd.items()}
  assert any(".proj_attn." in k for k in legacy)
  d = tmp_path / "legacy" / "unet"
  d.mkdir(parents=True)
  convert.save_safetensors(str(d / "diffusion_pytorch_model.safetensors"), legacy)
  (d / "config.json").write_text(json.dumps(TINY))
  (d.parent / "scheduler_config.json").write_text(json.dumps(
      {"beta_schedule": "linear", "beta_start": 2e-4, "beta_end": 0.03, "num_train_timesteps": 500}))
  out = convert.export_checkpoint(str(d.parent), str(tmp_path / "tac"))
  module, params2, meta = checkpoint.load_model(out)   # what --config.checkpoint loads
  assert meta["schedule"] == {"name": "linear", "num_timesteps": 500, "beta_start": 2e-4,
                              "beta_end": 0.03}
  x, t = _x_t(cfg)
  np.testing.assert_allclose(module.apply({"params": params2}, x, t),
                             module.apply({"params": params}, x, t), atol=1e-6)


def test_safetensors_dtypes_round_trip(tmp_path):
  import ml_dtypes
  arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float16),
            "c": np.array([1.5, -2], ml_dtypes.bfloat16), "d": np.arange(4, dtype=np.int64)}
  p = str(tmp_path / "x.safetensors")
  convert.save_safetensors(p, arrays, {"format": "pt"})
  back = convert.load_safetensors(p)
  assert set(back) == set(arrays)
  for k in arrays:
    assert back[k].dtype == arrays[k].dtype
    np.testing.assert_array_equal(back[k], arrays[k])


def test_clear_errors(tiny, tmp_path):
  cfg, params = tiny
  sd = convert.to_diffusers_state_dict(params)
  missing = {k: v for k, v in sd.items() if k != "conv_out.bias"}
  with pytest.raises(ValueError, match="missing .*conv_out/bias"):
    convert.convert_state_dict(missing, cfg)
  with pytest.raises(ValueError, match="unexpected checkpoint keys: class_embedding.weight"):
    convert.convert_state_dict({**sd, "class_embedding.weight": np.zeros((4, 4))}, cfg)
  bad = dict(sd, **{"conv_in.weight": np.zeros((8, 3, 5, 5), np.float32)})
  with pytest.raises(ValueError, match=r"shape mismatches: conv_in.weight"):
    convert.convert_state_dict(bad, cfg)
  with pytest.raises(ValueError, match="center_input_sample"):
    convert.config_from_diffusers(dict(TINY, center_input_sample=True))
  with pytest.raises(ValueError, match="mirror"):
    convert.config_from_diffusers(dict(TINY, up_block_types=["UpBlock2D", "AttnUpBlock2D"]))
  with pytest.raises(ValueError, match="only diffusers UNet2DModel"):
    convert.config_from_diffusers(dict(TINY, _class_name="UNet2DConditionModel"))
  with pytest.raises(FileNotFoundError, match="no diffusers model"):
    convert.import_diffusers(str(tmp_path / "nowhere"))
  p = str(tmp_path / "trunc.safetensors")
  convert.save_safetensors(p, {"w": np.ones((64, 64), np.float32)})
  with open(p, "r+b") as f:
    f.truncate(os.path.getsize(p) - 100)
  with pytest.raises(ValueError, match="corrupt safetensors"):
    convert.load_safetensors(p)


# ----------------------------------------------------------------------------- torch extra

@pytest.fixture(scope="module")
def cifar10_torch(tmp_path_factory):
  torch, diffusers = torch_and_diffusers()
  torch.manual_seed(0)
  cfg = {k: v for k, v in CIFAR10_DDPM.items() if k != "_class_name"}
  model = diffusers.UNet2DModel(**cfg).eval()
  d = str(tmp_path_factory.mktemp("ddpm_cifar10"))
  model.save_pretrained(d, safe_serialization=True)
  return torch, model, d


def _compare(torch, model, module, params):
  rng = np.random.RandomState(0)
  x = rng.randn(2, 3, 32, 32).astype(np.float32)
  t = np.array([10, 700])
  with torch.no_grad():
    ref = model(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
  out = jax.jit(module.apply)({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                              jnp.asarray(t))
  out = np.asarray(out).transpose(0, 3, 1, 2)
  assert np.abs(ref).max() > 0.1  # a real output, not an all-zero head
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_cifar10_ddpm_matches_pytorch_safetensors(cifar10_torch):
  torch, model, d = cifar10_torch
  module, params, meta = convert.import_diffusers(d)
  assert meta["model"]["block_out_channels"] == [128, 256, 256, 256]
  _compare(torch, model, module, params)


def test_cifar10_ddpm_matches_pytorch_state_dict_file(cifar10_torch, tmp_path):
  torch, model, d = cifar10_torch
  path = str(tmp_path / "diffusion_pytorch_model.bin")
  torch.save(model.state_dict(), path)
  with open(os.path.join(d, "config.json")) as f:
    config = json.load(f)
  module, params, _ = convert.import_diffusers("", weights=path, config=config)
  _compare(torch, model, module, params)


def test_our_safetensors_reader_matches_the_reference_package(tmp_path):
  torch_and_diffusers()
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  arrays = {"w": np.random.RandomState(1).randn(3, 5).astype(np.float32),
            "n": np.arange(7, dtype=np.int64)}
  p = str(tmp_path / "ref.safetensors")
  safetensors_numpy.save_file(arrays, p)
  back = convert.load_safetensors(p)
  for k in arrays:
    np.testing.assert_array_equal(back[k], arrays[k])
  ours = str(tmp_path / "ours.safetensors")
  convert.save_safetensors(ours, arrays)
  for k, v in safetensors_numpy.load_file(ours).items():
    np.testing.assert_array_equal(v, arrays[k])
