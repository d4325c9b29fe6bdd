"""Quantize the `nn.Dense` / `nn.DenseGeneral` / `nn.Conv` / `nn.ConvTranspose` layers of
an unmodified Flax Linen model (a DenseGeneral, e.g. attention's q/k/v/out projections, as
a Dense on its flattened contracted axes).

*What* to quantize is a `QuantConfig` (bits, granularity, observers, layer patterns);
*how* is a method interceptor (`flax.linen.intercept_methods`) that replaces the
`__call__` of each selected layer with a quantized version. The model's code is never
edited: its variables gain a `quant` collection, mirroring `params`, that holds per layer

    w        int8 weights (two 4-bit values per byte when w_bits <= 4)
    w_scale  [out] float32 per-output-channel weight scale (symmetric weights)
    w_sum    [out] int32 sum of integer weights (exact activation zero-point correction)
    a_scale  [G] float32 activation scale, one per timestep group
    a_zero   [G] int32 activation zero point

Weights are quantized once, when the `quant` collection is built. Two execution modes
share that state: `fake` (dequantize, float matmul/conv: the simulation) and `int`
(int8 x int8 -> int32 kernels, then rescale); they agree to float tolerance.
"""

from __future__ import annotations

from typing import Callable, Mapping, Tuple

import flax.linen as nn
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding
from jax import lax

from tac_jax.quant import core
from tac_jax.quant import groupwise
from tac_jax.quant import int_ops
from tac_jax.quant import observers
from tac_jax.quant.spec import (MODES, QUANT_COLLECTION, STATS_COLLECTION, LayerSpec, QuantConfig,
                                flat_input, has_kernel, is_quantizable, layer_path)

# ----------------------------------------------------------------------------- layer math

def _per_axis(value, n: int) -> Tuple[int, ...]:
  """A Flax int-or-sequence conv attribute (strides, dilation) as an n-tuple."""
  value = value or 1
  return (value,) * n if isinstance(value, int) else tuple(value)


def conv_padding(module: nn.Conv, spatial: Tuple[int, ...]) -> Tuple[Tuple[int, int], ...]:
  """Explicit (lo, hi) padding pairs for a Flax Conv on an input of spatial shape."""
  pad = module.padding
  ks = tuple(module.kernel_size)
  if isinstance(pad, str):
    if pad.upper() not in ("SAME", "VALID"):
      raise ValueError(f"quantized Conv supports SAME/VALID/explicit padding, got {pad!r}.")
    dil = _per_axis(module.kernel_dilation, len(ks))
    eff = tuple((k - 1) * d + 1 for k, d in zip(ks, dil))
    return tuple(lax.padtype_to_pads(spatial, eff, _per_axis(module.strides, len(ks)),
                                     pad.upper()))
  if isinstance(pad, int):
    return ((pad, pad),) * len(ks)
  return tuple((p, p) if isinstance(p, int) else tuple(p) for p in pad)


def _conv_geometry(module: nn.Conv, x):
  if x.ndim != 4:
    raise ValueError(f"quantized Conv supports NHWC inputs (rank 4), got shape {x.shape} "
                     f"at layer {layer_path(module)}.")
  if module.feature_group_count != 1 or (module.input_dilation not in (None, 1, (1, 1))):
    raise ValueError(f"layer {layer_path(module)}: grouped or input-dilated convs are not "
                     "supported by the quantized path; exclude it in QuantConfig.exclude.")
  return (_per_axis(module.strides, 2), conv_padding(module, x.shape[1:3]),
          _per_axis(module.kernel_dilation, 2))


def _transpose_geometry(module: nn.ConvTranspose, x):
  """(strides, padding, kernel dilation) of a Flax ConvTranspose, as it passes them to
  `lax.conv_transpose`."""
  if x.ndim != 4:
    raise ValueError(f"quantized ConvTranspose supports NHWC inputs (rank 4), got shape "
                     f"{x.shape} at layer {layer_path(module)}.")
  if module.transpose_kernel or module.padding == "CIRCULAR":
    raise ValueError(f"layer {layer_path(module)}: ConvTranspose with transpose_kernel=True or "
                     "CIRCULAR padding is not supported by the quantized path; exclude it in "
                     "QuantConfig.exclude.")
  return (_per_axis(module.strides, 2), canonicalize_padding(module.padding, 2),
          _per_axis(module.kernel_dilation, 2))


