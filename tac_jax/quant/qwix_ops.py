"""qwix providers for `qwix_base`: the PTQ provider that runs tac_jax's qwix models, and
the recorder of their static activation ranges (qwix==0.1.8, an optional dependency:
`qwix` is None without it).

`TacPtqProvider` is qwix's `PtqProvider` with two changes: convolutions whose weight and
activation qtypes differ (qwix's own raises "conv_general_dilated requires same act_qtype
and weight_qtype", and `lax.conv_general_dilated` needs equal dtypes), and the products
of a mode: 'int', qwix's own dispatch (integer dot_general / conv with int32
accumulation when both operands are QArrays) on int4 values widened to int8 containers
(XLA:CPU rejects qwix's int4 products: "does not support custom element sizes"), or
'fake', both operands dequantized and multiplied in float.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Sequence, Tuple

import jax
import jax.numpy as jnp

try:
  import qwix
  from qwix._src.core import conv_general as qwix_conv
  from qwix._src.core import dot_general as qwix_dot
  from qwix._src.core import einsum as qwix_einsum
  from qwix._src.core import qarray as qwix_qarray
  from qwix._src.providers import ptq as qwix_ptq
  from qwix._src.utils import flax_util as qwix_flax
except ImportError:   # optional: qwix_base.quantize_with_qwix says how to install it
  qwix = None

QUANT_STATS = "quant_stats"
# Read at import: qwix patches the function's code while its interceptors are active.
_CONV_SIGNATURE = inspect.signature(jax.lax.conv_general_dilated)
# How each qwix calibration value is widened over axes and batches.
_REDUCE = {"min": (jnp.min, jnp.minimum), "max": (jnp.max, jnp.maximum),
           "absmax": (jnp.max, jnp.maximum)}


def is_aux(v) -> bool:
  """Whether `v` is a qwix PTQ param (a WithAux holding a QArray or a static scale)."""
  return qwix is not None and isinstance(v, qwix_ptq.WithAux)


def _widen(x):
  """A QArray held in a sub-byte dtype (int4, or emulated int2/int3) moved to int8: same
  integers, a container XLA's CPU and GPU backends can multiply."""
  if isinstance(x, qwix.QArray) and jnp.iinfo(x.qvalue.dtype).bits < 8:
    zp = None if x.zero_point is None else x.zero_point.astype(jnp.int8)
    return dataclasses.replace(x, qvalue=x.qvalue.astype(jnp.int8), zero_point=zp)
  return x


def _dequant(x):
  return qwix.dequantize(x) if isinstance(x, qwix.QArray) else x


def _binary(op: Callable, prepare: Callable, lead: int = 0) -> Callable:
  """`op` with its two array operands (after `lead` other arguments) prepared."""
  def run(*args, **kwargs):
    operands = tuple(prepare(a) for a in args[lead:lead + 2])
    return op(*args[:lead], *operands, *args[lead + 2:], **kwargs)
  return run


def _kernels(mode: str) -> Tuple[Callable, Callable, Callable]:
  """dot_general, einsum and conv on QArrays: qwix's own ('int') or dequantized ('fake')."""
  if mode == "int":
    return (_binary(qwix.dot_general, _widen), _binary(qwix.einsum, _widen, 1),
            _binary(qwix.conv_general_dilated, _widen))
  return (_binary(jax.lax.dot_general, _dequant), _binary(jnp.einsum, _dequant, 1),
          _binary(jax.lax.conv_general_dilated, _dequant))


_PtqBase = qwix.PtqProvider if qwix is not None else object
_ProviderBase = qwix.QuantizationProvider if qwix is not None else object


class TacPtqProvider(_PtqBase):
  """qwix's PtqProvider with the products of `mode` ('int': qwix's own dispatch on int8
  containers; 'fake': both operands dequantized, a float product) and convolutions whose
  weights and activations have different bits (qwix's own conv requires equal ones)."""

  def __init__(self, rules: Sequence[Any], mode: str):
    dot, einsum, conv = _kernels(mode)
    super().__init__(rules, _dot_general_fn=dot, _einsum_fn=einsum,
                     _conv_general_dilated_fn=conv)

  def conv_general_dilated(self, lhs, rhs, *args, **kwargs):
    rule, _ = self._get_current_rule_and_op_id("conv_general_dilated", only_rule=True)
    if rule is None or rule.weight_qtype is None or rule.act_qtype == rule.weight_qtype:
      return super().conv_general_dilated(lhs, rhs, *args, **kwargs)
    # qwix's conv_general_dilated without its equal-qtype check.
    a = _conv_arguments(lhs, rhs, args, kwargs)
    rule, op_id = self._get_current_rule_and_op_id("conv_general_dilated")
    dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, a["dimension_numbers"])
    how = functools.partial(qwix_conv.get_how_to_quantize, dimension_numbers=dn)
    if isinstance(rhs, qwix_ptq.WithAux):
      rhs = rhs.array
    else:
      w_how = how(for_lhs=False, qtype=rule.weight_qtype,
                  calibration_method=rule.weight_calibration_method)
      rhs = qwix_ptq.create_quantized_param(qwix_flax.find_param(rhs), rhs, w_how).array
    a_how = how(for_lhs=True, qtype=rule.act_qtype,
                calibration_method=rule.act_calibration_method)
    lhs = qwix_ptq.quantize_act(lhs, a_how, rule, op_id + "_lhs")
    kw = {k: a[k] for k in ("lhs_dilation", "rhs_dilation", "feature_group_count",
                            "batch_group_count", "out_sharding")}
    return self._conv_general_dilated_fn(lhs, rhs, a["window_strides"], a["padding"],
                                         dimension_numbers=dn, **kw)


