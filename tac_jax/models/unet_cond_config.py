"""UNetCondConfig: the architecture of a diffusers `UNet2DConditionModel` (SD 1.x / 2.x,
SDXL), with diffusers' config names, and its translation from a diffusers config.json.

The model is in `unet_cond`, its blocks in `unet_cond_blocks`. Heads follow diffusers'
naming quirk: a block's head *count* is `num_attention_heads or attention_head_dim` (SD 1.x's
`attention_head_dim: 8` means 8 heads; SD 2.x / SDXL give per-block tuples such as
(5, 10, 20, 20) or (5, 10, 20)), each head `channels // heads` wide.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from tac_jax import config_utils

CLASS_NAME = "UNet2DConditionModel"
DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)
TEXT_TIME = "text_time"
ADDITION_EMBED_TYPES = (None, TEXT_TIME)

PerBlock = Union[int, Tuple[int, ...]]

# diffusers options with the one value (or values) this port implements.
FIXED = {
    "center_input_sample": (False,), "only_cross_attention": (False,),
    "mid_block_scale_factor": (1,), "act_fn": ("silu",),
    "reverse_transformer_layers_per_block": (None,), "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,), "dual_cross_attention": (False,),
    "class_embed_type": (None,), "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",), "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,), "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,), "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
    "attention_type": ("default",), "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False), "cross_attention_norm": (None,),
    # diffusers' UNet2DConditionModel itself refuses num_attention_heads (its naming issue
    # 2011): heads come from attention_head_dim.
    "num_attention_heads": (None,),
}
# diffusers options that do not change the float32 inference computation.
IGNORED = ("dropout", "upcast_attention", "addition_embed_type_num_heads")


def _bad(field: str, value: Any, supported: str) -> ValueError:
  return ValueError(f"UNetCondConfig: {field}={value!r} is not supported (supported: {supported}).")


def _as_tuple(value):
  return tuple(value) if isinstance(value, (list, tuple)) else value


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _per_block(value, field: str, n: int) -> Tuple[int, ...]:
  values = (value,) * n if _is_int(value) else value
  if not isinstance(values, tuple) or len(values) != n or not all(
      _is_int(v) and v > 0 for v in values):
    raise _bad(field, value, f"a positive int or a tuple of {n} positive ints")
  return values


@dataclasses.dataclass(frozen=True)
class UNetCondConfig:
  """A UNet2DConditionModel. Defaults are diffusers' (SD 1.x), but `sample_size` (64).

  Per-block fields (`layers_per_block`, `attention_head_dim`, `num_attention_heads`,
  `transformer_layers_per_block`) take one int or one per down block; up blocks use them
  reversed, the mid block the last. `addition_embed_type` "text_time" (SDXL) adds the
  `add_embedding` of [text_embeds | sinusoid(time_ids) of addition_time_embed_dim each],
  projection_class_embeddings_input_dim wide. `mid_block_type` None: no mid block.
  """
  sample_size: int = 64
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: PerBlock = 2
  down_block_types: Tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                       "CrossAttnDownBlock2D", "DownBlock2D")
  up_block_types: Tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                     "CrossAttnUpBlock2D")
  mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn"
  cross_attention_dim: int = 1280
  attention_head_dim: PerBlock = 8
  num_attention_heads: Optional[PerBlock] = None
  transformer_layers_per_block: PerBlock = 1
  use_linear_projection: bool = False
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  downsample_padding: int = 1
  addition_embed_type: Optional[str] = None
  addition_time_embed_dim: Optional[int] = None
  projection_class_embeddings_input_dim: Optional[int] = None

  def __post_init__(self):
    for f in dataclasses.fields(self):
      object.__setattr__(self, f.name, _as_tuple(getattr(self, f.name)))
    n = len(self.block_out_channels)
    if n < 1 or not all(_is_int(c) and c > 0 for c in self.block_out_channels):
      raise _bad("block_out_channels", self.block_out_channels, "positive ints, one per block")
    for field, allowed in (("down_block_types", DOWN_BLOCK_TYPES),
                           ("up_block_types", UP_BLOCK_TYPES)):
      value = getattr(self, field)
      if len(value) != n or any(b not in allowed for b in value):
        raise _bad(field, value, f"{n} of {allowed}, as many as block_out_channels")
    self._check_choices()
    for field in ("layers_per_block", "attention_head_dim", "transformer_layers_per_block"):
      self.per_block(field)
    heads = self.heads
    for c, k in zip(self.block_out_channels, heads):
      if c % self.norm_num_groups:
        raise _bad("norm_num_groups", self.norm_num_groups,
                   f"a divisor of every block_out_channels {self.block_out_channels}")
      if not 1 <= k <= c:
        raise _bad("num_attention_heads" if self.num_attention_heads else "attention_head_dim",
                   heads,
                   f"head counts between 1 and each block's channels {self.block_out_channels}")
    if self.sample_size % self.upsample_factor:
      raise _bad("sample_size", self.sample_size, f"a multiple of {self.upsample_factor}")

  def _check_choices(self):
    if self.mid_block_type not in MID_BLOCK_TYPES:
      raise _bad("mid_block_type", self.mid_block_type, str(MID_BLOCK_TYPES))
    if self.downsample_padding not in (0, 1):
      raise _bad("downsample_padding", self.downsample_padding, "0 or 1")
    if self.addition_embed_type not in ADDITION_EMBED_TYPES:
      raise _bad("addition_embed_type", self.addition_embed_type, str(ADDITION_EMBED_TYPES))
    for field in ("sample_size", "in_channels", "out_channels", "norm_num_groups"):
      if not _is_int(getattr(self, field)) or getattr(self, field) < 1:
        raise _bad(field, getattr(self, field), "a positive int")
    if not _is_int(self.cross_attention_dim) or self.cross_attention_dim < 1:
      raise _bad("cross_attention_dim", self.cross_attention_dim, "one positive int")
    if self.text_time:
      for field in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        value = getattr(self, field)
        if not _is_int(value) or value < 1:
          raise _bad(field, value, f"a positive int with addition_embed_type {TEXT_TIME!r}")

  def per_block(self, field: str) -> Tuple[int, ...]:
    """The per-block field `field` as one positive int per down block."""
    return _per_block(getattr(self, field), field, len(self.block_out_channels))

  @property
  def heads(self) -> Tuple[int, ...]:
    """Head count per block: diffusers' `num_attention_heads or attention_head_dim`."""
    name = "num_attention_heads" if self.num_attention_heads else "attention_head_dim"
    return _per_block(self.num_attention_heads or self.attention_head_dim, name,
                      len(self.block_out_channels))

  @property
  def layers(self) -> Tuple[int, ...]:
    return self.per_block("layers_per_block")

  @property
  def transformer_layers(self) -> Tuple[int, ...]:
    return self.per_block("transformer_layers_per_block")

  @property
  def time_embed_dim(self) -> int:
    return 4 * self.block_out_channels[0]

  @property
  def text_time(self) -> bool:
    return self.addition_embed_type == TEXT_TIME

  @property
  def upsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "UNetCondConfig":
    return config_utils.from_dict(cls, d)

  def to_dict(self) -> Dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_diffusers(cls, cfg: Mapping[str, Any]) -> "UNetCondConfig":
    """Translates a diffusers UNet2DConditionModel config.json dict.

    Raises ValueError naming every unknown field and unsupported value, and what is
    supported.
    """
    bad = diffusers_problems(cfg)
    if bad:
      raise ValueError(f"unsupported diffusers {CLASS_NAME} config: " + "; ".join(bad) + ".")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in cfg.items() if k in fields}
    sample_size = kwargs.get("sample_size", cls.sample_size)
    if isinstance(sample_size, (list, tuple)) and len(set(sample_size)) == 1:
      kwargs["sample_size"] = sample_size[0]
    try:
      return cls(**kwargs)
    except ValueError as e:
      raise ValueError(f"unsupported diffusers {CLASS_NAME} config: {e}") from None


