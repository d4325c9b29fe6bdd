"""diffusers' `UNet2DConditionModel` (Stable Diffusion 1.x / 2.x, SDXL) in Flax Linen.

The text-conditioned latent UNet: `conv_in`, `time_embedding` (plus SDXL's
`add_embedding` of the pooled text embedding and the size / crop `time_ids`),
`down_blocks_<i>` (`DownBlock2D` or `CrossAttnDownBlock2D`), `mid_block`
(`UNetMidBlock2DCrossAttn` or none), `up_blocks_<i>`, `conv_norm_out`, `conv_out`. Submodule
names are diffusers' with list indices joined by '_', so a state dict maps onto the params
tree by `torch_weights.default_path` (Linear and Conv kernels transposed, norm weights to
`scale`):

    down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight
        -> down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_k/kernel
    down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight
        -> down_blocks_0/attentions_0/transformer_blocks_0/ff/net_0/proj/kernel
    up_blocks.0.upsamplers.0.conv.weight [O, I, 3, 3] -> up_blocks_0/upsamplers_0/conv/kernel

Layout is NHWC; any H, W that are multiples of 2^(number of upsamplers) work (the config's
`sample_size` is what `dummy_inputs` uses). The config (`UNetCondConfig`, with
`from_diffusers`) is in `unet_cond_config`, the blocks in `unet_cond_blocks`.

    module, params, config = import_unet_cond_diffusers("path/to/stable-diffusion-v1-5")
    eps = module.apply({"params": params}, latents, t, text_embeddings)        # SD 1.x / 2.x
    eps = module.apply({"params": params}, latents, t, {"encoder_hidden_states": ctx,
                       "text_embeds": pooled, "time_ids": time_ids})          # SDXL
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tac_jax.models import torch_weights
from tac_jax.models.convert import find_model, load_weights, read_config
from tac_jax.models.unet import DownBlock, TimestepEmbedding, UpBlock, timestep_embedding
from tac_jax.models.unet_cond_blocks import CrossAttnDownBlock, CrossAttnMidBlock, CrossAttnUpBlock
from tac_jax.models.layers import batch_timesteps
from tac_jax.models.unet_cond_config import TEXT_TIME, UNetCondConfig

SUBFOLDER = "unet"
SHARD_INDEX = "diffusion_pytorch_model.safetensors.index.json"
WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", SHARD_INDEX,
           "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")
COND_KEYS = ("encoder_hidden_states", "text_embeds", "time_ids")
SDXL_TIME_IDS = 6   # SDXL base: original size, crop top-left, target size (the refiner has 5)

Cond = Union[jax.Array, Mapping[str, jax.Array]]


def _sinusoid(t: jax.Array, dim: int, config: UNetCondConfig) -> jax.Array:
  """diffusers' `Timesteps(dim, flip_sin_to_cos, freq_shift)`, zero-padded when dim is odd."""
  emb = timestep_embedding(t, dim, config.flip_sin_to_cos, config.freq_shift)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class UNet2DCondition(nn.Module):
  """(x [B, H, W, C_in] NHWC, t [B] or scalar, cond) -> [B, H, W, out_channels].

  `cond` is the text encoder's hidden states [B, L, cross_attention_dim] (SD 1.x / 2.x), or
  for `addition_embed_type` "text_time" (SDXL) a dict {"encoder_hidden_states": [B, L, D],
  "text_embeds": [B, P], "time_ids": [B, K]} with P + K * addition_time_embed_dim ==
  projection_class_embeddings_input_dim (SDXL base: K = 6). Timesteps may be int or float.
  """
  config: UNetCondConfig

  def _check_context(self, context, b: int) -> jax.Array:
    cfg = self.config
    context = jnp.asarray(context)
    if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.cross_attention_dim:
      raise ValueError(f"encoder_hidden_states must have shape [{b}, L, "
                       f"{cfg.cross_attention_dim}] (batch, tokens, cross_attention_dim), got "
                       f"{list(context.shape)}.")
    return context

  def _check_added(self, cond, b: int) -> Tuple[jax.Array, jax.Array]:
    cfg = self.config
    text, ids = jnp.asarray(cond["text_embeds"]), jnp.asarray(cond["time_ids"])
    if text.ndim != 2 or text.shape[0] != b or ids.ndim != 2 or ids.shape[0] != b:
      raise ValueError(f"text_embeds must have shape [{b}, P] and time_ids [{b}, K] (SDXL: K = "
                       f"{SDXL_TIME_IDS}), got {list(text.shape)} and {list(ids.shape)}.")
    width = text.shape[1] + ids.shape[1] * cfg.addition_time_embed_dim
    if width != cfg.projection_class_embeddings_input_dim:
      raise ValueError(
          f"text_embeds width {text.shape[1]} + {ids.shape[1]} time_ids x "
          f"addition_time_embed_dim {cfg.addition_time_embed_dim} = {width}, but this config's "
          f"projection_class_embeddings_input_dim is {cfg.projection_class_embeddings_input_dim}.")
    return text, ids

  def check_inputs(self, x, t, cond: Cond) -> Tuple[jax.Array, jax.Array, Optional[jax.Array],
                                                    Optional[jax.Array]]:
    """Validates the inputs; returns (t [B], encoder_hidden_states, text_embeds, time_ids)
    (the last two None without added conditions)."""
    cfg = self.config
    f = cfg.upsample_factor
    if x.ndim != 4 or x.shape[-1] != cfg.in_channels or x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f"UNet2DCondition expects latents of shape [B, H, W, {cfg.in_channels}] "
                       f"(NHWC) with H and W multiples of {f}, got {tuple(x.shape)}.")
    b = x.shape[0]
    t = batch_timesteps(t, b)
    if not cfg.text_time:
      if isinstance(cond, Mapping):
        raise ValueError("this model (addition_embed_type None) takes the encoder_hidden_states "
                         f"array as cond, got a dict with keys {sorted(cond)}; added conditions "
                         f"are for addition_embed_type {TEXT_TIME!r} (SDXL) models.")
      return t, self._check_context(cond, b), None, None
    if not isinstance(cond, Mapping):
      raise ValueError(f"this SDXL-style model (addition_embed_type {TEXT_TIME!r}) takes cond = "
                       "{'encoder_hidden_states': [B, L, D], 'text_embeds': [B, P], 'time_ids': "
                       f"[B, K]}}, got an array of shape {list(jnp.shape(cond))}.")
    missing = [k for k in COND_KEYS if k not in cond]
    unknown = sorted(set(cond) - set(COND_KEYS))
    if missing or unknown:
      raise ValueError(f"SDXL-style cond needs exactly the keys {list(COND_KEYS)}: missing "
                       f"{missing}, unknown {unknown}.")
    text, ids = self._check_added(cond, b)
    return t, self._check_context(cond["encoder_hidden_states"], b), text, ids

  def _time_embedding(self, t, text_embeds, time_ids) -> jax.Array:
    cfg = self.config
    emb = TimestepEmbedding(cfg.time_embed_dim, name="time_embedding")(
        _sinusoid(t, cfg.block_out_channels[0], cfg))
    if cfg.text_time:
      ids = _sinusoid(time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg)
      added = jnp.concatenate([text_embeds, ids.reshape(t.shape[0], -1)], axis=-1)
      emb = emb + TimestepEmbedding(cfg.time_embed_dim, name="add_embedding")(added)
    return emb

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, cond: Cond) -> jax.Array:
    cfg = self.config
    t, context, text_embeds, time_ids = self.check_inputs(x, t, cond)
    temb = self._time_embedding(t, text_embeds, time_ids)
    common = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps)
    cross = dict(common, linear_projection=cfg.use_linear_projection)
    ch, heads, layers, tl = cfg.block_out_channels, cfg.heads, cfg.layers, cfg.transformer_layers
    n = len(ch)
    h = nn.Conv(ch[0], (3, 3), name="conv_in")(x)
    skips = [h]
    for i, kind in enumerate(cfg.down_block_types):
      name, down = f"down_blocks_{i}", i < n - 1
      if kind == "CrossAttnDownBlock2D":
        h, s = CrossAttnDownBlock(ch[i], layers[i], down, heads[i], tl[i], name=name,
                                  downsample_padding=cfg.downsample_padding,
                                  **cross)(h, temb, context)
      else:
        h, s = DownBlock(ch[i], layers[i], False, down, None, name=name,
                         downsample_padding=cfg.downsample_padding, **common)(h, temb)
      skips += s
    if cfg.mid_block_type is not None:
      h = CrossAttnMidBlock(ch[-1], heads[-1], tl[-1], name="mid_block", **cross)(h, temb, context)
    for i, kind in enumerate(cfg.up_block_types):
      level, name = n - 1 - i, f"up_blocks_{i}"
      if kind == "CrossAttnUpBlock2D":
        h = CrossAttnUpBlock(ch[level], layers[level] + 1, level > 0, heads[level], tl[level],
                             name=name, **cross)(h, skips, temb, context)
      else:
        h = UpBlock(ch[level], layers[level] + 1, False, level > 0, None, name=name,
                    **common)(h, skips, temb)
    h = nn.silu(nn.GroupNorm(cfg.norm_num_groups, epsilon=cfg.norm_eps, name="conv_norm_out")(h))
    return nn.Conv(cfg.out_channels, (3, 3), name="conv_out")(h)


