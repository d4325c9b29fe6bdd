"""UNet2DConditionModel (SD 1.x / 2.x, SDXL) port: config translation, input checks, and
outputs against diffusers.

The first tests need neither torch nor diffusers. The others (torch extra) build tiny
random diffusers `UNet2DConditionModel`s of both families with every parameter drawn from
N(0, 0.2) (diffusers zero-inits nothing here, but the default init would hide mistakes in
norms and biases), save them with `save_pretrained`, import them and compare outputs to
1e-4 on a batch of two timesteps. Each torch model is built once and each apply jitted once.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tac_jax.models import convert
from tac_jax.models import unet_cond
from tac_jax.models.unet_cond import UNetCondConfig
from torch_extra import torch_and_diffusers

SD1 = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
           attention_head_dim=8, norm_num_groups=8)
POOLED = 12      # SDXL-like text_embeds width
TIME_DIM = 8     # addition_time_embed_dim
SDXL = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=(1, 2),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
            attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
            use_linear_projection=True, norm_num_groups=8, addition_embed_type="text_time",
            addition_time_embed_dim=TIME_DIM,
            projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM)
# Excerpt of stabilityai/stable-diffusion-xl-base-1.0's unet/config.json.
SDXL_BASE = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0",
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": None,
    "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10], "up_block_types": [
        "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None, "use_linear_projection": True,
}


def _diffusers(kwargs):
  return {"_class_name": "UNet2DConditionModel", **{
      k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}}


def test_config_translation():
  cfg = UNetCondConfig.from_diffusers(SDXL_BASE)
  assert cfg.heads == (5, 10, 20) and cfg.transformer_layers == (1, 2, 10)
  assert cfg.layers == (2, 2, 2) and cfg.text_time and cfg.time_embed_dim == 1280
  assert UNetCondConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  sd1 = UNetCondConfig.from_diffusers(_diffusers(SD1))
  assert sd1.heads == (8, 8) and not sd1.text_time and sd1.mid_block_type is not None
  # The naming quirk: num_attention_heads (ours) wins over attention_head_dim.
  assert UNetCondConfig(**dict(SD1, num_attention_heads=(2, 4))).heads == (2, 4)


@pytest.mark.parametrize("change, match", [
    ({"down_block_types": ["AttnDownBlock2D", "DownBlock2D"]}, "down_block_types"),
    ({"class_embed_type": "timestep"}, r"class_embed_type='timestep' \(supported: None\)"),
    ({"only_cross_attention": True}, "only_cross_attention=True"),
    ({"act_fn": "gelu"}, "act_fn='gelu'"),
    ({"num_attention_heads": 8}, "num_attention_heads=8"),
    ({"addition_embed_type": "text"}, "addition_embed_type='text'"),
    ({"cross_attention_dim": [16, 16]}, "cross_attention_dim"),
    ({"transformer_layers_per_block": [[1], [2]]}, "transformer_layers_per_block"),
    ({"attention_head_dim": [8, 8, 8]}, "attention_head_dim"),
    ({"qk_norm": "rms"}, "unknown field 'qk_norm'"),
    ({"_class_name": "UNet2DModel"}, "_class_name='UNet2DModel'"),
])
def test_unsupported_config_errors(change, match):
  with pytest.raises(ValueError, match=match):
    UNetCondConfig.from_diffusers({**_diffusers(SD1), **change})


def test_input_errors():
  sd1, sdxl = UNetCondConfig(**SD1), UNetCondConfig(**SDXL)
  shapes = lambda cfg, *args: jax.eval_shape(
      unet_cond.UNet2DCondition(cfg).init, jax.random.key(0), *args)
  x, t, ctx = unet_cond.dummy_inputs(sd1, batch=2, tokens=3)
  with pytest.raises(ValueError, match=r"encoder_hidden_states must have shape \[2, L, 16\]"):
    shapes(sd1, x, t, ctx[..., :12])
  with pytest.raises(ValueError, match="NHWC"):
    shapes(sd1, x[:, :5], t, ctx)
  with pytest.raises(ValueError, match="timesteps"):
    shapes(sd1, x, t[:1], ctx)
  with pytest.raises(ValueError, match="added conditions are for addition_embed_type"):
    shapes(sd1, x, t, {"encoder_hidden_states": ctx})
  x, t, cond = unet_cond.dummy_inputs(sdxl, batch=2, tokens=3)
  assert cond["text_embeds"].shape == (2, POOLED) and cond["time_ids"].shape == (2, 6)
  with pytest.raises(ValueError, match="SDXL-style model .* got an array"):
    shapes(sdxl, x, t, cond["encoder_hidden_states"])
  with pytest.raises(ValueError, match=r"missing \['time_ids'\]"):
    shapes(sdxl, x, t, {k: v for k, v in cond.items() if k != "time_ids"})
  with pytest.raises(ValueError, match="projection_class_embeddings_input_dim is 60"):
    shapes(sdxl, x, t, dict(cond, text_embeds=jnp.zeros((2, POOLED + 1))))


def test_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
    unet_cond.import_unet_cond_diffusers(str(tmp_path / "nowhere"))
  os.makedirs(tmp_path / "unet")
  with open(tmp_path / "unet" / "config.json", "w") as f:
    json.dump(_diffusers(SD1), f)
  with pytest.raises(FileNotFoundError, match="has config.json but no weights file"):
    unet_cond.import_unet_cond_diffusers(str(tmp_path))


# ----------------------------------------------------------------------------- torch extra

def _saved_random_model(tmp_path_factory, kwargs, seed):
  torch, diffusers = torch_and_diffusers()
  torch.manual_seed(seed)
  model = diffusers.UNet2DConditionModel(**kwargs).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0, 0.2)
  d = str(tmp_path_factory.mktemp("unet_cond"))
  model.save_pretrained(d, safe_serialization=True)
  return torch, model, d


@pytest.fixture(scope="module")
def sd1_torch(tmp_path_factory):
  return _saved_random_model(tmp_path_factory, SD1, 0)


@pytest.fixture(scope="module")
def sdxl_torch(tmp_path_factory):
  return _saved_random_model(tmp_path_factory, SDXL, 1)


def _inputs(cfg, t_dtype):
  rng = np.random.RandomState(2)
  x = rng.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size).astype(np.float32)
  ctx = rng.randn(2, 5, cfg.cross_attention_dim).astype(np.float32)
  return x, np.array([10, 999]).astype(t_dtype), ctx


def _compare(module, params, ref, x, t, cond):
  out = jax.jit(module.apply)({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                              jnp.asarray(t), jax.tree.map(jnp.asarray, cond))
  out = np.asarray(out).transpose(0, 3, 1, 2)
  diff = float(np.abs(out - ref).max())
  print(f"max |ours - diffusers| = {diff:.2e} (|ref| max {np.abs(ref).max():.2f})")
  assert out.shape == ref.shape and np.abs(ref).max() > 0.1
  assert np.abs(ref[0] - ref[1]).max() > 1e-2       # the two timesteps differ
  assert diff <= 1e-4


def test_sd1_matches_diffusers(sd1_torch):
  torch, model, d = sd1_torch
  module, params, cfg = unet_cond.import_unet_cond_diffusers(d)
  assert cfg == UNetCondConfig(**SD1)
  assert params["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"].shape == (1, 1, 16, 16)
  x, t, ctx = _inputs(cfg, np.int64)
  with torch.no_grad():
    ref = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                return_dict=False)[0].numpy()
  _compare(module, params, ref, x, t.astype(np.int32), ctx)


def test_sdxl_matches_diffusers(sdxl_torch):
  torch, model, d = sdxl_torch
  module, params, cfg = unet_cond.import_unet_cond_diffusers(d)
  assert cfg.text_time and cfg.heads == (2, 4) and cfg.transformer_layers == (1, 2)
  assert "transformer_blocks_1" in params["down_blocks_1"]["attentions_1"]
  assert params["add_embedding"]["linear_1"]["kernel"].shape == (POOLED + 6 * TIME_DIM, 64)
  x, t, ctx = _inputs(cfg, np.float32)
  t = t + np.float32(0.5)                           # float timesteps
  rng = np.random.RandomState(3)
  text = rng.randn(2, POOLED).astype(np.float32)
  ids = np.array([[8, 8, 0, 0, 8, 8], [16, 12, 2, 1, 8, 8]], np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                added_cond_kwargs={"text_embeds": torch.from_numpy(text),
                                   "time_ids": torch.from_numpy(ids)},
                return_dict=False)[0].numpy()
  _compare(module, params, ref, x, t,
           {"encoder_hidden_states": ctx, "text_embeds": text, "time_ids": ids})


def test_bin_import_in_subfolder_and_key_errors(sd1_torch, tmp_path):
  _, model, d = sd1_torch
  model.save_pretrained(str(tmp_path / "unet"), safe_serialization=False)
  _, from_bin, cfg = unet_cond.import_unet_cond_diffusers(str(tmp_path))
  _, from_safetensors, _ = unet_cond.import_unet_cond_diffusers(d)
  jax.tree.map(np.testing.assert_array_equal, from_bin, from_safetensors)
  sd = convert.load_state_dict(os.path.join(d, "diffusion_pytorch_model.safetensors"))
  key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
  missing = {k: v for k, v in sd.items() if k != key}
  with pytest.raises(ValueError, match="missing .*transformer_blocks_0/attn2/to_k/kernel"):
    unet_cond.convert_unet_cond_state_dict(missing, cfg)