def _activation_params(module, spec: LayerSpec, config: QuantConfig, x, group, part=None):
  if config.a_dynamic:
    return observers.minmax(x, spec.a_bits, None, spec.a_symmetric)
  scale = module.get_variable(QUANT_COLLECTION, "a_scale")[group]
  zero = module.get_variable(QUANT_COLLECTION, "a_zero")[group]
  if part is not None:   # a split layer: [G, 2] ranges
    scale, zero = scale[part], zero[part]
  return core.QuantParams(scale=scale, zero_point=zero, bits=spec.a_bits, axis=None,
                          symmetric=spec.a_symmetric)


def _integer_weights(module, spec: LayerSpec):
  w = module.get_variable(QUANT_COLLECTION, "w")
  return core.unpack_int4(w, spec.out_features) if spec.packed else w


def _quant_variable(module, name: str):
  return (module.get_variable(QUANT_COLLECTION, name)
          if module.has_variable(QUANT_COLLECTION, name) else None)


def _static_call(module, spec: LayerSpec, config: QuantConfig, mode: str, x, group):
  """Per-channel weights, per-tensor activations (static ranges, or dynamic min-max); a
  split layer is the sum of two products, one per input-channel part and its range."""
  wq = _integer_weights(module, spec)
  w_scale = module.get_variable(QUANT_COLLECTION, "w_scale")
  if not spec.split:
    a_qp = _activation_params(module, spec, config, x, group)
    w_sum = module.get_variable(QUANT_COLLECTION, "w_sum") if mode == "int" else None
    return _static_product(module, spec, mode, x, a_qp, wq, w_scale, w_sum)
  c, y = spec.split, 0.0
  for part, (xp, wp) in enumerate(((x[..., :c], wq[..., :c, :]), (x[..., c:], wq[..., c:, :]))):
    a_qp = _activation_params(module, spec, config, xp, group, part)
    y = y + _static_product(module, spec, mode, xp, a_qp, wp, w_scale, int_ops.weight_sums(wp))
  return y


def _static_product(module, spec: LayerSpec, mode: str, x, a_qp, wq, w_scale, w_sum):
  """x (activations quantized by a_qp) times the integer weights wq (per-channel scales)."""
  if spec.kind == "dense":
    if mode == "int":
      return int_ops.quantized_dense(x, a_qp, wq, w_scale, w_sum)
    return jnp.dot(core.fake_quant(x, a_qp), wq.astype(jnp.float32) * w_scale)
  if spec.kind == "conv_transpose":
    strides, padding, dil = _transpose_geometry(module, x)
    if mode == "int":
      return int_ops.quantized_conv_transpose(x, a_qp, wq, w_scale, strides, padding, dil)
    return int_ops.float_conv_transpose(core.fake_quant(x, a_qp), wq.astype(jnp.float32) * w_scale,
                                        strides, padding, dil)
  strides, padding, dil = _conv_geometry(module, x)
  if mode == "int":
    return int_ops.quantized_conv(x, a_qp, wq, w_scale, w_sum, strides, padding, dil)
  return int_ops.float_conv(core.fake_quant(x, a_qp), wq.astype(jnp.float32) * w_scale,
                            strides, padding, dil)


