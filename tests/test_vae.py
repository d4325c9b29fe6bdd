"""diffusers AutoencoderKL (Stable Diffusion VAE) import: config translation, key layout,
latent scaling, clear errors, and (torch extra) encode / decode against diffusers.

The parity tests build tiny random diffusers AutoencoderKLs with every parameter drawn
from N(0, 0.2) (norm scales and biases too, so a transposed or swapped tensor cannot go
unnoticed), save them with `save_pretrained`, import them and compare the posterior mean,
logvar and the decoded image to 1e-4. The torch model is built once per module and each
config's encode + decode is jitted once.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tac_jax.models import vae
from torch_extra import torch_and_diffusers

TINY = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
            layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=0.13025,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2)
# One block (no down/upsampler), no quant convs, no mid attention, SD3/FLUX-style shift.
BARE = dict(TINY, block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",), use_quant_conv=False,
            use_post_quant_conv=False, mid_block_add_attention=False, shift_factor=0.1159,
            scaling_factor=0.3611, latent_channels=2)
IMAGE = 16


def _diffusers_config(kwargs):
  return {"_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1", "act_fn": "silu",
          "force_upcast": True, **{k: list(v) if isinstance(v, tuple) else v
                                   for k, v in kwargs.items()}}


def test_config_translation_and_round_trip():
  cfg = vae.VAEConfig.from_diffusers(_diffusers_config(TINY))
  assert cfg.block_out_channels == (8, 16) and cfg.scaling_factor == 0.13025
  assert cfg.shift_factor is None and cfg.use_quant_conv and cfg.downsample_factor == 2
  assert vae.VAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  bare = vae.VAEConfig.from_diffusers(_diffusers_config(BARE))
  assert bare.shift_factor == 0.1159 and not bare.use_quant_conv and bare.downsample_factor == 1
  assert vae.VAEConfig.from_diffusers({}) == vae.VAEConfig()   # diffusers' defaults
  rect = vae.VAEConfig.from_diffusers(dict(_diffusers_config(TINY), sample_size=[16, 24]))
  assert vae.VAEConfig.from_dict(rect.to_dict()).sample_size == (16, 24)


def test_unsupported_configs_name_the_field():
  base = _diffusers_config(TINY)
  with pytest.raises(ValueError, match=r"down_block_types=.*AttnDownEncoderBlock2D.*supported: "
                                       r"2 x 'DownEncoderBlock2D'"):
    vae.VAEConfig.from_diffusers(dict(base, down_block_types=["DownEncoderBlock2D",
                                                              "AttnDownEncoderBlock2D"]))
  with pytest.raises(ValueError, match="up_block_types"):
    vae.VAEConfig.from_diffusers(dict(base, up_block_types=["UpDecoderBlock2D"]))
  with pytest.raises(ValueError, match=r"act_fn='gelu' \(supported: 'silu'\)"):
    vae.VAEConfig.from_diffusers(dict(base, act_fn="gelu"))
  with pytest.raises(ValueError, match=r"act_fn='relu' is not supported \(supported: 'silu'\)"):
    vae.VAEConfig(act_fn="relu")
  with pytest.raises(ValueError, match="unknown field 'norm_type'"):
    vae.VAEConfig.from_diffusers(dict(base, norm_type="spatial"))
  with pytest.raises(ValueError, match=r"latents_mean=\[0.1\] \(supported: None\)"):
    vae.VAEConfig.from_diffusers(dict(base, latents_mean=[0.1]))
  with pytest.raises(ValueError, match="only diffusers AutoencoderKL"):
    vae.VAEConfig.from_diffusers(dict(base, _class_name="AutoencoderTiny"))
  with pytest.raises(ValueError, match="multiples of norm_num_groups=32"):
    vae.VAEConfig.from_diffusers(dict(base, norm_num_groups=32))


def test_latent_scaling_round_trip():
  cfg = vae.VAEConfig.from_diffusers(_diffusers_config(TINY))
  mean = np.linspace(-3.0, 3.0, 24, dtype=np.float32).reshape(1, 2, 3, 4)
  np.testing.assert_allclose(vae.to_latent(cfg, mean), mean * 0.13025, rtol=1e-6)
  np.testing.assert_allclose(vae.from_latent(cfg, vae.to_latent(cfg, mean)), mean, atol=1e-6)
  bare = vae.VAEConfig.from_diffusers(_diffusers_config(BARE))
  np.testing.assert_allclose(vae.to_latent(bare, mean), (mean - 0.1159) * 0.3611, rtol=1e-6)
  np.testing.assert_allclose(vae.from_latent(bare, vae.to_latent(bare, mean)), mean, atol=1e-6)
  s = vae.sample_posterior(jax.random.key(0), jnp.asarray(mean), jnp.full(mean.shape, -30.0))
  np.testing.assert_allclose(s, mean, atol=1e-5)


def test_param_paths_follow_diffusers_keys():
  cfg = vae.VAEConfig.from_diffusers(_diffusers_config(TINY))
  flat = traverse_util.flatten_dict(vae.abstract_vae_params(cfg))
  for path in [("encoder", "down_blocks_0", "resnets_0", "conv1", "kernel"),
               ("encoder", "down_blocks_1", "resnets_0", "conv_shortcut", "kernel"),
               ("encoder", "down_blocks_0", "downsamplers_0", "conv", "kernel"),
               ("encoder", "mid_block", "attentions_0", "group_norm", "scale"),
               ("decoder", "mid_block", "attentions_0", "to_q", "kernel"),
               ("decoder", "mid_block", "attentions_0", "to_out_0", "bias"),
               ("decoder", "up_blocks_0", "resnets_1", "conv1", "kernel"),
               ("decoder", "up_blocks_0", "upsamplers_0", "conv", "kernel"),
               ("decoder", "conv_norm_out", "scale"), ("quant_conv", "kernel"),
               ("post_quant_conv", "bias")]:
    assert path in flat, path
  assert flat[("encoder", "conv_out", "kernel")].shape == (3, 3, 16, 8)
  assert ("encoder", "down_blocks_1", "downsamplers_0", "conv", "kernel") not in flat
  bare = traverse_util.flatten_dict(vae.abstract_vae_params(vae.VAEConfig(**{
      k: v for k, v in BARE.items() if not k.endswith("block_types")})))
  assert not any(p[0] in ("quant_conv", "post_quant_conv") or "attentions_0" in p for p in bare)


def test_missing_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="no VAE directory at .*nowhere"):
    vae.import_vae_diffusers(str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"expected config.json .*empty/vae"):
    vae.import_vae_diffusers(str(tmp_path / "empty"))
  d = tmp_path / "pipe" / "vae"
  d.mkdir(parents=True)
  (d / "config.json").write_text(json.dumps(_diffusers_config(TINY)))
  with pytest.raises(FileNotFoundError, match=r"vae has config.json but no weights file .*"
                                              r"diffusion_pytorch_model.safetensors"):
    vae.import_vae_diffusers(str(tmp_path / "pipe"))


# ----------------------------------------------------------------------------- torch extra

def _random_model(torch, diffusers, kwargs, seed):
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKL(**kwargs).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0, 0.2)
  return model


def _jitted(module):
  def run(params, x, z):
    mean, logvar = module.apply({"params": params}, x, method=module.encode)
    return mean, logvar, module.apply({"params": params}, z, method=module.decode)
  return jax.jit(run)


class TorchVAEs:
  """The diffusers models, saved once under <dir>/vae/, and their imports (made once)."""

  def __init__(self, torch, diffusers, root):
    self.torch, self.models, self._imported = torch, {}, {}
    for seed, (name, kwargs) in enumerate((("tiny", TINY), ("bare", BARE))):
      model = _random_model(torch, diffusers, kwargs, seed)
      model.save_pretrained(str(root / name / "vae"), safe_serialization=True)
      self.models[name] = (model, str(root / name))

  def imported(self, name):
    """(module, params, config) of vae.import_vae_diffusers(<dir>) (it finds <dir>/vae)."""
    if name not in self._imported:
      self._imported[name] = vae.import_vae_diffusers(self.models[name][1])
    return self._imported[name]


@pytest.fixture(scope="module")
def torch_vaes(tmp_path_factory):
  torch, diffusers = torch_and_diffusers()
  return TorchVAEs(torch, diffusers, tmp_path_factory.mktemp("vaes"))


def _inputs(config, seed=0):
  rng = np.random.RandomState(seed)
  x = rng.randn(2, config.in_channels, IMAGE, IMAGE).astype(np.float32)
  f = config.downsample_factor
  z = rng.randn(2, config.latent_channels, IMAGE // f, IMAGE // f).astype(np.float32)
  return x, z


def _compare(torch, model, run, params, config):
  x, z = _inputs(config)
  with torch.no_grad():
    dist = model.encode(torch.from_numpy(x)).latent_dist
    decoded = model.decode(torch.from_numpy(z)).sample
    refs = (dist.mean.numpy(), dist.logvar.numpy(), decoded.numpy())
  nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))
  outs = [np.asarray(o).transpose(0, 3, 1, 2) for o in run(params, nhwc(x), nhwc(z))]
  for what, out, ref in zip(("mean", "logvar", "decoded"), outs, refs):
    assert out.shape == ref.shape, what
    assert np.abs(ref).max() > 0.1, what        # a real output, not an all-zero head
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0, err_msg=what)


@pytest.mark.parametrize("name", ["tiny", "bare"])
def test_encode_decode_match_diffusers(torch_vaes, name):
  model, _ = torch_vaes.models[name]
  module, params, cfg = torch_vaes.imported(name)
  assert cfg.use_quant_conv == (name == "tiny")
  assert cfg.scaling_factor == model.config.scaling_factor
  assert cfg.shift_factor == model.config.shift_factor
  _compare(torch_vaes.torch, model, _jitted(module), params, cfg)


def test_bin_import_and_legacy_names_give_the_same_params(torch_vaes, tmp_path):
  model, _ = torch_vaes.models["tiny"]
  _, ref_params, cfg = torch_vaes.imported("tiny")
  model.save_pretrained(str(tmp_path), safe_serialization=False)
  assert os.path.isfile(tmp_path / "diffusion_pytorch_model.bin")
  _, params, cfg2 = vae.import_vae_diffusers(str(tmp_path))   # the model folder itself
  assert cfg2 == cfg
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  legacy = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.")
            .replace(".to_v.", ".value.").replace(".to_out.0.", ".proj_attn."): v
            for k, v in sd.items()}
  assert any(".proj_attn." in k for k in legacy)
  for other in (params, vae.convert_vae_state_dict(legacy, cfg)):
    for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(other)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree.structure(ref_params) == jax.tree.structure(params)


def test_state_dict_errors_name_the_keys(torch_vaes):
  model, _ = torch_vaes.models["tiny"]
  cfg = vae.VAEConfig.from_diffusers(dict(model.config))
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  with pytest.raises(ValueError, match="1 parameters missing from the checkpoint: "
                                       "decoder/conv_out/bias"):
    vae.convert_vae_state_dict({k: v for k, v in sd.items() if k != "decoder.conv_out.bias"}, cfg)
  broken = {**sd, "encoder.extra.weight": np.zeros(3),
            "quant_conv.weight": np.zeros((8, 8, 3, 3), np.float32)}
  with pytest.raises(ValueError, match="unexpected checkpoint keys: encoder.extra.weight.*"
                                       "shape mismatches: quant_conv.weight"):
    vae.convert_vae_state_dict(broken, cfg)


def test_init_vae_matches_the_abstract_params_and_checks_inputs():
  cfg = vae.VAEConfig.from_diffusers(_diffusers_config(BARE))
  module, params = vae.init_vae(cfg, jax.random.key(0))
  shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)
  assert shapes(params) == shapes(vae.abstract_vae_params(cfg))
  with pytest.raises(ValueError, match=r"\[B, H, W, 2\] \(NHWC\)"):   # raised while tracing
    module.apply({"params": params}, jnp.zeros((1, 4, 4, 3)), method=module.decode)
  with pytest.raises(ValueError, match=r"encoder expects \[B, H, W, 3\]"):
    module.apply({"params": params}, jnp.zeros((1, 4, 4, 2)), method=module.encode)