def diffusers_problems(cfg: Mapping[str, Any]) -> List[str]:
  """Every unknown field and unsupported value of a diffusers config dict (empty: fine)."""
  cls = cfg.get("_class_name", CLASS_NAME)
  if cls != CLASS_NAME:
    return [f"_class_name={cls!r} (supported: {CLASS_NAME!r})"]
  fields = {f.name for f in dataclasses.fields(UNetCondConfig)}
  known = fields | set(FIXED) | set(IGNORED) | {"time_embedding_dim"}
  bad = [f"unknown field {k!r}" for k in sorted(cfg) if not k.startswith("_") and k not in known]
  for k, ok in FIXED.items():
    if k in cfg and cfg[k] not in ok:
      bad.append(f"{k}={cfg[k]!r} (supported: {', '.join(map(repr, ok))})")
  channels = cfg.get("block_out_channels") or UNetCondConfig.block_out_channels
  if cfg.get("time_embedding_dim") not in (None, 4 * channels[0]):
    bad.append(f"time_embedding_dim={cfg['time_embedding_dim']!r} (supported: None or "
               f"4 * block_out_channels[0] = {4 * channels[0]})")
  sample_size = cfg.get("sample_size", UNetCondConfig.sample_size)
  if not _is_int(sample_size) and not (isinstance(sample_size, (list, tuple)) and sample_size
                                       and len(set(sample_size)) == 1):
    bad.append(f"sample_size={sample_size!r} (supported: an int or a square [S, S])")
  tl = cfg.get("transformer_layers_per_block", 1)
  if isinstance(tl, (list, tuple)) and any(isinstance(v, (list, tuple)) for v in tl):
    bad.append(f"transformer_layers_per_block={tl!r} (supported: an int or one int per block)")
  return bad
