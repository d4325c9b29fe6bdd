"""SVDQuant-class 4-bit layers: group-wise quantization, SmoothQuant migration and a
low-rank float branch, for Dense and Conv (a conv is a matmul over its im2col patches).

A layer y = x W + b becomes, with tokens X (rows of x, or conv patches) of K features,

    X' = X / s                        SmoothQuant: s_j = max|X_j|^alpha / max|W_j|^(1-alpha)
    W' = diag(s) W = L1 L2 + R        SVDQuant: rank-r SVD of W' in float, residual R
    y  = GQ(X') GQ(R) + (X' L1) L2 + b - c

where GQ quantizes symmetrically in groups of G consecutive features: weights per
(group, output channel), activations at run time per (token, group). The integer path
multiplies int8 containers group by group (`s8 x s8 -> s32`, the group a batch dimension
of one dot_general) and sums the int32 partial sums scaled by s_x[token, g] s_w[g, out]
in float. `c` is the optional bias correction (the layer's mean output error per output
channel on calibration data, given float inputs).

Features are padded with zeros to a multiple of G (exact: zero times anything is zero).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from tac_jax.quant import core

CONV_DIMS = ("NHWC", "HWIO", "NHWC")


def padded(n: int, group: int) -> int:
  return -(-n // group) * group


def fit_group(k: int, group: int) -> int:
  """The group size used for K features: the largest divisor of K in [G/2, G] (no
  padding), else G (K is padded with zeros to a multiple of G)."""
  for g in range(min(group, k), max(group // 2, 1) - 1, -1):
    if k % g == 0:
      return g
  return group


def pad_last(x: jax.Array, size: int) -> jax.Array:
  extra = size - x.shape[-1]
  return x if extra == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


# ----------------------------------------------------------------------------- tokens

def conv_patches(x: jax.Array, kernel_size: Sequence[int], strides, padding,
                 dilation) -> jax.Array:
  """NHWC input -> [B, H', W', kh * kw * C] patches, in the order of `conv_matrix`."""
  p = lax.conv_general_dilated_patches(
      x, tuple(kernel_size), tuple(strides), [tuple(q) for q in padding],
      rhs_dilation=tuple(dilation), dimension_numbers=CONV_DIMS)
  # JAX orders the patch features channel-major (C, kh, kw); reorder to (kh, kw, C) so a
  # group of consecutive features holds channels of one kernel tap.
  b, h, w, _ = p.shape
  kh, kw = kernel_size
  c = x.shape[-1]
  return p.reshape(b, h, w, c, kh, kw).transpose(0, 1, 2, 4, 5, 3).reshape(b, h, w, kh * kw * c)


def conv_matrix(kernel: jax.Array) -> jax.Array:
  """HWIO kernel -> [kh * kw * C_in, C_out] matrix (rows ordered (kh, kw, C_in))."""
  return kernel.reshape(-1, kernel.shape[-1])


def channel_of_row(kernel_shape: Sequence[int]) -> np.ndarray:
  """The input channel each row of `conv_matrix` (or of a Dense kernel) multiplies."""
  c = kernel_shape[-2]
  return np.tile(np.arange(c), int(np.prod(kernel_shape[:-2])) if len(kernel_shape) > 2 else 1)


# ----------------------------------------------------------------------------- calibration

def smooth_scales(act_absmax: jax.Array, kernel: jax.Array, alpha: float) -> jax.Array:
  """SmoothQuant's per-input-channel s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)."""
  w_absmax = jnp.max(jnp.abs(kernel.reshape(-1, kernel.shape[-2], kernel.shape[-1])), axis=(0, 2))
  a = jnp.maximum(act_absmax, 1e-5)
  w = jnp.maximum(w_absmax, 1e-5)
  return jnp.clip(a ** alpha / w ** (1.0 - alpha), 1e-4, 1e4)


def low_rank_split(w: jax.Array, rank: int) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """(L1 [K, r], L2 [r, N], R = w - L1 L2) from the top-r singular triplets of w [K, N]."""
  u, sv, vt = jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)
  l1 = u[:, :rank] * sv[:rank]
  l2 = vt[:rank]
  return l1, l2, w - l1 @ l2


