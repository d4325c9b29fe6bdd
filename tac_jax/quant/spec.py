"""What to quantize: `QuantConfig` (bits, granularity, observers, layer patterns), one
`LayerSpec` per selected layer, and the choice of layers (which kinds are quantized, which
stay in float and why). `inject` applies them."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tac_jax import config_utils
from tac_jax.models.layers import Einsum
from tac_jax.quant import core, observers

MODES = ("fake", "int")
QUANT_COLLECTION = "quant"
STATS_COLLECTION = "act_stats"


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """What to quantize. Hashable, so it can be a static argument of jitted code."""
  w_bits: int = 8
  a_bits: int = 8
  w_per_channel: bool = True
  w_observer: str = "minmax"
  a_observer: str = "minmax"
  a_symmetric: bool = False
  a_dynamic: bool = False           # per-call min-max ranges instead of calibrated ones
  time_groups: int = 1              # timestep-grouped activation ranges (TDQ-style)
  include: str = r".*"              # regex on the layer path 'block/layer'
  exclude: str = r"^$"              # layers left in float
  keep_8bit: str = r"^$"            # layers kept at W8A8 (e.g. first / last / time MLP)
  percentile: float = 99.99
  sample_size: int = 4096           # activation values kept per layer and call
  # SVDQuant-class options (quant/groupwise.py). group_size > 0: weights symmetric per
  # (group of G input features, output channel), activations quantized at run time per
  # token in groups of G (static ranges and observers then apply to weights only).
  group_size: int = 0
  smooth_alpha: float = 0.0         # SmoothQuant migration strength (0 = off; needs groups)
  low_rank: int = 0                 # rank of the float branch L1 L2 (0 = off; needs groups)
  bias_correction: bool = False     # fold each layer's mean output error into its bias
  attention_matmuls: bool = False   # also quantize Einsum layers (q k^T, softmax v)
  # Layers whose input is a concatenation (Q-Diffusion's split shortcut): two static
  # activation ranges, for input channels [0, c) and [c, C), c chosen from calibration.
  split_layers: str = r"^$"

  def __post_init__(self):
    core.check_bits(self.w_bits)
    core.check_bits(self.a_bits)
    observers.get_observer(self.w_observer)
    observers.get_observer(self.a_observer)
    if self.time_groups < 1:
      raise ValueError(f"time_groups must be >= 1, got {self.time_groups}.")
    if self.group_size < 0 or self.low_rank < 0 or not 0.0 <= self.smooth_alpha <= 1.0:
      raise ValueError(f"group_size and low_rank must be >= 0 and smooth_alpha in [0, 1], got "
                       f"{self.group_size}, {self.low_rank}, {self.smooth_alpha}.")
    if (self.smooth_alpha or self.low_rank) and not self.group_size:
      raise ValueError("smooth_alpha and low_rank act on the group-wise path: set group_size "
                       "(e.g. 32) as well, or use the `svdquant` preset.")
    for name in ("include", "exclude", "keep_8bit", "split_layers"):
      try:
        re.compile(getattr(self, name))
      except re.error as e:
        raise ValueError(f"QuantConfig.{name} is not a valid regex: {e}") from None

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "QuantConfig":
    return config_utils.from_dict(cls, d)

  @property
  def name(self) -> str:
    return f"W{self.w_bits}A{self.a_bits}"


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """Static description of one quantized layer."""
  kind: str          # layer_kind: 'dense', 'conv', 'conv_transpose' or 'matmul'
  w_bits: int
  a_bits: int
  a_symmetric: bool
  out_features: int
  group_size: int = 0   # > 0: the group-wise path (quant/groupwise.py)
  split: int = 0        # > 0: input channels [0, split) and [split, C) have their own ranges
  low_rank: int = 0     # rank of the float branch on that path
  # nn.DenseGeneral: it contracts the input's last `in_axes` axes, and its output's last
  # axes are `features`; its kernel is quantized as the 2-D [prod(in), prod(features)].
  in_axes: int = 1
  features: Tuple[int, ...] = ()

  def __post_init__(self):   # a record read back from JSON holds a list
    object.__setattr__(self, "features", tuple(int(f) for f in self.features))

  @property
  def packed(self) -> bool:
    return self.w_bits <= 4

  @property
  def weighted(self) -> bool:
    """Whether the layer has a kernel (a matmul multiplies two activations)."""
    return self.kind != "matmul"


# ----------------------------------------------------------------------------- layer choice

FLOAT_REASONS = {
    "config": "excluded by QuantConfig.include / exclude",
    "group": "nn.ConvTranspose is quantized per channel only; group-wise presets leave it in float",
    "type": "not a Dense, Conv or ConvTranspose layer (left in float)",
    "matmul": "attention matmul, runs in float (QuantConfig.attention_matmuls=True quantizes it)",
    "transpose": ("nn.ConvTranspose with transpose_kernel=True or CIRCULAR padding has no "
                  "integer path (left in float)"),
    "dense_general": ("nn.DenseGeneral with batch_dims or contracted axes other than the "
                      "input's last ones has no quantized path (left in float)"),
}


def unsupported(kind: str, config: QuantConfig) -> Optional[str]:
  """The FLOAT_REASONS key of a layer kind `config` leaves in float, or None."""
  if kind == "matmul" and not config.attention_matmuls:
    return "matmul"
  if kind == "conv_transpose" and config.group_size:
    return "group"       # the group-wise path has no transposed conv
  if kind == "conv_transpose_unsupported":
    return "transpose"
  if kind == "dense_general_unsupported":
    return "dense_general"
  return None


def select_layers(layers: Mapping[str, str], config: QuantConfig) -> Dict[str, LayerSpec]:
  """LayerSpecs (empty out_features, filled later) for the layers the config selects."""
  inc, exc, keep8 = (re.compile(p) for p in (config.include, config.exclude, config.keep_8bit))
  chosen = {}
  for path, kind in layers.items():
    if not inc.search(path) or exc.search(path):
      continue
    if unsupported(kind, config):
      continue
    eight = bool(keep8.search(path))
    chosen[path] = LayerSpec(kind=kind, w_bits=8 if eight else config.w_bits,
                             a_bits=8 if eight else config.a_bits,
                             a_symmetric=config.a_symmetric, out_features=0,
                             group_size=0 if kind == "matmul" else config.group_size)
  return chosen


def layer_path(module: nn.Module) -> str:
  return "/".join(module.path)


# nn.DenseGeneral runs as a Dense on its flattened contracted axes (`general_axes`).
WEIGHTED = {nn.Dense: "dense", nn.DenseGeneral: "dense", nn.Conv: "conv",
            nn.ConvTranspose: "conv_transpose"}
LAYER_KINDS = {**WEIGHTED, Einsum: "matmul"}   # matmul: a product of two activations


def is_quantizable(module: nn.Module) -> bool:
  return type(module) in LAYER_KINDS


def has_kernel(module: nn.Module) -> bool:
  return type(module) in WEIGHTED


def layer_kind(module: nn.Module) -> str:
  """A quantizable layer's kind (LAYER_KINDS); a ConvTranspose our integer path cannot run
  (transposed kernel, circular padding) is 'conv_transpose_unsupported', left in float."""
  kind = LAYER_KINDS[type(module)]
  if kind == "conv_transpose" and (module.transpose_kernel or module.padding == "CIRCULAR"):
    return "conv_transpose_unsupported"
  return kind


def general_axes(module: nn.Module, ndim: int) -> Optional[int]:
  """How many trailing input axes an nn.DenseGeneral on a rank-`ndim` input contracts
  (None: batch_dims, or contracted axes that are not the last ones)."""
  axes = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
  axes = sorted(a % ndim for a in axes)
  if module.batch_dims or axes != list(range(ndim - len(axes), ndim)):
    return None
  return len(axes)


def flat_input(module: nn.Module, x):
  """A layer's input as its kernel's rows see it: a supported nn.DenseGeneral's contracted
  axes flattened into one (other layers: x itself)."""
  n = general_axes(module, x.ndim) if type(module) is nn.DenseGeneral else None
  if n is None:   # not a DenseGeneral, or one left in float
    return x
  return x.reshape(x.shape[:x.ndim - n] + (-1,))


def time_group(t, num_timesteps: int, groups: int) -> jax.Array:
  """Group index of (scalar) diffusion timestep t when [0, T) is split into equal bins."""
  t = jnp.reshape(jnp.asarray(t), (-1,))[0]
  return jnp.clip((t.astype(jnp.int32) * groups) // num_timesteps, 0, groups - 1)


def list_layers(module: nn.Module, variables, *args, general=None, **kwargs) -> Dict[str, str]:
  """Maps the path of every Dense/DenseGeneral/Conv/ConvTranspose layer a call touches to
  its kind; `general` (a dict) receives each supported DenseGeneral's (in_axes, features)."""
  found: Dict[str, str] = {}

  def intercept(next_fun, a, kw, context):
    m = context.module
    if context.method_name == "__call__" and is_quantizable(m):
      path, kind = layer_path(m), layer_kind(m)
      if type(m) is nn.DenseGeneral:
        n = general_axes(m, a[0].ndim)
        feats = m.features if isinstance(m.features, (tuple, list)) else (m.features,)
        kind = "dense" if n is not None else "dense_general_unsupported"
        if n is not None and general is not None:
          general[path] = (n, tuple(int(f) for f in feats))
      found[path] = kind
    return next_fun(*a, **kw)

  with nn.intercept_methods(intercept):
    jax.eval_shape(lambda v: module.apply(v, *args, **kwargs), variables)
  return found