def _conv_arguments(lhs, rhs, args, kwargs) -> dict:
  """A `jax.lax.conv_general_dilated` call's arguments by name, defaults filled in."""
  bound = _CONV_SIGNATURE.bind(lhs, rhs, *args, **kwargs)
  bound.apply_defaults()
  return bound.arguments


class StatsRecorder(_ProviderBase):
  """Runs the float model and records, for each activation a static rule quantizes, its
  range over all calibration data (qwix's calibration reduced by max / min over
  `act_batch_axes` and batches), as the 'quant_stats' `qwix.quantize_params` reads.
  (qwix's QtProvider keeps a running mean of per-batch values instead, which clips.)"""

  def get_intercept_map(self):
    return super().get_intercept_map() | {
        "jax.lax.dot_general": self.dot_general,
        "jax.lax.conv_general_dilated": self.conv_general_dilated,
        "jax.numpy.einsum": self.einsum}

  def _rule(self, op: str):
    rule, op_id = self._get_current_rule_and_op_id(op)
    live = rule is not None and rule.weight_qtype is not None and rule.act_static_scale
    return (rule, op_id) if live else (None, op_id)

  def dot_general(self, lhs, rhs, dimension_numbers, *args, **kwargs):
    rule, op_id = self._rule("dot_general")
    if rule is not None:
      how = functools.partial(qwix_dot.get_how_to_quantize, dimension_numbers=dimension_numbers,
                              ndims=(lhs.ndim, rhs.ndim), tile_size=rule.tile_size)
      self._record(rule, op_id, lhs, rhs, how)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, *args, **kwargs)

  def einsum(self, equation, *operands, **kwargs):
    rule, op_id = self._rule("einsum")
    if rule is not None and len(operands) == 2:
      lhs, rhs = operands
      how = functools.partial(qwix_einsum.get_how_to_quantize, einsum_str=equation,
                              ndims=(lhs.ndim, rhs.ndim), tile_size=rule.tile_size)
      self._record(rule, op_id, lhs, rhs, how)
    return jnp.einsum(equation, *operands, **kwargs)

  def conv_general_dilated(self, lhs, rhs, *args, **kwargs):
    rule, op_id = self._rule("conv_general_dilated")
    if rule is not None:
      dn = _conv_arguments(lhs, rhs, args, kwargs)["dimension_numbers"]
      dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dn)
      how = functools.partial(qwix_conv.get_how_to_quantize, dimension_numbers=dn)
      self._record(rule, op_id, lhs, None, how)
    return jax.lax.conv_general_dilated(lhs, rhs, *args, **kwargs)

  @staticmethod
  def _record(rule, op_id: str, lhs, rhs, how: Callable) -> None:
    """Widens the recorded range of lhs, and of rhs when it is an activation."""
    sides = [("_lhs", lhs, True)]
    if rhs is not None and qwix_flax.find_param(rhs) is None:
      sides.append(("_rhs", rhs, False))
    for suffix, x, for_lhs in sides:
      cal = qwix_qarray.calibrate(x, how(for_lhs=for_lhs, qtype=rule.act_qtype,
                                         calibration_method=rule.act_calibration_method))
      # qwix's calibration has min <= 0 <= max, absmax >= 0: zero starts every range.
      cal = {k: _REDUCE[k][0](v, axis=tuple(rule.act_batch_axes), keepdims=True)
             for k, v in cal.items()}
      zeros = lambda: {"count": jnp.zeros((), jnp.int32),
                       **{f"sum_of_{k}": jnp.zeros_like(v) for k, v in cal.items()}}
      var = qwix_flax.get_or_create_variable(QUANT_STATS, op_id + suffix, zeros)
      # count 1: quantize_params reads sum / count, here the range itself.
      var.value = {"count": jnp.ones((), jnp.int32),
                   **{f"sum_of_{k}": _REDUCE[k][1](var.value[f"sum_of_{k}"], v)
                      for k, v in cal.items()}}
