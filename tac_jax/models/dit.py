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

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tac_jax.models.dit_blocks import (AdaLayerNormSingle, PatchEmbed, TextProjection,
                                       TransformerBlock, layer_norm)
from tac_jax.models.dit_config import MASK_BIAS, DiTConfig
from tac_jax.models.layers import batch_timesteps


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
    t = batch_timesteps(t, b)
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
