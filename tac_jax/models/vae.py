"""The Stable Diffusion VAE (diffusers `AutoencoderKL`) in Flax Linen, with diffusers' names.

Encoder: conv_in, `DownEncoderBlock2D`s (resnets without a time embedding, a stride-2
downsampler after every block but the last, padded (0, 1) bottom/right), a mid block
(resnet, single-head self-attention, resnet), conv_norm_out, SiLU, conv_out to 2 x
latent_channels, then `quant_conv` (1x1). Decoder: `post_quant_conv` (1x1), conv_in, the
mid block, `UpDecoderBlock2D`s (layers_per_block + 1 resnets, nearest 2x upsampler but
after the last), conv_norm_out, SiLU, conv_out. Layout is NHWC throughout.

Submodule names follow diffusers' state-dict keys, list indices joined by '_':

    encoder.down_blocks.0.resnets.1.conv1.weight  ->  encoder/down_blocks_0/resnets_1/conv1/kernel
    decoder.mid_block.attentions.0.to_q.weight    ->  decoder/mid_block/attentions_0/to_q/kernel

so `torch_weights.map_state_dict` maps a checkpoint mechanically (legacy attention names
`query`, `key`, `value`, `proj_attn` are renamed as `convert.flax_path` does).

    module, params, config = import_vae_diffusers("path/to/stable-diffusion-v1-5")  # vae/
    mean, logvar = module.apply({"params": params}, images, method=module.encode)
    z = to_latent(config, mean)                       # what the diffusion model sees
    images = module.apply({"params": params}, from_latent(config, z), method=module.decode)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tac_jax import config_utils
from tac_jax.models import torch_weights
from tac_jax.models.convert import (CONFIG_NAME, WEIGHTS_NAMES, find_model, flax_path,
                                    load_state_dict, read_config)
from tac_jax.models.unet import AttentionBlock, Downsample, Upsample

SUBFOLDER = "vae"
EPS = 1e-6               # diffusers' Encoder / Decoder hard-code every norm's epsilon
LOGVAR_RANGE = (-30.0, 20.0)   # DiagonalGaussianDistribution clamps logvar to this
DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
# diffusers config fields accepted with any value: they do not change the computation.
IGNORED = ("force_upcast",)
# Fields only their diffusers default is supported for (field -> accepted values).
FIXED = {"act_fn": ("silu",), "latents_mean": (None,), "latents_std": (None,)}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The fields of diffusers' AutoencoderKL config that shape the model (same defaults)."""
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: Tuple[int, ...] = (64,)
  layers_per_block: int = 1
  norm_num_groups: int = 32
  act_fn: str = "silu"
  sample_size: Union[int, Tuple[int, int]] = 32
  scaling_factor: float = 0.18215
  shift_factor: Optional[float] = None   # SD3 / FLUX: latents are (mean - shift) * scale
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    size = self.sample_size
    if isinstance(size, (list, tuple)):
      size = tuple(int(s) for s in size)
      size = size[0] if len(size) == 2 and size[0] == size[1] else size
    object.__setattr__(self, "sample_size", size)
    if self.act_fn != "silu":
      raise ValueError(f"VAEConfig.act_fn={self.act_fn!r} is not supported (supported: 'silu').")
    if not self.block_out_channels:
      raise ValueError("VAEConfig.block_out_channels must name at least one block.")
    bad = [c for c in self.block_out_channels if c <= 0 or c % self.norm_num_groups]
    if bad:
      raise ValueError(f"VAEConfig.block_out_channels {self.block_out_channels} must be "
                       f"positive multiples of norm_num_groups={self.norm_num_groups}.")
    for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block"):
      if getattr(self, name) < 1:
        raise ValueError(f"VAEConfig.{name} must be >= 1, got {getattr(self, name)}.")
    if isinstance(size, tuple) and len(size) != 2:
      raise ValueError(f"VAEConfig.sample_size must be an int or (height, width), got {size}.")

  @property
  def downsample_factor(self) -> int:
    """Image pixels per latent pixel along each axis: 2^(number of blocks - 1)."""
    return 2 ** (len(self.block_out_channels) - 1)

  @property
  def shift(self) -> float:
    """shift_factor, 0 when the config has none."""
    return 0.0 if self.shift_factor is None else float(self.shift_factor)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "VAEConfig":
    """The inverse of `to_dict` (our checkpoint metadata); unknown fields raise ValueError."""
    return config_utils.from_dict(cls, d)

  def to_dict(self) -> Dict[str, Any]:
    """JSON-ready fields (tuples as lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_diffusers(cls, cfg: Mapping[str, Any]) -> "VAEConfig":
    """Translates a diffusers AutoencoderKL config.json dict.

    Raises:
      ValueError naming every unknown field and unsupported value, and what is supported.
    """
    name = cfg.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
      raise ValueError(f"_class_name={name!r}: only diffusers AutoencoderKL configs can be "
                       "imported (supported: 'AutoencoderKL').")
    ours = {f.name for f in dataclasses.fields(cls)}
    known = ours | set(IGNORED) | set(FIXED) | {"down_block_types", "up_block_types"}
    bad = [f"unknown field {k!r}" for k in sorted(cfg) if not k.startswith("_") and k not in known]
    bad += [f"{k}={cfg[k]!r} (supported: {', '.join(map(repr, ok))})"
            for k, ok in FIXED.items() if k in cfg and cfg[k] not in ok]
    n = len(cfg.get("block_out_channels", cls.block_out_channels))
    for key, block in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
      types = list(cfg.get(key, (block,)))
      if any(t != block for t in types) or len(types) != n:
        bad.append(f"{key}={types!r} (supported: {n} x {block!r}, one per block_out_channels)")
    if bad:
      raise ValueError("unsupported diffusers AutoencoderKL config: " + "; ".join(bad) + ".")
    kwargs = {k: v for k, v in cfg.items() if k in ours}
    if kwargs.get("shift_factor") is not None:
      kwargs["shift_factor"] = float(kwargs["shift_factor"])
    try:
      return cls(**kwargs)
    except (TypeError, ValueError) as e:
      raise ValueError(f"unsupported diffusers AutoencoderKL config: {e}") from None


# ----------------------------------------------------------------------------- modules

class ResnetBlock(nn.Module):
  """diffusers' ResnetBlock2D with temb None: norm-SiLU-conv twice, 1x1 shortcut if needed."""
  out_channels: int
  groups: int

  @nn.compact
  def __call__(self, x):
    h = nn.silu(nn.GroupNorm(self.groups, epsilon=EPS, name="norm1")(x))
    h = nn.Conv(self.out_channels, (3, 3), name="conv1")(h)
    h = nn.silu(nn.GroupNorm(self.groups, epsilon=EPS, name="norm2")(h))
    h = nn.Conv(self.out_channels, (3, 3), name="conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = nn.Conv(self.out_channels, (1, 1), name="conv_shortcut")(x)
    return x + h


class MidBlock(nn.Module):
  """diffusers' UNetMidBlock2D of the VAE: resnet, (one-head attention,) resnet."""
  channels: int
  attention: bool
  groups: int

  @nn.compact
  def __call__(self, h):
    h = ResnetBlock(self.channels, self.groups, name="resnets_0")(h)
    if self.attention:   # diffusers' Attention: group norm, one head of dim channels, residual
      h = AttentionBlock(None, self.groups, EPS, name="attentions_0")(h)
    return ResnetBlock(self.channels, self.groups, name="resnets_1")(h)


class DownEncoderBlock(nn.Module):
  """diffusers' DownEncoderBlock2D: resnets, then a stride-2 conv padded (0, 1) (if any)."""
  channels: int
  num_layers: int
  add_downsample: bool
  groups: int

  @nn.compact
  def __call__(self, h):
    for j in range(self.num_layers):
      h = ResnetBlock(self.channels, self.groups, name=f"resnets_{j}")(h)
    if self.add_downsample:
      h = Downsample(self.channels, padding=0, name="downsamplers_0")(h)
    return h


class UpDecoderBlock(nn.Module):
  """diffusers' UpDecoderBlock2D: resnets, then nearest 2x upsampling and a conv (if any)."""
  channels: int
  num_layers: int
  add_upsample: bool
  groups: int

  @nn.compact
  def __call__(self, h):
    for j in range(self.num_layers):
      h = ResnetBlock(self.channels, self.groups, name=f"resnets_{j}")(h)
    if self.add_upsample:
      h = Upsample(self.channels, name="upsamplers_0")(h)
    return h


def _check_channels(x: jax.Array, channels: int, what: str) -> None:
  if x.ndim != 4 or x.shape[-1] != channels:
    raise ValueError(f"{what} expects [B, H, W, {channels}] (NHWC) for this config, got "
                     f"{tuple(x.shape)}.")


class Encoder(nn.Module):
  """Images [B, H, W, in_channels] -> [B, H/f, W/f, 2 x latent_channels] (before quant_conv)."""
  config: VAEConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    _check_channels(x, cfg.in_channels, "the VAE encoder")
    ch, groups = cfg.block_out_channels, cfg.norm_num_groups
    h = nn.Conv(ch[0], (3, 3), name="conv_in")(x)
    for i, c in enumerate(ch):
      h = DownEncoderBlock(c, cfg.layers_per_block, i < len(ch) - 1, groups,
                           name=f"down_blocks_{i}")(h)
    h = MidBlock(ch[-1], cfg.mid_block_add_attention, groups, name="mid_block")(h)
    h = nn.silu(nn.GroupNorm(groups, epsilon=EPS, name="conv_norm_out")(h))
    return nn.Conv(2 * cfg.latent_channels, (3, 3), name="conv_out")(h)


class Decoder(nn.Module):
  """Latents [B, h, w, latent_channels] (after post_quant_conv) -> images [B, h f, w f, out]."""
  config: VAEConfig

  @nn.compact
  def __call__(self, z):
    cfg = self.config
    _check_channels(z, cfg.latent_channels, "the VAE decoder")
    ch, groups = cfg.block_out_channels, cfg.norm_num_groups
    h = nn.Conv(ch[-1], (3, 3), name="conv_in")(z)
    h = MidBlock(ch[-1], cfg.mid_block_add_attention, groups, name="mid_block")(h)
    for i, c in enumerate(reversed(ch)):
      h = UpDecoderBlock(c, cfg.layers_per_block + 1, i < len(ch) - 1, groups,
                         name=f"up_blocks_{i}")(h)
    h = nn.silu(nn.GroupNorm(groups, epsilon=EPS, name="conv_norm_out")(h))
    return nn.Conv(cfg.out_channels, (3, 3), name="conv_out")(h)


class AutoencoderKL(nn.Module):
  """diffusers' AutoencoderKL: `encode` -> (mean, logvar), `decode`; calling it reconstructs
  an image from its posterior mean (diffusers' forward with sample_posterior=False)."""
  config: VAEConfig

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    if cfg.use_quant_conv:
      self.quant_conv = nn.Conv(2 * cfg.latent_channels, (1, 1))
    if cfg.use_post_quant_conv:
      self.post_quant_conv = nn.Conv(cfg.latent_channels, (1, 1))

  def encode(self, x: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Images [B, H, W, C] -> the diagonal Gaussian's (mean, logvar), each [B, h, w, latent]
    (logvar clamped to [-30, 20] as diffusers' DiagonalGaussianDistribution does)."""
    h = self.encoder(x)
    if self.config.use_quant_conv:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z: jax.Array) -> jax.Array:
    """Unscaled latents [B, h, w, latent] (see `from_latent`) -> images [B, H, W, C]."""
    _check_channels(z, self.config.latent_channels, "the VAE decoder")
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.decode(self.encode(x)[0])


# ----------------------------------------------------------------------------- latents

def to_latent(config: VAEConfig, mean: jax.Array) -> jax.Array:
  """The diffusion model's latent of an encoding: (mean - shift_factor) * scaling_factor."""
  return (mean - config.shift) * config.scaling_factor


def from_latent(config: VAEConfig, z: jax.Array) -> jax.Array:
  """The inverse of `to_latent`, what `decode` takes: z / scaling_factor + shift_factor."""
  return z / config.scaling_factor + config.shift


def sample_posterior(key: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """A draw of the diagonal Gaussian: mean + exp(logvar / 2) * N(0, 1)."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


# ----------------------------------------------------------------------------- params

def _dummy_images(config: VAEConfig) -> jax.Array:
  """The smallest input that runs every layer (params do not depend on the image size)."""
  f = config.downsample_factor
  return jnp.zeros((1, f, f, config.in_channels), jnp.float32)


def init_vae(config: VAEConfig, key: jax.Array) -> Tuple[AutoencoderKL, Any]:
  """Returns (module, params) for `config`, randomly initialised."""
  model = AutoencoderKL(config)
  x = _dummy_images(config)
  init = jax.jit(model.init).lower(key, x)
  # As init_unet: unoptimised XLA compiles init much faster on CPU, for the same values.
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  return model, init.compile(options)(key, x)["params"]


def abstract_vae_params(config: VAEConfig):
  """Shapes of the Flax VAE's params for `config`, without running init."""
  return jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0),
                        _dummy_images(config))["params"]


def convert_vae_state_dict(state_dict: Mapping[str, Any], config: VAEConfig,
                           dtype=np.float32) -> Dict[str, Any]:
  """Maps a diffusers AutoencoderKL state dict onto the Flax params for `config`.

  Raises:
    ValueError naming every missing key, unexpected key and shape mismatch.
  """
  return torch_weights.map_state_dict(
      state_dict, abstract_vae_params(config), key_map=lambda key: "/".join(flax_path(key)),
      dtype=dtype,
      what="the AutoencoderKL config (is config.json the one saved with these weights?)")


def import_vae_diffusers(directory: str, subfolder: str = SUBFOLDER
                         ) -> Tuple[AutoencoderKL, Any, VAEConfig]:
  """Loads a diffusers AutoencoderKL: `directory` holds config.json and
  diffusion_pytorch_model.safetensors (or .bin), or its `subfolder` does (a pipeline folder).

  Returns:
    (module, params, config).
  Raises:
    FileNotFoundError naming the path and what was expected there; ValueError for an
    unsupported config or weights that do not match it.
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no VAE directory at {directory}: expected a folder holding "
                            f"{CONFIG_NAME} and {WEIGHTS_NAMES[0]} (or .bin), or its "
                            f"{subfolder}/ subfolder.")
  cfg_path, weights = find_model(directory, subfolder, WEIGHTS_NAMES[:2])
  config = VAEConfig.from_diffusers(read_config(cfg_path))
  params = convert_vae_state_dict(load_state_dict(weights), config)
  return AutoencoderKL(config), params, config
