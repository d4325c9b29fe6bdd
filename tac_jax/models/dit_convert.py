"""Import diffusers DiT / PixArt-alpha transformer checkpoints into the Flax `DiT`.

Reads a diffusers model directory (`save_pretrained` layout, optionally under
`transformer/`): `config.json` plus `diffusion_pytorch_model.safetensors`, a sharded
`diffusion_pytorch_model.safetensors.index.json`, or a pickled `.bin` state dict (needs
torch). Supported classes: `DiTTransformer2DModel` (norm_type ada_norm_zero),
`PixArtTransformer2DModel` (ada_norm_single) and the legacy `Transformer2DModel` with one
of those norm types, which diffusers itself loads as the first two (its
`_CLASS_REMAPPING_DICT`): missing config fields take the remapped class's defaults.

The Flax module uses diffusers' names, so weights map by `torch_weights.default_path`
(list indices joined by '_', `weight` resolved to kernel / embedding, Linear and Conv
kernels transposed); see `tac_jax.models.dit` for examples. The fixed sin-cos position
table (`pos_embed.pos_embed`, a non-persistent buffer) is recomputed; if a state dict
carries it anyway, it must match.

    module, params, config = import_dit_diffusers("path/to/DiT-XL-2-256")
    eps = epsilon_prediction(module.apply({"params": params}, x, t, labels), config)
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

import jax
import numpy as np

from tac_jax.models import torch_weights
from tac_jax.models.convert import WEIGHTS_NAMES, find_model, load_weights, read_config
from tac_jax.models.dit import DiT, dummy_inputs
from tac_jax.models.dit_blocks import sincos_pos_embed
from tac_jax.models.dit_config import DiTConfig

SUBFOLDER = "transformer"
SHARD_INDEX = "diffusion_pytorch_model.safetensors.index.json"
BUFFERS = ("pos_embed.pos_embed",)
CLASSES = {"DiTTransformer2DModel": "ada_norm_zero", "PixArtTransformer2DModel": "ada_norm_single"}
LEGACY_CLASS = "Transformer2DModel"

_COMMON_DEFAULTS = {
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "num_layers": 28,
    "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True, "patch_size": 2,
    "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "upcast_attention": False,
    "norm_elementwise_affine": False,
}
# The __init__ defaults of diffusers 0.42's two classes.
DEFAULTS = {
    "ada_norm_zero": dict(_COMMON_DEFAULTS, out_channels=None, sample_size=32, norm_eps=1e-5),
    "ada_norm_single": dict(_COMMON_DEFAULTS, out_channels=8, sample_size=128, norm_eps=1e-6,
                            cross_attention_dim=1152, interpolation_scale=None,
                            use_additional_conditions=None, caption_channels=None,
                            attention_type="default"),
}
# Fields that must keep one value (field -> accepted values); None: any value, as
# `norm_num_groups`, `use_linear_projection` (unused by patched inputs) and
# `upcast_attention` (float32 compute here) do not change the model.
FIXED = {
    "activation_fn": ("gelu-approximate",), "norm_elementwise_affine": (False,),
    "attention_bias": (True,), "dropout": (0, 0.0), "attention_type": ("default",),
    "only_cross_attention": (False,), "double_self_attention": (False,),
    "num_vector_embeds": (None,), "use_linear_projection": None, "norm_num_groups": None,
    "upcast_attention": None,
}
_DIT_ONLY_NONE = ("cross_attention_dim", "caption_channels", "interpolation_scale",
                  "use_additional_conditions")


def _class_norm_type(cfg: Mapping[str, Any]) -> str:
  cls = cfg.get("_class_name")
  norm_type = cfg.get("norm_type")
  if cls == LEGACY_CLASS or (cls is None and norm_type in DEFAULTS):
    if norm_type not in DEFAULTS:
      raise ValueError(f"{LEGACY_CLASS} with norm_type={norm_type!r} is not a DiT / PixArt "
                       f"model; supported norm_type: {sorted(DEFAULTS)}.")
    return norm_type
  if cls not in CLASSES:
    raise ValueError(f"unsupported diffusers class {cls!r}; supported: {sorted(CLASSES)} (or "
                     f"{LEGACY_CLASS} with norm_type in {sorted(DEFAULTS)}).")
  if norm_type is not None and norm_type != CLASSES[cls]:
    raise ValueError(f"{cls} needs norm_type={CLASSES[cls]!r}, got {norm_type!r}.")
  return CLASSES[cls]


def _check_fields(cfg: Mapping[str, Any], norm_type: str) -> list:
  """Names every unknown field and every unsupported value."""
  known = set(DEFAULTS[norm_type]) | set(FIXED) | {"norm_type"} | set(_DIT_ONLY_NONE)
  bad = [f"unknown field {k!r}" for k in sorted(cfg) if not k.startswith("_") and k not in known]
  for k, ok in FIXED.items():
    if ok is not None and k in cfg and cfg[k] not in ok:
      bad.append(f"{k}={cfg[k]!r} (supported: {', '.join(map(repr, ok))})")
  if norm_type == "ada_norm_zero":
    bad += [f"{k}={cfg[k]!r} (a DiT, ada_norm_zero, model takes none: supported: None)"
            for k in _DIT_ONLY_NONE if cfg.get(k) is not None and k != "interpolation_scale"]
  return bad


def _square(sample_size) -> int:
  if isinstance(sample_size, (list, tuple)):
    if len(set(sample_size)) != 1:
      raise ValueError(f"only square samples are supported, got sample_size={sample_size}.")
    sample_size = sample_size[0]
  return int(sample_size)


def dit_config_from_diffusers(cfg: Mapping[str, Any]) -> DiTConfig:
  """Translates a diffusers DiT / PixArt config.json into a DiTConfig.

  Raises ValueError naming every unknown field and unsupported value (and what is
  supported), e.g. PixArt's `use_additional_conditions` (1024px checkpoints).
  """
  norm_type = _class_norm_type(cfg)
  bad = _check_fields(cfg, norm_type)
  if bad:
    raise ValueError(f"unsupported diffusers {cfg.get('_class_name', LEGACY_CLASS)} config: "
                     + "; ".join(bad) + ".")
  c = {**DEFAULTS[norm_type], **{k: v for k, v in cfg.items() if not k.startswith("_")}}
  sample_size = _square(c["sample_size"])
  kwargs = {k: c[k] for k in ("patch_size", "in_channels", "out_channels", "num_layers",
                              "num_attention_heads", "attention_head_dim",
                              "num_embeds_ada_norm", "activation_fn",
                              "norm_elementwise_affine")}
  if norm_type == "ada_norm_single":
    additional = c["use_additional_conditions"]
    if additional is None:   # diffusers' rule: on for the 1024px (sample_size 128) models
      additional = sample_size == 128
    scale = c["interpolation_scale"]
    kwargs.update(cross_attention_dim=c["cross_attention_dim"],
                  caption_channels=c["caption_channels"], use_additional_conditions=additional,
                  interpolation_scale=float(max(sample_size // 64, 1) if scale is None else scale))
  # DiTTransformer2DModel builds PatchEmbed with interpolation_scale 1 whatever the config.
  try:
    return DiTConfig(sample_size=sample_size, norm_type=norm_type,
                     norm_eps=float(c["norm_eps"]), **kwargs)
  except ValueError as e:
    raise ValueError(f"unsupported diffusers {cfg.get('_class_name', LEGACY_CLASS)} config: "
                     f"{e}") from None


def abstract_params(config: DiTConfig):
  """Shapes of the Flax DiT's params for `config`, without running init."""
  return jax.eval_shape(DiT(config).init, jax.random.key(0), *dummy_inputs(config))["params"]


