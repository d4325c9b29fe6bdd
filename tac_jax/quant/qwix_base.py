"""Base PTQ by Google's qwix (qwix==0.1.8, `pip install -e '.[qwix]'`) in place of
`ptq.quantize_model`, so the compensators run on a qwix-quantized Flax Linen model.

`quantize_with_qwix` picks layers as tac_jax does (`spec.select_layers`: include,
exclude, keep_8bit, attention_matmuls), gives each one a qwix `QuantizationRule`
(module_path: its escaped path) and builds qwix `PtqProvider` models. It adds what qwix
0.1.8 lacks (docs/qwix.md): convolutions whose weight and activation bits differ (qwix's
requires equal qtypes), int4 values widened to int8 containers for the integer path
(XLA:CPU cannot compile qwix's int4 products), and static activation ranges recorded
as min / max over the float model's calibration activations (qwix's QtProvider averages
per-batch maxima, which clips, and cannot run W4A8 convolutions).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Dict, Mapping, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from tac_jax.quant import groupwise
from tac_jax.quant.calibration_data import check_calibration
from tac_jax.quant.qwix_ops import QUANT_STATS, StatsRecorder, TacPtqProvider, is_aux, qwix
from tac_jax.quant.spec import (FLOAT_REASONS, MODES, LayerSpec, QuantConfig, list_layers,
                                select_layers, unsupported)

Params = Dict[str, Any]
INSTALL = "pip install -e '.[qwix]'"
# The qwix op each layer kind runs through.
OPS = {"dense": "dot_general", "conv": "conv_general_dilated", "matmul": "einsum"}
# Static ranges are reduced over these axes too (batch, and tokens of a [B, L, C] input):
# one range per tensor for the project's Dense and Conv inputs.
ACT_BATCH_AXES = (0, 1)
QWIX_REASONS = {
    "conv_transpose": "nn.ConvTranspose: the qwix adapter leaves it in float (untested in qwix)",
    "missed": "qwix intercepted no op that uses this layer's kernel (left in float)",
}
# QuantConfig fields qwix cannot express, with the value that it can.
_UNSUPPORTED = (("w_per_channel", True, "qwix quantizes weights per output channel only"),
                ("w_observer", "minmax", "qwix calibrates weights by absmax (= minmax here)"),
                ("time_groups", 1, "qwix has one activation scale per op, not per timestep"),
                ("smooth_alpha", 0.0, "qwix has no SmoothQuant migration"),
                ("low_rank", 0, "qwix PTQ has no low-rank float branch"),
                ("bias_correction", False, "qwix has no bias correction"),
                ("split_layers", r"^$", "qwix has one activation range per input"))


def _require_qwix() -> None:
  if qwix is None:
    raise ImportError(f"the qwix base PTQ needs Google's qwix: {INSTALL} "
                      "(or pip install qwix==0.1.8).")


def _qtype(bits: int, symmetric: bool) -> str:
  """qwix's name for `bits`: native int8 / int4, emulated int2..int7 (symmetric only)."""
  if bits not in (4, 8) and not symmetric:
    raise ValueError(f"qwix 0.1.8 quantizes asymmetric (min-max) values to int4 or int8 only, "
                     f"got {bits} bits; use a_bits 4 or 8, or a_symmetric=True for its "
                     "emulated int2..int7.")
  return f"int{bits}"


def check_config(config: QuantConfig) -> None:
  """ValueError naming each QuantConfig option qwix cannot express."""
  bad = [f"{name}={getattr(config, name)!r} ({why}; use {ok!r})"
         for name, ok, why in _UNSUPPORTED if getattr(config, name) != ok]
  if config.a_observer != "minmax" and not (config.a_dynamic or config.group_size):
    bad.append(f"a_observer={config.a_observer!r} (static ranges here are min-max; use "
               "'minmax')")
  if bad:
    raise ValueError("the qwix base PTQ cannot honour " + "; ".join(bad) + ".")


def _timesteps(t, batch: int) -> jax.Array:
  """A scalar or [B] timestep as the samplers pass it: [B] int32 or float32."""
  t = jnp.asarray(t)
  dtype = jnp.int32 if jnp.issubdtype(t.dtype, jnp.integer) else jnp.float32
  return jnp.broadcast_to(t.astype(dtype), (batch,))


