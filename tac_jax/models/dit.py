"""DiT and PixArt-alpha diffusion transformers in Flax Linen, with diffusers naming.

Two variants of one architecture, selected by `DiTConfig.norm_type`:

* `ada_norm_zero` (DiT, diffusers `DiTTransformer2DModel`): class-conditional. Every block
  embeds (timestep, class label) itself (`norm1.emb`: sinusoidal timestep features ->
  `timestep_embedder` MLP, plus `class_embedder.embedding_table`, whose extra last row,
  index `num_embeds_ada_norm`, is the null label of classifier-free guidance) and maps it
  to six modulations (`norm1.linear`): shift/scale/gate of self-attention and of the MLP.
  The output layer modulates with block 0's embedding (`proj_out_1`), then `proj_out_2`.
* `ada_norm_single` (PixArt-alpha, diffusers `PixArtTransformer2DModel`): text-conditioned.
  One shared timestep embedding (`adaln_single.emb.timestep_embedder`, `adaln_single.linear`)
  gives six modulations that each block offsets by its learned `scale_shift_table`; a block
  adds cross-attention (`attn2`) over the caption tokens, projected by `caption_projection`.
  The output layer uses a top-level `scale_shift_table` and `proj_out`.

Both patchify with a strided conv (`pos_embed.proj`), add fixed 2-D sin-cos positions
(computed here, as diffusers registers them as a non-persistent buffer), run
`transformer_blocks` (pre-LN self-attention `attn1` with `to_q/to_k/to_v/to_out.0`, a tanh-GELU
MLP `ff.net.0.proj`, `ff.net.2`) and unpatchify. Submodule names are diffusers' with list
indices joined by '_', so a state dict maps onto the params tree by the generic rule of
`torch_weights.default_path` (see `dit_convert`):

    transformer_blocks.0.attn1.to_out.0.weight  ->  transformer_blocks_0/attn1/to_out_0/kernel
    transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight
                                    ->  .../norm1/emb/class_embedder/embedding_table/embedding
    pos_embed.proj.weight [O, I, p, p]          ->  pos_embed/proj/kernel [p, p, I, O]
    scale_shift_table                           ->  scale_shift_table (as is)

Layout is NHWC. All weight products are `nn.Dense` / `nn.Conv` (what `tac_jax.quant`
intercepts); attention's two activation products are `layers.Einsum`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tac_jax import config_utils
from tac_jax.models.layers import Einsum
from tac_jax.models.unet import TimestepEmbedding, timestep_embedding

NORM_TYPES = ("ada_norm_zero", "ada_norm_single")
TIME_PROJ_DIM = 256          # diffusers' Timesteps(num_channels=256) in both variants
MASK_BIAS = -10000.0         # diffusers' additive bias for a masked-out caption token


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """A DiT (`ada_norm_zero`) or PixArt-alpha (`ada_norm_single`) transformer.

  `out_channels` None means `in_channels`; `out_channels == 2 * in_channels` is DiT's
  learned-sigma head (see `split_learned_sigma`). `num_embeds_ada_norm` is the class count
  of DiT (the embedding table has one more row, the null label); PixArt ignores it.
  `cross_attention_dim` is the caption token width seen by `attn2` (PixArt only); with
  `caption_channels` set, captions of that width are first projected to the model width,
  which must then equal `cross_attention_dim` (as in diffusers). The last three fields
  exist to be validated: other values are diffusers options this port does not implement.
  """
  sample_size: int = 8
  patch_size: int = 2
  in_channels: int = 4
  out_channels: Optional[int] = None
  num_layers: int = 2
  num_attention_heads: int = 2
  attention_head_dim: int = 8
  norm_type: str = "ada_norm_zero"
  num_embeds_ada_norm: Optional[int] = 1000
  cross_attention_dim: Optional[int] = None
  caption_channels: Optional[int] = None
  norm_eps: float = 1e-6
  interpolation_scale: float = 1.0
  activation_fn: str = "gelu-approximate"
  norm_elementwise_affine: bool = False
  use_additional_conditions: bool = False

  def __post_init__(self):
    if self.out_channels is None:
      object.__setattr__(self, "out_channels", self.in_channels)
    problems = self._problems()
    if problems:
      raise ValueError("invalid DiTConfig: " + "; ".join(problems) + ".")

  def _problems(self):
    p = []
    if self.norm_type not in NORM_TYPES:
      p.append(f"norm_type={self.norm_type!r} (supported: {NORM_TYPES})")
    sizes = ("sample_size", "patch_size", "in_channels", "out_channels", "num_layers",
             "num_attention_heads", "attention_head_dim")
    p += [f"{k}={getattr(self, k)!r} must be a positive int" for k in sizes
          if not isinstance(getattr(self, k), int) or getattr(self, k) < 1]
    if p:
      return p
    if self.sample_size % self.patch_size:
      p.append(f"sample_size {self.sample_size} is not a multiple of patch_size {self.patch_size}")
    if self.inner_dim % 4:
      p.append(f"num_attention_heads * attention_head_dim = {self.inner_dim} must be a multiple "
               "of 4 (2-D sin-cos positions)")
    if not self.interpolation_scale > 0 or not self.norm_eps > 0:
      p.append(f"interpolation_scale={self.interpolation_scale!r} and norm_eps={self.norm_eps!r} "
               "must be positive")
    if self.activation_fn != "gelu-approximate":
      p.append(f"activation_fn={self.activation_fn!r} (supported: 'gelu-approximate')")
    if self.norm_elementwise_affine:
      p.append("norm_elementwise_affine=True (supported: False)")
    if self.use_additional_conditions:
      p.append("use_additional_conditions=True (PixArt's resolution / aspect-ratio "
               "embeddings, used by 1024px checkpoints, are not implemented; supported: False)")
    if self.norm_type == "ada_norm_zero":
      if not isinstance(self.num_embeds_ada_norm, int) or self.num_embeds_ada_norm < 1:
        p.append(f"ada_norm_zero (DiT) needs num_embeds_ada_norm = the class count, got "
                 f"{self.num_embeds_ada_norm!r}")
      if self.cross_attention_dim is not None or self.caption_channels is not None:
        p.append("ada_norm_zero (DiT) is class-conditional: cross_attention_dim and "
                 "caption_channels must be None")
    elif self.cross_attention_dim is None:
      p.append("ada_norm_single (PixArt) needs cross_attention_dim")
    elif self.caption_channels is not None and self.cross_attention_dim != self.inner_dim:
      p.append(f"with caption_channels set, captions are projected to the model width "
               f"{self.inner_dim}, so cross_attention_dim must be {self.inner_dim}, got "
               f"{self.cross_attention_dim}")
    return p

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def grid_size(self) -> int:
    """Patches per side."""
    return self.sample_size // self.patch_size

  @property
  def class_conditional(self) -> bool:
    return self.norm_type == "ada_norm_zero"

  @property
  def context_dim(self) -> Optional[int]:
    """Width of the caption embeddings `DiT.__call__` takes (PixArt), else None."""
    if self.class_conditional:
      return None
    return self.caption_channels or self.cross_attention_dim

  @property
  def null_class_label(self) -> Optional[int]:
    """DiT's unconditional (classifier-free guidance) label, else None."""
    return self.num_embeds_ada_norm if self.class_conditional else None

  @property
  def learn_sigma(self) -> bool:
    return self.out_channels == 2 * self.in_channels

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "DiTConfig":
    return config_utils.from_dict(cls, d)

  def to_dict(self):
    return dataclasses.asdict(self)


