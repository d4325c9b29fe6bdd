"""A DDPM/ADM-family UNet in Flax Linen, with diffusers `UNet2DModel` naming.

Submodule names follow diffusers (`conv_in`, `time_embedding/linear_1`,
`down_blocks_0/resnets_0/conv1`, `down_blocks_0/attentions_0/to_q`,
`down_blocks_0/downsamplers_0/conv`, `mid_block/...`, `up_blocks_0/upsamplers_0/conv`,
`conv_norm_out`, `conv_out`), so a diffusers state dict maps onto the params tree by
replacing '.' with '_' in block indices and transposing kernels. Layout is NHWC.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tac_jax import config_utils
from tac_jax.models.layers import Einsum


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  sample_size: int = 16
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Tuple[int, ...] = (32, 64, 64)
  layers_per_block: int = 1
  attention_levels: Tuple[int, ...] = (1,)   # indices of down blocks with self-attention
  attention_head_dim: Optional[int] = 32  # None: one head per attention block (DDPM CIFAR-10)
  norm_num_groups: int = 8
  norm_eps: float = 1e-5
  mid_attention: bool = True
  # Time embedding and downsampling variants found in diffusers checkpoints.
  flip_sin_to_cos: bool = True    # [cos | sin] (True) or [sin | cos]
  freq_shift: float = 0.0         # frequencies exp(-log(10^4) k / (half - freq_shift))
  downsample_padding: int = 1     # 1: symmetric pad 1; 0: pad bottom/right by 1 (DDPM)

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
    object.__setattr__(self, "attention_levels", tuple(self.attention_levels))
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(f"block_out_channels {self.block_out_channels} must be divisible by "
                         f"norm_num_groups={self.norm_num_groups}.")
    n = len(self.block_out_channels)
    if any(not 0 <= l < n for l in self.attention_levels):
      raise ValueError(f"attention_levels {self.attention_levels} must index the {n} blocks.")
    if self.downsample_padding not in (0, 1):
      raise ValueError(f"downsample_padding must be 0 or 1, got {self.downsample_padding}.")
    if self.sample_size % (2 ** (n - 1)):
      raise ValueError(f"sample_size {self.sample_size} must be divisible by 2^{n - 1}.")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "UNetConfig":
    return config_utils.from_dict(cls, d)

  def to_dict(self):
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding as diffusers' `get_timestep_embedding`: [cos | sin] when
  `flip_sin_to_cos`, else [sin | cos]; frequencies exp(-log(max_period) k / (half - shift))."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  sin, cos = jnp.sin(args), jnp.cos(args)
  return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


class TimestepEmbedding(nn.Module):
  dim: int

  @nn.compact
  def __call__(self, emb):
    return nn.Dense(self.dim, name="linear_2")(nn.silu(nn.Dense(self.dim, name="linear_1")(emb)))


class ResnetBlock2D(nn.Module):
  out_channels: int
  groups: int
  eps: float

  @nn.compact
  def __call__(self, x, temb):
    h = nn.silu(nn.GroupNorm(self.groups, epsilon=self.eps, name="norm1")(x))
    h = nn.Conv(self.out_channels, (3, 3), name="conv1")(h)
    h = h + nn.Dense(self.out_channels, name="time_emb_proj")(nn.silu(temb))[:, None, None]
    h = nn.silu(nn.GroupNorm(self.groups, epsilon=self.eps, name="norm2")(h))
    h = nn.Conv(self.out_channels, (3, 3), name="conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = nn.Conv(self.out_channels, (1, 1), name="conv_shortcut")(x)
    return x + h


class AttentionBlock(nn.Module):
  head_dim: Optional[int]   # None: a single head
  groups: int
  eps: float

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    heads = 1 if self.head_dim is None else max(c // self.head_dim, 1)
    y = nn.GroupNorm(self.groups, epsilon=self.eps, name="group_norm")(x).reshape(b, h * w, c)
    split = lambda z: z.reshape(b, h * w, heads, c // heads)
    q = split(nn.Dense(c, name="to_q")(y))
    k = split(nn.Dense(c, name="to_k")(y))
    v = split(nn.Dense(c, name="to_v")(y))
    logits = Einsum("bqhd,bkhd->bhqk", name="qk")(q, k) / math.sqrt(c // heads)
    out = Einsum("bhqk,bkhd->bqhd", name="av")(jax.nn.softmax(logits, axis=-1), v)
    out = out.reshape(b, h * w, c)
    return x + nn.Dense(c, name="to_out_0")(out).reshape(b, h, w, c)


class Downsample(nn.Module):
  channels: int
  padding: int = 1

  @nn.compact
  def __call__(self, x):
    pad = ((1, 1), (1, 1)) if self.padding == 1 else ((0, 1), (0, 1))
    return nn.Conv(self.channels, (3, 3), strides=(2, 2), padding=pad, name="conv")(x)


class Upsample(nn.Module):
  channels: int

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method="nearest")
    return nn.Conv(self.channels, (3, 3), name="conv")(x)


class DownBlock(nn.Module):
  channels: int
  num_layers: int
  attention: bool
  add_downsample: bool
  head_dim: Optional[int]
  groups: int
  eps: float
  downsample_padding: int = 1

  @nn.compact
  def __call__(self, h, temb):
    skips = []
    for j in range(self.num_layers):
      h = ResnetBlock2D(self.channels, self.groups, self.eps, name=f"resnets_{j}")(h, temb)
      if self.attention:
        h = AttentionBlock(self.head_dim, self.groups, self.eps, name=f"attentions_{j}")(h)
      skips.append(h)
    if self.add_downsample:
      h = Downsample(self.channels, self.downsample_padding, name="downsamplers_0")(h)
      skips.append(h)
    return h, skips


class UpBlock(nn.Module):
  channels: int
  num_layers: int
  attention: bool
  add_upsample: bool
  head_dim: Optional[int]
  groups: int
  eps: float

  @nn.compact
  def __call__(self, h, skips, temb):
    for j in range(self.num_layers):
      h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = ResnetBlock2D(self.channels, self.groups, self.eps, name=f"resnets_{j}")(h, temb)
      if self.attention:
        h = AttentionBlock(self.head_dim, self.groups, self.eps, name=f"attentions_{j}")(h)
    if self.add_upsample:
      h = Upsample(self.channels, name="upsamplers_0")(h)
    return h


class MidBlock(nn.Module):
  channels: int
  attention: bool
  head_dim: Optional[int]
  groups: int
  eps: float

  @nn.compact
  def __call__(self, h, temb):
    h = ResnetBlock2D(self.channels, self.groups, self.eps, name="resnets_0")(h, temb)
    if self.attention:
      h = AttentionBlock(self.head_dim, self.groups, self.eps, name="attentions_0")(h)
    return ResnetBlock2D(self.channels, self.groups, self.eps, name="resnets_1")(h, temb)


class UNet(nn.Module):
  """eps-prediction UNet: (x [B, S, S, C_in], t [B] or scalar) -> eps [B, S, S, C_out]."""
  config: UNetConfig

  def check_inputs(self, x, t):
    cfg = self.config
    want = (cfg.sample_size, cfg.sample_size, cfg.in_channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
      raise ValueError(f"UNet expects images of shape [B, {want[0]}, {want[1]}, {want[2]}] "
                       f"(NHWC) for this config, got {tuple(x.shape)}.")
    t = jnp.asarray(t)
    if t.ndim == 0:
      t = jnp.full((x.shape[0],), t)
    if t.shape != (x.shape[0],):
      raise ValueError(f"timesteps must be a scalar or have shape [{x.shape[0]}], got {t.shape}.")
    return t

  @nn.compact
  def __call__(self, x, t):
    cfg = self.config
    t = self.check_inputs(x, t)
    ch = cfg.block_out_channels
    common = dict(head_dim=cfg.attention_head_dim, groups=cfg.norm_num_groups, eps=cfg.norm_eps)
    temb = TimestepEmbedding(4 * ch[0], name="time_embedding")(
        timestep_embedding(t, ch[0], cfg.flip_sin_to_cos, cfg.freq_shift))

    h = nn.Conv(ch[0], (3, 3), name="conv_in")(x)
    skips = [h]
    for i, c in enumerate(ch):
      h, s = DownBlock(c, cfg.layers_per_block, i in cfg.attention_levels, i < len(ch) - 1,
                       name=f"down_blocks_{i}", downsample_padding=cfg.downsample_padding,
                       **common)(h, temb)
      skips += s
    h = MidBlock(ch[-1], cfg.mid_attention, name="mid_block", **common)(h, temb)
    for i, c in enumerate(reversed(ch)):
      level = len(ch) - 1 - i
      h = UpBlock(c, cfg.layers_per_block + 1, level in cfg.attention_levels, level > 0,
                  name=f"up_blocks_{i}", **common)(h, skips, temb)
    h = nn.silu(nn.GroupNorm(cfg.norm_num_groups, epsilon=cfg.norm_eps, name="conv_norm_out")(h))
    return nn.Conv(cfg.out_channels, (3, 3), name="conv_out")(h)


def init_unet(config: UNetConfig, key: jax.Array):
  """Returns (module, params) for `config`."""
  model = UNet(config)
  x = jnp.zeros((1, config.sample_size, config.sample_size, config.in_channels))
  t = jnp.zeros((1,), jnp.int32)
  init = jax.jit(model.init).lower(key, x, t)
  # init runs once and is mostly the PRNG of every parameter: on CPU, XLA's optimising
  # backend spends ~4x longer compiling it than running it unoptimised (same values up to
  # float rounding), which dominated a tiny model's start-up.
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  return model, init.compile(options)(key, x, t)["params"]