def _args(x, t, cond) -> tuple:
  return ((x,) if t is None else (x, _timesteps(t, x.shape[0]))) + tuple(cond)


# ----------------------------------------------------------------------------- rules

def layer_specs(module: nn.Module, params: Params, example: tuple, config: QuantConfig
                ) -> Tuple[Dict[str, LayerSpec], Dict[str, str]]:
  """tac_jax's choice of layers (specs with out_features and group size filled in) and
  the reasons the others stay in float. `example` is (x, t, *cond)."""
  layers = list_layers(module, {"params": params}, *_args(example[0], example[1], example[2:]))
  chosen = select_layers(layers, config)
  reasons = {p: FLOAT_REASONS[unsupported(kind, config) or "config"]
             for p, kind in layers.items() if p not in chosen}
  flat = traverse_util.flatten_dict(params, sep="/")
  specs = {}
  for path, spec in chosen.items():
    if spec.kind == "conv_transpose":
      reasons[path] = QWIX_REASONS["conv_transpose"]
      continue
    kernel = flat.get(f"{path}/kernel")
    out = 0 if kernel is None else int(kernel.shape[-1])
    k = 0 if kernel is None else int(np.prod(kernel.shape[:-1]))
    group = 0
    if spec.kind == "dense" and config.group_size:   # qwix tiles need K % G == 0
      group = groupwise.fit_group(k, config.group_size)
      group = group if k % group == 0 else 0
    # qwix multiplies at most one asymmetric operand: a matmul's are symmetric.
    specs[path] = dataclasses.replace(spec, out_features=out, group_size=group,
                                      a_symmetric=spec.a_symmetric or spec.kind == "matmul")
  return specs, reasons


def _static(config: QuantConfig) -> bool:
  """Static activation scales (the group-wise path quantizes activations at run time)."""
  return not (config.a_dynamic or config.group_size)


def qwix_rules(specs: Mapping[str, LayerSpec], config: QuantConfig) -> tuple:
  """One qwix QuantizationRule per layer (module_path: the layer's path, escaped)."""
  _require_qwix()
  rules = []
  for path, s in sorted(specs.items()):
    w_bits = s.a_bits if s.kind == "matmul" else s.w_bits   # a matmul has no weight
    rules.append(qwix.QuantizationRule(
        module_path=re.escape(path), op_names=(OPS[s.kind],),
        weight_qtype=_qtype(w_bits, True), act_qtype=_qtype(s.a_bits, s.a_symmetric),
        tile_size=s.group_size or None, act_static_scale=_static(config),
        weight_calibration_method="absmax",
        act_calibration_method="absmax" if s.a_symmetric else "minmax",
        act_batch_axes=ACT_BATCH_AXES))
  return tuple(rules)


# ----------------------------------------------------------------------------- driver

def abstract_params(qmodule: nn.Module, example: tuple) -> Params:
  """The params a qwix PTQ module creates (shapes; WithAux where qwix quantizes)."""
  return jax.eval_shape(qmodule.init, jax.random.key(0),
                        *_args(example[0], example[1], example[2:]))["params"]


def empty_stats(abstract: Params) -> Params:
  """Zero 'quant_stats' for every static activation scale in `abstract` ('<op>_lhs_scale'
  and '<op>_rhs_scale' params), keyed as qwix.quantize_params reads them."""
  flat = traverse_util.flatten_dict(abstract, is_leaf=lambda k, v: is_aux(v))
  stats = {}
  for key, v in flat.items():
    if is_aux(v) and key[-1].endswith("_scale"):
      names = ("min", "max") if v.how.calibration_method == "minmax" else ("absmax",)
      stats[key[:-1] + (key[-1][:-len("_scale")],)] = {
          "count": np.zeros((), np.int32),
          **{f"sum_of_{n}": np.zeros(v.array.shape, v.array.dtype) for n in names}}
  return traverse_util.unflatten_dict(stats)