def split_learned_sigma(output: jax.Array,
                        config: DiTConfig) -> Tuple[jax.Array, Optional[jax.Array]]:
  """Splits a DiT output [..., out_channels] into (epsilon, variance values).

  With a learned-sigma head (`out_channels == 2 * in_channels`, as the released DiT and
  PixArt checkpoints) the first `in_channels` channels are the noise prediction and the
  rest the interpolation values of the learned variance, which diffusers' pipelines drop
  (DDPM-style samplers only need epsilon). Otherwise the output is epsilon and the second
  element is None.
  """
  if not config.learn_sigma:
    return output, None
  c = config.in_channels
  return output[..., :c], output[..., c:]


def epsilon_prediction(output: jax.Array, config: DiTConfig) -> jax.Array:
  """The epsilon half of a DiT output (all of it without a learned-sigma head)."""
  return split_learned_sigma(output, config)[0]


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


# ----------------------------------------------------------------------------- model

class DiT(nn.Module):
  """(x [B, S, S, C_in] NHWC, t [B] or scalar, cond, cond_mask) -> [B, S, S, out_channels].

  `cond`: int class labels [B] for DiT (`config.null_class_label` is the unconditional
  label; labels outside [0, num_embeds_ada_norm] are clamped by the lookup), or caption
  embeddings [B, L, config.context_dim] for PixArt, with optional `cond_mask` [B, L]
  (1 / True keep, 0 / False ignore, diffusers' `encoder_attention_mask`).
  """
  config: DiTConfig

  def check_inputs(self, x, t, cond, cond_mask):
    cfg = self.config
    want = (cfg.sample_size, cfg.sample_size, cfg.in_channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
      raise ValueError(f"DiT expects images of shape [B, {want[0]}, {want[1]}, {want[2]}] "
                       f"(NHWC) for this config, got {tuple(x.shape)}.")
    b = x.shape[0]
    t = jnp.asarray(t)
    if t.ndim == 0:
      t = jnp.full((b,), t)
    if t.shape != (b,):
      raise ValueError(f"timesteps must be a scalar or have shape [{b}], got {t.shape}.")
    cond = jnp.asarray(cond)
    if cfg.class_conditional:
      if cond.shape != (b,) or not jnp.issubdtype(cond.dtype, jnp.integer):
        raise ValueError(f"DiT (ada_norm_zero) takes integer class labels of shape [{b}] as "
                         f"cond, got {cond.dtype}{list(cond.shape)}.")
      if cond_mask is not None:
        raise ValueError("cond_mask is for caption tokens (PixArt); DiT takes none.")
    else:
      if cond.ndim != 3 or cond.shape[0] != b or cond.shape[2] != cfg.context_dim:
        raise ValueError(f"PixArt (ada_norm_single) takes caption embeddings of shape "
                         f"[{b}, L, {cfg.context_dim}] as cond, got {list(cond.shape)}.")
      if cond_mask is not None and jnp.shape(cond_mask) != cond.shape[:2]:
        raise ValueError(f"cond_mask must have shape {list(cond.shape[:2])} (batch, caption "
                         f"tokens), got {list(jnp.shape(cond_mask))}.")
    return t, cond

  @nn.compact
  def __call__(self, x, t, cond, cond_mask=None):
    cfg = self.config
    t, cond = self.check_inputs(x, t, cond, cond_mask)
    h = PatchEmbed(cfg, name="pos_embed")(x)
    if cfg.class_conditional:
      h, shift, scale = self._dit_blocks(h, t, cond)
      h = layer_norm(1e-6, "norm_out")(h) * (1 + scale) + shift
      h = nn.Dense(cfg.patch_size ** 2 * cfg.out_channels, name="proj_out_2")(h)
    else:
      h, shift, scale = self._pixart_blocks(h, t, cond, cond_mask)
      h = layer_norm(1e-6, "norm_out")(h) * (1 + scale) + shift
      h = nn.Dense(cfg.patch_size ** 2 * cfg.out_channels, name="proj_out")(h)
    return self._unpatchify(h)

  def _dit_blocks(self, h, t, labels):
    """The DiT blocks; returns (h, shift, scale) of the output layer, from block 0's
    conditioning embedding as diffusers."""
    emb0 = None
    for i in range(self.config.num_layers):
      h, emb = TransformerBlock(self.config, name=f"transformer_blocks_{i}")(h, t=t, labels=labels)
      emb0 = emb if emb0 is None else emb0
    mods = nn.Dense(2 * self.config.inner_dim, name="proj_out_1")(nn.silu(emb0))
    shift, scale = jnp.split(mods, 2, axis=-1)
    return h, shift[:, None], scale[:, None]

  def _pixart_blocks(self, h, t, caption, caption_mask):
    cfg = self.config
    mods, t_emb = AdaLayerNormSingle(cfg.inner_dim, name="adaln_single")(t)
    if cfg.caption_channels is not None:
      caption = TextProjection(cfg.inner_dim, name="caption_projection")(caption)
    bias = None
    if caption_mask is not None:
      keep = jnp.asarray(caption_mask).astype(h.dtype)
      bias = ((1.0 - keep) * MASK_BIAS)[:, None, None, :]
    for i in range(cfg.num_layers):
      h, _ = TransformerBlock(cfg, name=f"transformer_blocks_{i}")(
          h, mods=mods, context=caption, context_bias=bias)
    table = self.param("scale_shift_table", nn.initializers.normal(cfg.inner_dim ** -0.5),
                       (2, cfg.inner_dim))
    m = table[None] + t_emb[:, None]
    return h, m[:, 0:1], m[:, 1:2]

  def _unpatchify(self, h):
    """[B, g * g, p * p * C] -> [B, g p, g p, C] (diffusers' 'nhwpqc->nchpwq', in NHWC)."""
    cfg = self.config
    g, p, c = cfg.grid_size, cfg.patch_size, cfg.out_channels
    h = h.reshape(h.shape[0], g, g, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return h.reshape(h.shape[0], g * p, g * p, c)


def dummy_inputs(config: DiTConfig, batch: int = 1, tokens: int = 1):
  """(x, t, cond) of the right shapes and dtypes for `config` (init, shape inference)."""
  x = jnp.zeros((batch, config.sample_size, config.sample_size, config.in_channels))
  t = jnp.zeros((batch,), jnp.int32)
  if config.class_conditional:
    cond = jnp.zeros((batch,), jnp.int32)
  else:
    cond = jnp.zeros((batch, tokens, config.context_dim))
  return x, t, cond


def init_dit(config: DiTConfig, key: jax.Array):
  """Returns (module, params) for `config`."""
  model = DiT(config)
  args = dummy_inputs(config)
  init = jax.jit(model.init).lower(key, *args)
  # As init_unet: on CPU, init is mostly PRNG and compiles far faster unoptimised.
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  return model, init.compile(options)(key, *args)["params"]