def _groupwise_call(module, spec: LayerSpec, mode: str, x):
  """Smoothing, group-wise 4/8-bit product and the low-rank float branch."""
  q = {"w": _integer_weights(module, spec), "w_scale": _quant_variable(module, "w_scale")}
  if spec.low_rank:
    q["lora_a"], q["lora_b"] = _quant_variable(module, "lora_a"), _quant_variable(module, "lora_b")
  smooth = _quant_variable(module, "smooth")
  if smooth is not None:
    x = x / smooth
  geometry = None
  if spec.kind == "conv":
    strides, padding, dil = _conv_geometry(module, x)
    geometry = {"kernel_size": tuple(module.kernel_size), "strides": strides,
                "padding": padding, "dilation": dil}
  tokens = groupwise.layer_tokens(spec.kind, x, geometry)
  return groupwise.groupwise_forward(tokens, q, spec.a_bits, spec.group_size, mode)


def quantized_matmul(module, spec: LayerSpec, mode: str, a, b):
  """An Einsum of two activations, both quantized at run time (symmetric, per tensor, a_bits);
  the int path is one s8 x s8 -> s32 einsum and a float rescale."""
  qa = observers.minmax(a, spec.a_bits, None, True)
  qb = observers.minmax(b, spec.a_bits, None, True)
  if mode == "int":
    acc = jnp.einsum(module.equation, core.quantize(a, qa), core.quantize(b, qb),
                     preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * jnp.reshape(qa.scale * qb.scale, ())
  return jnp.einsum(module.equation, core.fake_quant(a, qa), core.fake_quant(b, qb))


def quantized_call(module, spec: LayerSpec, config: QuantConfig, mode: str, x, group):
  """The quantized replacement of `module.__call__(x)` (a DenseGeneral runs as a Dense on
  its flattened contracted axes, its output reshaped to its features)."""
  x = flat_input(module, jnp.asarray(x, jnp.float32))
  if spec.group_size:
    y = _groupwise_call(module, spec, mode, x)
  else:
    y = _static_call(module, spec, config, mode, x, group)
  if module.use_bias:
    y = y + module.get_variable("params", "bias").reshape(y.shape[-1])
  correction = _quant_variable(module, "bias_corr")
  y = y if correction is None else y - correction
  return y.reshape(y.shape[:-1] + spec.features) if spec.features else y


# ----------------------------------------------------------------------------- interceptors

def quantizing_interceptor(specs: Mapping[str, LayerSpec], config: QuantConfig, mode: str,
                           group) -> Callable:
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}.")

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not is_quantizable(module):
      return next_fun(*args, **kwargs)
    spec = specs.get(layer_path(module))
    if spec is None:
      return next_fun(*args, **kwargs)
    if spec.kind == "matmul":
      return quantized_matmul(module, spec, mode, *args)
    return quantized_call(module, spec, config, mode, args[0], group)

  return intercept


def observing_interceptor(sample_size: int) -> Callable:
  """Records an evenly strided sample of every quantizable layer's input, the channel of
  each sampled value, and the per-channel min and max, via `sow`."""

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and has_kernel(module):
      x = flat_input(module, jnp.asarray(args[0], jnp.float32))
      x = x.reshape(-1, x.shape[-1])
      flat = x.ravel()
      # Always `sample_size` values (repeating when the tensor is smaller), so every
      # layer's statistics have one shape and the range fits compile once.
      idx = (jnp.arange(sample_size) * flat.shape[0]) // sample_size
      module.sow(STATS_COLLECTION, "x", (flat[idx], (idx % x.shape[-1]).astype(jnp.int32),
                                         jnp.min(x, axis=0), jnp.max(x, axis=0)))
    return next_fun(*args, **kwargs)

  return intercept


def error_interceptor(specs: Mapping[str, LayerSpec], config: QuantConfig, group) -> Callable:
  """Runs every quantized layer on the float model's own input next to the float layer
  and sows the mean output error per output channel; the float output flows on."""

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    y = next_fun(*args, **kwargs)
    if context.method_name != "__call__" or not has_kernel(module):
      return y
    spec = specs.get(layer_path(module))
    if spec is not None:
      err = quantized_call(module, spec, config, "fake", args[0], group) - y
      width = spec.out_features   # a DenseGeneral's features, flattened
      module.sow(STATS_COLLECTION, "err", jnp.mean(err.reshape(-1, width), axis=0))
    return y

  return intercept
