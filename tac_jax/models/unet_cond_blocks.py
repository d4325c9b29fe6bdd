"""The blocks of diffusers' `UNet2DConditionModel` (Stable Diffusion 1.x / 2.x, SDXL) in Flax.

Names follow diffusers, list indices joined by '_' (see `tac_jax.models.unet_cond`):

* `SpatialTransformer` is diffusers' `Transformer2DModel` on continuous inputs: GroupNorm
  `norm` (eps 1e-6), `proj_in` (1x1 conv, or Dense with `use_linear_projection`),
  `transformer_blocks_<k>`, `proj_out`, plus the residual.
* `BasicTransformerBlock`: pre-LayerNorm (`norm1/2/3`, eps 1e-5, affine) self-attention
  `attn1`, cross-attention `attn2` over the text tokens and the GEGLU feed-forward
  `ff.net.0.proj` (2 x inner wide: hidden * erf-GELU(gate)), `ff.net.2`.
* `CrossAttention`: `to_q/to_k/to_v` without bias, `to_out.0` with bias; q k^T and
  softmax(.) v are `layers.Einsum`s, so `tac_jax.quant` can find them.
* `CrossAttnDownBlock`, `CrossAttnUpBlock`, `CrossAttnMidBlock`: diffusers'
  `CrossAttnDownBlock2D`, `CrossAttnUpBlock2D`, `UNetMidBlock2DCrossAttn`. The plain
  `DownBlock2D` / `UpBlock2D` and the ResNet, down- and upsampling layers are those of
  `tac_jax.models.unet` (`UNet2DModel`'s are the same modules).
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tac_jax.models.layers import Einsum
from tac_jax.models.unet import Downsample, ResnetBlock2D, Upsample

TRANSFORMER_NORM_EPS = 1e-6   # Transformer2DModel's GroupNorm
LAYER_NORM_EPS = 1e-5         # BasicTransformerBlock's LayerNorms
FF_MULT = 4


def layer_norm(name: str) -> nn.LayerNorm:
  """torch's affine LayerNorm(eps=1e-5) with its two-pass variance."""
  return nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False, name=name)


class CrossAttention(nn.Module):
  """diffusers' `Attention` as SD builds it; `context` None is self-attention."""
  heads: int
  head_dim: int

  @nn.compact
  def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
    b, n, d = x.shape
    inner = self.heads * self.head_dim
    context = x if context is None else context
    split = lambda z: z.reshape(b, z.shape[1], self.heads, self.head_dim)
    q = split(nn.Dense(inner, use_bias=False, name="to_q")(x))
    k = split(nn.Dense(inner, use_bias=False, name="to_k")(context))
    v = split(nn.Dense(inner, use_bias=False, name="to_v")(context))
    logits = Einsum("bqhd,bkhd->bhqk", name="qk")(q, k) / math.sqrt(self.head_dim)
    out = Einsum("bhqk,bkhd->bqhd", name="av")(jax.nn.softmax(logits, axis=-1), v)
    return nn.Dense(d, name="to_out_0")(out.reshape(b, n, inner))


class GEGLU(nn.Module):
  """diffusers' GEGLU: `proj` to 2 * dim, then hidden * gelu(gate) (exact, erf GELU)."""
  dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    hidden, gate = jnp.split(nn.Dense(2 * self.dim, name="proj")(x), 2, axis=-1)
    return hidden * nn.gelu(gate, approximate=False)


class GEGLUFeedForward(nn.Module):
  """diffusers' FeedForward(activation_fn='geglu'): `net_0` (GEGLU), `net_2` (Dense)."""
  dim: int
  mult: int = FF_MULT

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Dense(self.dim, name="net_2")(GEGLU(self.mult * self.dim, name="net_0")(x))


class BasicTransformerBlock(nn.Module):
  """Self-attention, cross-attention and GEGLU feed-forward, each pre-LN and residual."""
  heads: int
  head_dim: int

  @nn.compact
  def __call__(self, h: jax.Array, context: jax.Array) -> jax.Array:
    h = h + CrossAttention(self.heads, self.head_dim, name="attn1")(layer_norm("norm1")(h))
    h = h + CrossAttention(self.heads, self.head_dim, name="attn2")(layer_norm("norm2")(h),
                                                                     context)
    return h + GEGLUFeedForward(h.shape[-1], name="ff")(layer_norm("norm3")(h))


