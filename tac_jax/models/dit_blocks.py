"""The blocks of the DiT / PixArt-alpha transformers (`dit`), with diffusers' submodule
names: patch and condition embeddings, adaLN modulations, attention, MLP, the block."""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tac_jax.models.dit_config import TIME_PROJ_DIM, DiTConfig
from tac_jax.models.layers import Einsum
from tac_jax.models.unet import TimestepEmbedding, timestep_embedding

def sincos_pos_embed(dim: int, grid: int, interpolation_scale: float = 1.0) -> np.ndarray:
  """diffusers' `get_2d_sincos_pos_embed` for a square grid: [grid * grid, dim] float32.

  Token n = i * grid + j (row i, column j) gets [sincos(j) | sincos(i)], each half
  [sin | cos] of position / interpolation_scale (computed in float32) times the
  frequencies 10000^(-k / (dim / 4)) (float64), as diffusers does.
  """
  pos = np.arange(grid, dtype=np.float32) / np.float32(interpolation_scale)
  cols, rows = np.meshgrid(pos, pos, indexing="xy")

  def one_d(d, p):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.outer(p.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  emb = np.concatenate([one_d(dim // 2, cols), one_d(dim // 2, rows)], axis=1)
  return emb.astype(np.float32)


def layer_norm(eps: float, name: Optional[str] = None) -> nn.LayerNorm:
  """torch's LayerNorm(elementwise_affine=False): no params, two-pass variance."""
  return nn.LayerNorm(epsilon=eps, use_bias=False, use_scale=False, use_fast_variance=False,
                      name=name)


# ----------------------------------------------------------------------------- embeddings

class PatchEmbed(nn.Module):
  """[B, S, S, C] -> [B, (S/p)^2, D]: strided conv `proj` plus fixed sin-cos positions."""
  config: DiTConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    p = cfg.patch_size
    h = nn.Conv(cfg.inner_dim, (p, p), strides=(p, p), padding="VALID", name="proj")(x)
    b, gh, gw, d = h.shape
    pos = sincos_pos_embed(d, cfg.grid_size, cfg.interpolation_scale)
    return h.reshape(b, gh * gw, d) + jnp.asarray(pos)[None]


class LabelEmbedding(nn.Module):
  """Class labels -> [B, D]; row `num_classes` is the null (CFG) label."""
  num_classes: int
  dim: int

  @nn.compact
  def __call__(self, labels):
    return nn.Embed(self.num_classes + 1, self.dim, name="embedding_table")(labels)


class CombinedTimestepLabelEmbeddings(nn.Module):
  """DiT's conditioning: MLP(sinusoid(t), shift 1) + label embedding."""
  num_classes: int
  dim: int

  @nn.compact
  def __call__(self, t, labels):
    t_emb = timestep_embedding(t, TIME_PROJ_DIM, flip_sin_to_cos=True, freq_shift=1.0)
    t_emb = TimestepEmbedding(self.dim, name="timestep_embedder")(t_emb)
    return t_emb + LabelEmbedding(self.num_classes, self.dim, name="class_embedder")(labels)


class AdaLayerNormZero(nn.Module):
  """adaLN-Zero: returns (modulated LN(x), gate_msa, shift_mlp, scale_mlp, gate_mlp, emb)."""
  num_classes: int
  dim: int

  @nn.compact
  def __call__(self, x, t, labels):
    emb = CombinedTimestepLabelEmbeddings(self.num_classes, self.dim, name="emb")(t, labels)
    mods = nn.Dense(6 * self.dim, name="linear")(nn.silu(emb))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mods, 6, axis=-1)
    x = layer_norm(1e-6, name="norm")(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
    return x, gate_msa, shift_mlp, scale_mlp, gate_mlp, emb


class PixArtTimestepEmbeddings(nn.Module):
  """PixArt's `adaln_single.emb` without size conditions: MLP(sinusoid(t), shift 0)."""
  dim: int

  @nn.compact
  def __call__(self, t):
    t_emb = timestep_embedding(t, TIME_PROJ_DIM, flip_sin_to_cos=True, freq_shift=0.0)
    return TimestepEmbedding(self.dim, name="timestep_embedder")(t_emb)


class AdaLayerNormSingle(nn.Module):
  """adaLN-single: returns (six modulations [B, 6 D], the timestep embedding [B, D])."""
  dim: int

  @nn.compact
  def __call__(self, t):
    emb = PixArtTimestepEmbeddings(self.dim, name="emb")(t)
    return nn.Dense(6 * self.dim, name="linear")(nn.silu(emb)), emb


class TextProjection(nn.Module):
  """PixArt's `caption_projection`: Dense, tanh-GELU, Dense."""
  dim: int

  @nn.compact
  def __call__(self, caption):
    h = nn.gelu(nn.Dense(self.dim, name="linear_1")(caption), approximate=True)
    return nn.Dense(self.dim, name="linear_2")(h)


# ----------------------------------------------------------------------------- blocks

class Attention(nn.Module):
  """Multi-head attention; `context` None is self-attention. `bias` [B, 1, 1, L] is added
  to the logits (diffusers' additive attention mask)."""
  heads: int
  head_dim: int

  @nn.compact
  def __call__(self, x, context=None, bias=None):
    b, n, d = x.shape
    inner = self.heads * self.head_dim
    context = x if context is None else context
    split = lambda z: z.reshape(b, z.shape[1], self.heads, self.head_dim)
    q = split(nn.Dense(inner, name="to_q")(x))
    k = split(nn.Dense(inner, name="to_k")(context))
    v = split(nn.Dense(inner, name="to_v")(context))
    logits = Einsum("bqhd,bkhd->bhqk", name="qk")(q, k) / math.sqrt(self.head_dim)
    if bias is not None:
      logits = logits + bias
    out = Einsum("bhqk,bkhd->bqhd", name="av")(jax.nn.softmax(logits, axis=-1), v)
    return nn.Dense(d, name="to_out_0")(out.reshape(b, n, inner))


class GELU(nn.Module):
  """diffusers' GELU(approximate='tanh') projection: `proj` then tanh-GELU."""
  dim: int

  @nn.compact
  def __call__(self, x):
    return nn.gelu(nn.Dense(self.dim, name="proj")(x), approximate=True)


class FeedForward(nn.Module):
  dim: int
  mult: int = 4

  @nn.compact
  def __call__(self, x):
    h = GELU(self.mult * self.dim, name="net_0")(x)
    return nn.Dense(self.dim, name="net_2")(h)


class TransformerBlock(nn.Module):
  """diffusers' BasicTransformerBlock for norm_type ada_norm_zero / ada_norm_single.

  DiT: `block(h, t=t, labels=labels)`; PixArt: `block(h, mods=[B, 6 D], context=...,
  context_bias=...)`. Returns (h, the block's conditioning embedding (DiT) or None).
  """
  config: DiTConfig

  @nn.compact
  def __call__(self, h, t=None, labels=None, mods=None, context=None, context_bias=None):
    cfg = self.config
    dim = cfg.inner_dim
    attention = lambda name: Attention(cfg.num_attention_heads, cfg.attention_head_dim, name=name)
    if cfg.class_conditional:
      x, gate_msa, shift_mlp, scale_mlp, gate_mlp, emb = AdaLayerNormZero(
          cfg.num_embeds_ada_norm, dim, name="norm1")(h, t, labels)
      h = h + gate_msa[:, None] * attention("attn1")(x)
      x = layer_norm(cfg.norm_eps, "norm3")(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
      return h + gate_mlp[:, None] * FeedForward(dim, name="ff")(x), emb
    table = self.param("scale_shift_table", nn.initializers.normal(dim ** -0.5), (6, dim))
    m = table[None] + mods.reshape(h.shape[0], 6, dim)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(m, 6, axis=1)
    x = layer_norm(cfg.norm_eps, "norm1")(h) * (1 + scale_msa) + shift_msa
    h = h + gate_msa * attention("attn1")(x)
    # PixArt applies no norm before cross-attention; norm2 is the MLP's.
    h = h + attention("attn2")(h, context, context_bias)
    x = layer_norm(cfg.norm_eps, "norm2")(h) * (1 + scale_mlp) + shift_mlp
    return h + gate_mlp * FeedForward(dim, name="ff")(x), None


