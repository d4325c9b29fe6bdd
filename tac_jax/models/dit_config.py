"""DiTConfig: the DiT / PixArt-alpha architecture description (diffusers' config names),
and its translation checks. The model is in `dit`, its blocks in `dit_blocks`."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from tac_jax import config_utils

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