class SpatialTransformer(nn.Module):
  """diffusers' Transformer2DModel (continuous input): [B, H, W, C] -> [B, H, W, C].

  `heads` heads of width C // heads (diffusers' `out_channels // num_attention_heads`).
  """
  heads: int
  num_layers: int
  groups: int
  linear_projection: bool

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape
    head_dim = c // self.heads
    inner = self.heads * head_dim
    h = nn.GroupNorm(self.groups, epsilon=TRANSFORMER_NORM_EPS, use_fast_variance=False,
                     name="norm")(x)
    if self.linear_projection:
      h = nn.Dense(inner, name="proj_in")(h.reshape(b, hgt * wid, c))
    else:
      h = nn.Conv(inner, (1, 1), name="proj_in")(h).reshape(b, hgt * wid, inner)
    for k in range(self.num_layers):
      h = BasicTransformerBlock(self.heads, head_dim, name=f"transformer_blocks_{k}")(h, context)
    if self.linear_projection:
      h = nn.Dense(c, name="proj_out")(h).reshape(b, hgt, wid, c)
    else:
      h = nn.Conv(c, (1, 1), name="proj_out")(h.reshape(b, hgt, wid, inner))
    return h + x


class CrossAttnDownBlock(nn.Module):
  """diffusers' CrossAttnDownBlock2D: (resnet, transformer) x num_layers, downsample."""
  channels: int
  num_layers: int
  add_downsample: bool
  heads: int
  transformer_layers: int
  groups: int
  eps: float
  linear_projection: bool
  downsample_padding: int = 1

  @nn.compact
  def __call__(self, h: jax.Array, temb: jax.Array,
               context: jax.Array) -> Tuple[jax.Array, List[jax.Array]]:
    skips = []
    for j in range(self.num_layers):
      h = ResnetBlock2D(self.channels, self.groups, self.eps, name=f"resnets_{j}")(h, temb)
      h = SpatialTransformer(self.heads, self.transformer_layers, self.groups,
                             self.linear_projection, name=f"attentions_{j}")(h, context)
      skips.append(h)
    if self.add_downsample:
      h = Downsample(self.channels, self.downsample_padding, name="downsamplers_0")(h)
      skips.append(h)
    return h, skips


class CrossAttnUpBlock(nn.Module):
  """diffusers' CrossAttnUpBlock2D: (concat skip, resnet, transformer) x num_layers, upsample.
  Pops its skips from the end of `skips`."""
  channels: int
  num_layers: int
  add_upsample: bool
  heads: int
  transformer_layers: int
  groups: int
  eps: float
  linear_projection: bool

  @nn.compact
  def __call__(self, h: jax.Array, skips: List[jax.Array], temb: jax.Array,
               context: jax.Array) -> jax.Array:
    for j in range(self.num_layers):
      h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = ResnetBlock2D(self.channels, self.groups, self.eps, name=f"resnets_{j}")(h, temb)
      h = SpatialTransformer(self.heads, self.transformer_layers, self.groups,
                             self.linear_projection, name=f"attentions_{j}")(h, context)
    if self.add_upsample:
      h = Upsample(self.channels, name="upsamplers_0")(h)
    return h


class CrossAttnMidBlock(nn.Module):
  """diffusers' UNetMidBlock2DCrossAttn (one layer): resnet, transformer, resnet."""
  channels: int
  heads: int
  transformer_layers: int
  groups: int
  eps: float
  linear_projection: bool

  @nn.compact
  def __call__(self, h: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
    h = ResnetBlock2D(self.channels, self.groups, self.eps, name="resnets_0")(h, temb)
    h = SpatialTransformer(self.heads, self.transformer_layers, self.groups,
                           self.linear_projection, name="attentions_0")(h, context)
    return ResnetBlock2D(self.channels, self.groups, self.eps, name="resnets_1")(h, temb)