def record_stats(module: nn.Module, params: Params, calib: Sequence[tuple], rules: tuple,
                 stats: Params) -> Params:
  """`stats` (from `empty_stats`) widened to the ranges of the static rules' activations
  over the calibration batches, observed on the float model (one compiled step)."""
  recorder = qwix.quantize_model(module, StatsRecorder(rules))

  @jax.jit
  def step(params, stats, x, t, cond):
    variables = {"params": params, QUANT_STATS: stats}
    _, state = recorder.apply(variables, *_args(x, t, cond), mutable=[QUANT_STATS])
    return state[QUANT_STATS]

  for x, t, *cond in calib:
    stats = step(params, stats, x, t, tuple(cond))
  return jax.tree.map(np.asarray, stats)


def quantize_weights(abstract: Params, params: Params, stats: Params) -> Params:
  """qwix's quantized params: weights, and static scales from `stats`."""
  # Closed over: quantize_params checks the stats' counts in Python.
  return jax.jit(lambda p: qwix.quantize_params(p, abstract, stats))(params)


def quantize_with_qwix(module: nn.Module, params: Params, calib: Sequence[tuple],
                       config: QuantConfig, num_timesteps: int = 1000) -> "QwixQuantizedModel":
  """Post-training quantization of `module` by qwix (`module.apply(v, x, t, *cond)`).

  Args:
    module: a Flax Linen module; its nn.Dense / nn.DenseGeneral (dot_general) and nn.Conv
      layers are quantized by qwix (attention einsums when `config.attention_matmuls`).
    params: the float `params` collection.
    calib: (x, t) or (x, t, *cond) calibration batches (`calibration_data.check_calibration`).
      With static activations (the default: `a_dynamic=False`, `group_size=0`) they give
      each layer's range (min-max, or absmax if `a_symmetric`, over all batches, one per
      tensor, on the float model). With `a_dynamic=True` or `group_size` qwix quantizes
      activations at run time (per token / per sample) and the batches only pick layers.
    config: w_bits / a_bits (qwix int8 / int4, or its emulated int2..int7), keep_8bit,
      include / exclude, group_size (dot_general tiles), a_dynamic; `check_config` raises
      on options qwix has no counterpart for (observers other than minmax, time groups,
      SmoothQuant, low rank, bias correction, split ranges, per-tensor weights).
    num_timesteps: the diffusion T the calibration timesteps must lie in.
  Returns:
    A QwixQuantizedModel, used like `ptq.QuantizedModel`.
  """
  _require_qwix()
  check_config(config)
  calib = check_calibration(calib, num_timesteps)
  specs, reasons = layer_specs(module, params, calib[0], config)
  if not specs:
    raise ValueError("QuantConfig selects none of the model's layers; check include/exclude.")
  rules = qwix_rules(specs, config)
  qmodules = {mode: qwix.quantize_model(module, TacPtqProvider(rules, mode)) for mode in MODES}
  abstract = abstract_params(qmodules["int"], calib[0])
  stats = empty_stats(abstract)
  if stats:
    stats = record_stats(module, params, calib, rules, stats)
  qparams = quantize_weights(abstract, params, stats)
  quantized = _quantized_paths(qparams)
  reasons.update({p: QWIX_REASONS["missed"] for p in specs if p not in quantized
                  and specs[p].weighted})
  specs = {p: s for p, s in specs.items() if p in quantized or not s.weighted}
  return QwixQuantizedModel(module=module, variables={"params": qparams}, config=config,
                            num_timesteps=num_timesteps, specs=specs, rules=rules,
                            qwix_modules=qmodules, float_reasons=reasons)


def _quantized_paths(qparams: Params) -> Tuple[str, ...]:
  flat = traverse_util.flatten_dict(qparams, sep="/", is_leaf=lambda k, v: is_aux(v))
  return tuple(sorted(k[:-len("/kernel")] for k, v in flat.items()
                      if k.endswith("/kernel") and is_aux(v)))


def _nbytes(x) -> int:
  """Bytes of `x` at its dtype's width (int4: half a byte per value, the packed size)."""
  dt = jnp.dtype(x.dtype)
  bits = jnp.iinfo(dt).bits if jnp.issubdtype(dt, jnp.integer) else 8 * dt.itemsize
  return math.ceil(int(np.prod(jnp.shape(x))) * bits / 8)