def _key_map(key: str):
  return None if key in BUFFERS else "/".join(torch_weights.default_path(key))


def _check_buffers(state_dict: Mapping[str, Any], config: DiTConfig) -> None:
  if "pos_embed.pos_embed" not in state_dict:
    return
  got = np.asarray(state_dict["pos_embed.pos_embed"], np.float32).reshape(-1, config.inner_dim)
  want = sincos_pos_embed(config.inner_dim, config.grid_size, config.interpolation_scale)
  if got.shape != want.shape or not np.allclose(got, want, atol=1e-5):
    raise ValueError("the checkpoint's pos_embed.pos_embed is not the sin-cos table of this "
                     f"config (grid {config.grid_size}, interpolation_scale "
                     f"{config.interpolation_scale}); is config.json the one of these weights?")


def convert_dit_state_dict(state_dict: Mapping[str, Any], config: DiTConfig,
                           dtype=np.float32) -> Dict[str, Any]:
  """Maps a diffusers DiT / PixArt state dict onto the Flax params for `config`.

  Raises ValueError naming every missing key, unexpected key and shape mismatch.
  """
  _check_buffers(state_dict, config)
  return torch_weights.map_state_dict(
      state_dict, abstract_params(config), key_map=_key_map, dtype=dtype,
      what=f"the {config.norm_type} DiT config (is config.json the one saved with these weights?)")


def import_dit_diffusers(directory: str):
  """Loads a diffusers DiT / PixArt transformer directory. Returns (module, params, config)."""
  cfg_path, weights = find_model(directory, SUBFOLDER, WEIGHTS_NAMES[:2] + (SHARD_INDEX,))
  config = dit_config_from_diffusers(read_config(cfg_path))
  params = convert_dit_state_dict(load_weights(weights), config)
  return DiT(config), params, config
