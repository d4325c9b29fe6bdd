"""Integer kernels: int8 x int8 -> int32 dot and convolution, then a float rescale.

`lax.dot_general` / `lax.conv_general_dilated` with int8 operands and
`preferred_element_type=jnp.int32` lower to s8 x s8 -> s32 HLO ops, which XLA maps to
int8 tensor-core / MXU kernels on GPU and TPU (and to plain integer loops on CPU).

Weights are symmetric per output channel (zero point 0). Activations may be asymmetric:
with x ~ (q_x - z) s_x the accumulator is corrected exactly,

    sum_i (q_x,i - z) q_w,i = sum_i q_x,i q_w,i - z sum_i q_w,i,

and convolutions pad the integer input with z (the integer image of float 0), so the
correction term is the same at the borders. Transposed convolutions insert zeros between
input pixels, where the correction differs per output pixel: it is z times the transposed
convolution of an all-ones image with the weights summed over input channels (exact in
float32 for any int8 layer of fewer than 2^17 taps).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from tac_jax.quant import core

DENSE_DIMS = (((1,), (0,)), ((), ()))  # [N, in] x [in, out]
CONV_DIMS = ("NHWC", "HWIO", "NHWC")


def int_dot(xq: jax.Array, wq: jax.Array) -> jax.Array:
  """[..., in] int8 x [in, out] int8 -> [..., out] int32."""
  if xq.dtype != jnp.int8 or wq.dtype != jnp.int8:
    raise ValueError(f"int_dot takes int8 operands, got {xq.dtype} and {wq.dtype}.")
  lead = xq.shape[:-1]
  out = lax.dot_general(xq.reshape(-1, xq.shape[-1]), wq, DENSE_DIMS,
                        preferred_element_type=jnp.int32)
  return out.reshape(lead + (wq.shape[-1],))


def int_conv(xq: jax.Array, wq: jax.Array, strides: Sequence[int],
             padding: Sequence[Tuple[int, int]], pad_value=0,
             rhs_dilation: Sequence[int] = (1, 1)) -> jax.Array:
  """NHWC int8 x HWIO int8 -> NHWC int32, padding the input with `pad_value`."""
  if xq.dtype != jnp.int8 or wq.dtype != jnp.int8:
    raise ValueError(f"int_conv takes int8 operands, got {xq.dtype} and {wq.dtype}.")
  if any(p != (0, 0) for p in padding):
    cfg = [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in padding] + [(0, 0, 0)]
    xq = lax.pad(xq, jnp.asarray(pad_value, jnp.int8), cfg)
  return lax.conv_general_dilated(
      xq, wq, window_strides=tuple(strides), padding="VALID",
      rhs_dilation=tuple(rhs_dilation), dimension_numbers=CONV_DIMS,
      preferred_element_type=jnp.int32)


def weight_sums(wq: jax.Array) -> jax.Array:
  """Per-output-channel sum of integer weights (for the activation zero point)."""
  return jnp.sum(wq.astype(jnp.int32), axis=tuple(range(wq.ndim - 1)))


def _zero_and_scale(a_qp: core.QuantParams):
  return jnp.reshape(a_qp.zero_point, ()), jnp.reshape(a_qp.scale, ())


def quantized_dense(x: jax.Array, a_qp: core.QuantParams, wq: jax.Array,
                    w_scale: jax.Array, w_sum: jax.Array, bias=None) -> jax.Array:
  """Dense layer on the integer path. a_qp per tensor; w_scale, w_sum: [out]."""
  z, s = _zero_and_scale(a_qp)
  acc = int_dot(core.quantize(x, a_qp), wq) - z * w_sum
  y = acc.astype(jnp.float32) * (s * w_scale)
  return y if bias is None else y + bias


def quantized_conv(x: jax.Array, a_qp: core.QuantParams, wq: jax.Array,
                   w_scale: jax.Array, w_sum: jax.Array, strides, padding,
                   rhs_dilation=(1, 1)) -> jax.Array:
  """2-D convolution (NHWC/HWIO) on the integer path (the layer adds its bias)."""
  z, s = _zero_and_scale(a_qp)
  acc = int_conv(core.quantize(x, a_qp), wq, strides, padding, pad_value=z,
                 rhs_dilation=rhs_dilation) - z * w_sum
  return acc.astype(jnp.float32) * (s * w_scale)


def float_conv(x, w, strides, padding, rhs_dilation=(1, 1)):
  return lax.conv_general_dilated(
      x, w, window_strides=tuple(strides), padding=[tuple(p) for p in padding],
      rhs_dilation=tuple(rhs_dilation), dimension_numbers=CONV_DIMS)


def quantized_conv_transpose(x: jax.Array, a_qp: core.QuantParams, wq: jax.Array,
                             w_scale: jax.Array, strides, padding, rhs_dilation=(1, 1),
                             bias=None) -> jax.Array:
  """2-D transposed convolution (NHWC/HWIO, Flax's `nn.ConvTranspose` with
  transpose_kernel=False) on the integer path: s8 x s8 -> s32, then the zero-point
  correction and the float rescale."""
  if wq.dtype != jnp.int8:
    raise ValueError(f"quantized_conv_transpose takes int8 weights, got {wq.dtype}.")
  z, s = _zero_and_scale(a_qp)
  acc = lax.conv_transpose(core.quantize(x, a_qp), wq, tuple(strides), padding,
                           rhs_dilation=tuple(rhs_dilation), dimension_numbers=CONV_DIMS,
                           preferred_element_type=jnp.int32)
  ones = jnp.ones(x.shape[:-1] + (1,), jnp.float32)
  taps = jnp.sum(wq.astype(jnp.float32), axis=2, keepdims=True)   # [kh, kw, 1, out]
  count = lax.conv_transpose(ones, taps, tuple(strides), padding,
                             rhs_dilation=tuple(rhs_dilation), dimension_numbers=CONV_DIMS)
  y = (acc.astype(jnp.float32) - z.astype(jnp.float32) * count) * (s * w_scale)
  return y if bias is None else y + bias


def float_conv_transpose(x, w, strides, padding, rhs_dilation=(1, 1)):
  return lax.conv_transpose(x, w, tuple(strides), padding, rhs_dilation=tuple(rhs_dilation),
                            dimension_numbers=CONV_DIMS)