@dataclasses.dataclass(frozen=True)
class QwixApply:
  """A qwix-quantized network as a pure `apply(variables, x, t, *cond)`: hashable and
  compared by value (its module, whose class qwix wraps once per quantized model, and
  mode), so jitted code that takes it as a static argument compiles once."""
  qmodule: nn.Module
  mode: str

  def __call__(self, variables, x, t=None, *cond):
    return self.qmodule.apply(variables, *_args(x, t, cond))


@functools.partial(jax.jit, static_argnums=0)
def _jitted_apply(fn: QwixApply, variables, x, t, cond):
  return fn(variables, x, t, *cond)


@dataclasses.dataclass(frozen=True, eq=False)
class QwixQuantizedModel:
  """A qwix-quantized model: the float `module`, `variables` {'params': qwix's quantized
  params (WithAux kernels holding QArrays, plus static activation scales)}, and the
  qwix-wrapped modules that run them (`qwix_modules[mode]`)."""
  module: nn.Module
  variables: Params
  config: QuantConfig
  num_timesteps: int
  specs: Mapping[str, LayerSpec]
  rules: tuple
  qwix_modules: Mapping[str, nn.Module]
  float_reasons: Mapping[str, str] = dataclasses.field(default_factory=dict)

  @property
  def qwix_layers(self) -> Tuple[str, ...]:
    """Paths of the layers whose kernel qwix quantized (read from `variables`)."""
    return _quantized_paths(self.variables["params"])

  def apply_fn(self, mode: str = "fake") -> QwixApply:
    """Pure `apply(variables, x, t, *cond)`: 'int' runs qwix's integer products (int8
    containers, int32 accumulation; qwix dequantizes first where tiles are < 128 wide),
    'fake' the same quantized weights and activations dequantized, in float."""
    if mode not in MODES:
      raise ValueError(f"unknown quantization mode {mode!r}; choose from {MODES}.")
    return QwixApply(self.qwix_modules[mode], mode)

  def __call__(self, x, t=None, *cond, mode: str = "fake"):
    return _jitted_apply(self.apply_fn(mode), self.variables, x, t, cond)

  @property
  def float_layers(self) -> Dict[str, str]:
    """Layers with a kernel that stay in float, and why."""
    flat = traverse_util.flatten_dict(self.variables["params"], sep="/",
                                      is_leaf=lambda k, v: is_aux(v))
    return {k[:-len("/kernel")]: self.float_reasons.get(k[:-len("/kernel")],
                                                        FLOAT_REASONS["type"])
            for k, v in flat.items() if k.endswith("/kernel") and not is_aux(v)}

  def memory_report(self, float_params: Params) -> Dict[str, int]:
    """Bytes of the float model vs this one, and of the quantized layers alone (sub-byte
    values counted packed; XLA:CPU holds a jnp.int4 array in one byte per value)."""
    flat_f = traverse_util.flatten_dict(float_params, sep="/")
    flat_q = traverse_util.flatten_dict(self.variables["params"], sep="/",
                                        is_leaf=lambda k, v: is_aux(v))
    layers = self.qwix_layers
    kernels = [flat_q[f"{p}/kernel"].array for p in layers]
    extra = [v for k, v in flat_q.items() if k.rpartition("/")[0] in layers
             and k.rpartition("/")[2] not in ("kernel", "bias")]
    return {
        "model_float32": sum(_nbytes(v) for v in flat_f.values()),
        "model_quantized": sum(_nbytes(v) for v in jax.tree.leaves(self.variables)),
        "layers_float32": sum(_nbytes(flat_f[f"{p}/kernel"]) for p in layers),
        "layers_int8": sum(int(np.prod(flat_f[f"{p}/kernel"].shape)) for p in layers),
        "layers_stored": sum(_nbytes(k.qvalue) for k in kernels),
        # weight scales / zero points, and static activation scales / zero points
        "layers_overhead": sum(_nbytes(a) for k in kernels for a in (k.scale, k.zero_point)
                               if a is not None) + sum(_nbytes(a) for v in extra
                                                       for a in jax.tree.leaves(v)),
        "low_rank_float32": 0,
    }