def dummy_inputs(config: UNetCondConfig, batch: int = 1, tokens: int = 1):
  """(x, t, cond) of the right shapes for `config` (init, shape inference); SDXL-style
  configs get SDXL base's 6 time ids and text_embeds of the remaining width."""
  x = jnp.zeros((batch, config.sample_size, config.sample_size, config.in_channels))
  t = jnp.zeros((batch,), jnp.int32)
  context = jnp.zeros((batch, tokens, config.cross_attention_dim))
  if not config.text_time:
    return x, t, context
  time_width = SDXL_TIME_IDS * config.addition_time_embed_dim
  width = config.projection_class_embeddings_input_dim - time_width
  if width < 0:
    raise ValueError(f"projection_class_embeddings_input_dim "
                     f"{config.projection_class_embeddings_input_dim} is narrower than "
                     f"{SDXL_TIME_IDS} time ids x {config.addition_time_embed_dim}; build the "
                     "inputs yourself.")
  cond = {"encoder_hidden_states": context, "text_embeds": jnp.zeros((batch, width)),
          "time_ids": jnp.zeros((batch, SDXL_TIME_IDS))}
  return x, t, cond


def init_unet_cond(config: UNetCondConfig, key: jax.Array) -> Tuple[UNet2DCondition, Any]:
  """Returns (module, params) for `config`, randomly initialised."""
  model = UNet2DCondition(config)
  args = dummy_inputs(config)
  init = jax.jit(model.init).lower(key, *args)
  # As init_unet: on CPU, init is mostly PRNG and compiles far faster unoptimised.
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  return model, init.compile(options)(key, *args)["params"]


