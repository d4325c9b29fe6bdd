"""DiT / PixArt-alpha import: config translation, key mapping, outputs against diffusers.

The first tests need neither torch nor diffusers. The others (torch extra) build tiny
random diffusers `DiTTransformer2DModel` / `PixArtTransformer2DModel`s with every
parameter randomised (adaLN-Zero and output layers are zero at init, which would hide
mistakes there), save them with `save_pretrained`, import them and compare outputs to 1e-4.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tac_jax.models import convert
from tac_jax.models import dit, dit_blocks, dit_config
from tac_jax.models import dit_convert
from torch_extra import torch_and_diffusers

TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, num_attention_heads=2,
            attention_head_dim=8)
DIT = dict(TINY, out_channels=8, num_embeds_ada_norm=10)   # learned sigma, 10 classes
PIXART = dict(TINY, out_channels=8, cross_attention_dim=16, caption_channels=12)
CAPTION_TOKENS = 5


def test_config_translation_and_errors():
  cfg = dit_convert.dit_config_from_diffusers({"_class_name": "DiTTransformer2DModel", **DIT})
  assert cfg.class_conditional and cfg.learn_sigma and cfg.null_class_label == 10
  assert cfg.norm_eps == 1e-5          # DiTTransformer2DModel's default
  legacy = {"_class_name": "Transformer2DModel", "norm_type": "ada_norm_single",
            "cross_attention_dim": None, "only_cross_attention": False, **PIXART}
  pix = dit_convert.dit_config_from_diffusers(legacy)
  assert pix.norm_type == "ada_norm_single" and pix.context_dim == 12 and pix.norm_eps == 1e-6
  eps, sigma = dit.split_learned_sigma(jnp.arange(16.0).reshape(1, 1, 2, 8), cfg)
  assert eps.shape == sigma.shape == (1, 1, 2, 4) and float(sigma[0, 0, 0, 0]) == 4.0
  with pytest.raises(ValueError, match=r"activation_fn='geglu' \(supported: 'gelu-approximate'\)"):
    dit_convert.dit_config_from_diffusers(
        {"_class_name": "DiTTransformer2DModel", **DIT, "activation_fn": "geglu"})
  with pytest.raises(ValueError, match="use_additional_conditions"):   # 1024px PixArt
    dit_convert.dit_config_from_diffusers(
        {"_class_name": "PixArtTransformer2DModel", **dict(PIXART, sample_size=128)})
  with pytest.raises(ValueError, match="unknown field 'qk_norm'"):
    dit_convert.dit_config_from_diffusers(
        {"_class_name": "PixArtTransformer2DModel", **PIXART, "qk_norm": "rms_norm"})
  with pytest.raises(ValueError, match="unsupported diffusers class 'UNet2DModel'"):
    dit_convert.dit_config_from_diffusers({"_class_name": "UNet2DModel"})
  with pytest.raises(ValueError, match="cross_attention_dim must be 16"):
    dit_config.DiTConfig(**dict(PIXART, cross_attention_dim=24), norm_type="ada_norm_single")


def test_init_and_input_errors():
  cfg = dit_config.DiTConfig(**DIT)
  module, params = dit.init_dit(cfg, jax.random.key(0))
  apply = jax.jit(module.apply)
  x, t, labels = dit.dummy_inputs(cfg, batch=2)
  assert apply({"params": params}, x, t, labels).shape == (2, 8, 8, 8)
  with pytest.raises(ValueError, match="integer class labels"):
    apply({"params": params}, x, t, jnp.zeros((2,)))
  with pytest.raises(ValueError, match="NHWC"):
    apply({"params": params}, x[:, :4], t, labels)


# ----------------------------------------------------------------------------- torch extra

def _random_model(torch, cls, kwargs, seed):
  torch.manual_seed(seed)
  model = cls(**kwargs).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0, 0.2)
  return model


@pytest.fixture(scope="module")
def dit_torch(tmp_path_factory):
  torch, diffusers = torch_and_diffusers()
  model = _random_model(torch, diffusers.DiTTransformer2DModel, DIT, 0)
  d = str(tmp_path_factory.mktemp("dit"))
  model.save_pretrained(d, safe_serialization=True)
  return torch, model, d


def _inputs(cfg, n):
  rng = np.random.RandomState(1)
  x = rng.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size).astype(np.float32)
  return x, np.array([10, 999, 10, 500][:n])


def _ours(module, params, x, t, cond, mask=None):
  out = jax.jit(module.apply)({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                              jnp.asarray(t), jnp.asarray(cond),
                              None if mask is None else jnp.asarray(mask))
  return np.asarray(out).transpose(0, 3, 1, 2)


def test_dit_matches_diffusers(dit_torch):
  torch, model, d = dit_torch
  module, params, cfg = dit_convert.import_dit_diffusers(d)
  assert cfg.learn_sigma and cfg.out_channels == 8
  x, t = _inputs(cfg, 4)
  x[2] = x[0]                                        # rows 0 and 2: same x and t, ...
  labels = np.array([3, 7, cfg.null_class_label, 0])  # ... a real vs the null label
  with torch.no_grad():
    ref = model(torch.from_numpy(x), timestep=torch.from_numpy(t),
                class_labels=torch.from_numpy(labels), return_dict=False)[0].numpy()
  out = _ours(module, params, x, t, labels.astype(np.int32))
  assert out.shape == ref.shape == (4, 8, 8, 8) and np.abs(ref).max() > 0.1
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
  assert np.abs(out[0] - out[2]).max() > 1e-2        # the null label conditions differently


@pytest.mark.parametrize("variant", ["bin_in_subfolder", "no_caption_projection"])
def test_pixart_matches_diffusers(variant, tmp_path):
  """With a caption projection and interpolation_scale 2, saved as .bin under transformer/;
  and without one (captions straight into attn2, 24 wide), saved as safetensors."""
  torch, diffusers = torch_and_diffusers()
  if variant == "bin_in_subfolder":
    kwargs, width, where, safe = dict(PIXART, interpolation_scale=2.0), 12, "transformer", False
  else:
    kwargs, width, where, safe = dict(TINY, out_channels=8, cross_attention_dim=24), 24, "", True
  model = _random_model(torch, diffusers.PixArtTransformer2DModel, kwargs, 1)
  model.save_pretrained(str(tmp_path / where), safe_serialization=safe)
  module, params, cfg = dit_convert.import_dit_diffusers(str(tmp_path))
  assert cfg.context_dim == width
  x, t = _inputs(cfg, 2)
  caption = np.random.RandomState(2).randn(2, CAPTION_TOKENS, width).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], np.int64)
  with torch.no_grad():
    ref = model(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(caption),
                timestep=torch.from_numpy(t), encoder_attention_mask=torch.from_numpy(mask),
                return_dict=False)[0].numpy()
  out = _ours(module, params, x, t, caption, mask)
  assert np.abs(ref).max() > 0.1
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
  unmasked = _ours(module, params, x, t, caption)
  assert np.abs(unmasked - out).max() > 1e-3         # the mask is not ignored


def test_missing_and_unexpected_keys(dit_torch):
  _, _, d = dit_torch
  with open(f"{d}/config.json") as f:
    cfg = dit_convert.dit_config_from_diffusers(json.load(f))
  sd = convert.load_state_dict(f"{d}/diffusion_pytorch_model.safetensors")
  missing = {k: v for k, v in sd.items() if k != "transformer_blocks.1.norm1.linear.weight"}
  with pytest.raises(ValueError, match="missing .*transformer_blocks_1/norm1/linear/kernel"):
    dit_convert.convert_dit_state_dict(missing, cfg)
  with pytest.raises(ValueError, match="unexpected checkpoint keys: caption_projection"):
    dit_convert.convert_dit_state_dict(
        {**sd, "caption_projection.linear_1.weight": np.zeros((16, 12))}, cfg)
  # The sin-cos table is recomputed; one stored in the checkpoint must agree with it.
  table = dit_blocks.sincos_pos_embed(cfg.inner_dim, cfg.grid_size)[None]
  dit_convert.convert_dit_state_dict({**sd, "pos_embed.pos_embed": table}, cfg)
  with pytest.raises(ValueError, match="pos_embed.pos_embed is not the sin-cos table"):
    dit_convert.convert_dit_state_dict({**sd, "pos_embed.pos_embed": table / 2}, cfg)


def test_dit_keep_list_selects_embeddings_adaln_and_output_layers():
  """presets.DIT_KEEP_8BIT on DiT and PixArt names (with and without a wrapper prefix):
  patch embedding, output layers, timestep / caption embeddings, adaLN modulations, and
  none of the attention or MLP layers."""
  import re   # pylint: disable=import-outside-toplevel
  from flax import traverse_util   # pylint: disable=import-outside-toplevel
  from tac_jax.quant import presets   # pylint: disable=import-outside-toplevel
  keep = re.compile(presets.DIT_KEEP_8BIT)
  for kind, kw in (("DiTTransformer2DModel", DIT), ("PixArtTransformer2DModel", PIXART)):
    cfg = dit_convert.dit_config_from_diffusers({"_class_name": kind, **kw})
    flat = traverse_util.flatten_dict(dit_convert.abstract_params(cfg), sep="/")
    layers = sorted({k.rsplit("/", 1)[0] for k in flat if k.endswith("/kernel")})
    for prefix in ("", "dit/"):
      kept = {p for p in layers if keep.match(prefix + p)}
      assert all(not re.search(r"attn\d|/ff/", p) for p in kept), kept
      assert {"pos_embed/proj"} <= kept and any(p.startswith("proj_out") for p in kept)
      if kind == "DiTTransformer2DModel":
        assert {f"transformer_blocks_{i}/norm1/linear" for i in range(2)} <= kept
      else:
        assert "adaln_single/linear" in kept and any("caption_projection" in p for p in kept)
  assert not keep.match("unet/down_blocks_0/attentions_0/proj_out")   # a UNet's is not