def quantize_weight_groups(w: jax.Array, bits: int, group: int) -> Tuple[jax.Array, jax.Array]:
  """[K, N] -> (int8 [K', N], float16 scales [K'/G, N]): symmetric per (group of G rows,
  column)."""
  k, n = w.shape
  kp = padded(k, group)
  wg = jnp.pad(w, [(0, kp - k), (0, 0)]).reshape(kp // group, group, n)
  qmax = core.qrange(bits, True)[1]
  # Scales are stored in float16 (as SVDQuant): quantize with the rounded scale itself.
  scale = (jnp.maximum(jnp.max(jnp.abs(wg), axis=1), 1e-4) / qmax).astype(jnp.float16)
  q = jnp.clip(jnp.round(wg / scale.astype(jnp.float32)[:, None]), -qmax, qmax).astype(jnp.int8)
  return q.reshape(kp, n), scale


def quantize_tokens(x: jax.Array, bits: int, group: int) -> Tuple[jax.Array, jax.Array]:
  """[..., K] -> (int8 [..., K'/G, G], scales [..., K'/G, 1]): symmetric per (token, group),
  computed at run time."""
  kp = padded(x.shape[-1], group)
  xg = pad_last(x, kp).reshape(x.shape[:-1] + (kp // group, group))
  qmax = core.qrange(bits, True)[1]
  scale = jnp.maximum(jnp.max(jnp.abs(xg), axis=-1, keepdims=True), 1e-8) / qmax
  return jnp.clip(jnp.round(xg / scale), -qmax, qmax).astype(jnp.int8), scale


# ----------------------------------------------------------------------------- products

def group_dot_int(xq: jax.Array, x_scale: jax.Array, wq: jax.Array, w_scale: jax.Array):
  """sum_g s_x[t, g] s_w[g, n] (xq[t, g, :] . wq[g, :, n]), the dot products in int32."""
  lead = xq.shape[:-2]
  g, gs = xq.shape[-2:]
  xt = xq.reshape((-1, g, gs))
  acc = lax.dot_general(xt, wq.reshape(g, gs, -1), (((2,), (1,)), ((1,), (0,))),
                        preferred_element_type=jnp.int32)            # [g, T, N]
  y = jnp.einsum("gtn,tg,gn->tn", acc.astype(jnp.float32), x_scale.reshape(-1, g),
                 w_scale.astype(jnp.float32))
  return y.reshape(lead + (w_scale.shape[-1],))


def group_dot_fake(xq: jax.Array, x_scale: jax.Array, wq: jax.Array, w_scale: jax.Array):
  """The same product from dequantized operands in float (fake-quant simulation)."""
  g, gs = xq.shape[-2:]
  x = (xq.astype(jnp.float32) * x_scale).reshape(xq.shape[:-2] + (g * gs,))
  w = (wq.astype(jnp.float32).reshape(g, gs, -1)
       * w_scale.astype(jnp.float32)[:, None]).reshape(g * gs, -1)
  return x @ w


def layer_tokens(kind: str, x: jax.Array, geometry: Optional[Dict]) -> jax.Array:
  """The rows the layer multiplies: x itself (Dense) or the conv's patches."""
  if kind == "dense":
    return x
  return conv_patches(x, geometry["kernel_size"], geometry["strides"], geometry["padding"],
                      geometry["dilation"])


def groupwise_forward(tokens: jax.Array, q: Dict[str, jax.Array], a_bits: int, group: int,
                      mode: str) -> jax.Array:
  """GQ(X') GQ(R) + (X' L1) L2 for the layer's tokens (smoothing already applied)."""
  xq, xs = quantize_tokens(tokens, a_bits, group)
  dot = group_dot_int if mode == "int" else group_dot_fake
  y = dot(xq, xs, q["w"], q["w_scale"])
  if "lora_a" in q:
    y = y + (tokens @ q["lora_a"]) @ q["lora_b"]
  return y