@functools.lru_cache(maxsize=8)
def abstract_params(config: UNetCondConfig):
  """Shapes of the params for `config`, without running init (cached by config value:
  tracing a large UNet takes seconds; do not modify the returned tree)."""
  return jax.eval_shape(UNet2DCondition(config).init, jax.random.key(0),
                        *dummy_inputs(config))["params"]


def convert_unet_cond_state_dict(state_dict: Mapping[str, Any], config: UNetCondConfig,
                                 dtype=np.float32) -> Dict[str, Any]:
  """Maps a diffusers UNet2DConditionModel state dict onto the params for `config`.

  Raises ValueError naming every missing key, unexpected key and shape mismatch.
  """
  return torch_weights.map_state_dict(
      state_dict, abstract_params(config),
      key_map=lambda key: "/".join(torch_weights.default_path(key)), dtype=dtype,
      what="the UNet2DConditionModel config (is config.json the one saved with these weights?)")


def import_unet_cond_diffusers(directory: str, subfolder: str = SUBFOLDER):
  """Loads a diffusers UNet2DConditionModel. Returns (module, params, config).

  `directory` holds config.json and the weights (diffusion_pytorch_model.safetensors, a
  sharded .safetensors index, .bin, or their fp16 variants), itself or in `subfolder` (a
  pipeline folder's "unet"). FileNotFoundError naming the path when either is missing;
  ValueError for unsupported config options or weights that do not fit the config.
  """
  cfg_path, weights = find_model(directory, subfolder, WEIGHTS)
  config = UNetCondConfig.from_diffusers(read_config(cfg_path))
  params = convert_unet_cond_state_dict(load_weights(weights), config)
  return UNet2DCondition(config), params, config
