"""Pure quantizers over an explicit `QuantParams` pytree.

Integers are signed and live in an int8 container for every bit width 2..8:

* symmetric:  q = clip(round(x / s), -(2^(b-1) - 1), 2^(b-1) - 1),   x ~ q * s
* asymmetric: q = clip(round(x / s) + z, -2^(b-1), 2^(b-1) - 1),     x ~ (q - z) * s

Granularity is given by `axis`: `None` for one scale per tensor, or the tuple of axes
that keep their own scale (per channel). Scales are stored with the tensor's rank
(size 1 on reduced axes) so they broadcast without reshapes.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from tac_jax.host import to_host
from tac_jax.validate import is_traced

MIN_BITS = 2
MAX_BITS = 8

Axis = Optional[Union[int, Sequence[int]]]


def check_bits(bits: int) -> int:
  if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool):
    raise ValueError(f"bits must be an int in {MIN_BITS}..{MAX_BITS}, got {bits!r}.")
  if not MIN_BITS <= int(bits) <= MAX_BITS:
    raise ValueError(
        f"bits={bits} is outside the supported range {MIN_BITS}..{MAX_BITS}; "
        "use 8 for INT8 or 4 for INT4 (values are stored in an int8 container).")
  return int(bits)


def normalize_axis(axis: Axis, ndim: int) -> Optional[Tuple[int, ...]]:
  """Returns sorted non-negative channel axes, or None for per-tensor."""
  if axis is None:
    return None
  axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
  out = []
  for a in axes:
    if not -ndim <= int(a) < ndim:
      raise ValueError(
          f"axis {a} is out of range for a tensor of rank {ndim}; "
          f"pass an axis in [{-ndim}, {ndim - 1}] or None for per-tensor.")
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"axis {axis} names the same axis twice.")
  return tuple(sorted(out))


def qrange(bits: int, symmetric: bool) -> Tuple[int, int]:
  """Integer range [qmin, qmax] for `bits` (restricted range when symmetric)."""
  bits = check_bits(bits)
  if symmetric:
    return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
  return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


@flax.struct.dataclass
class QuantParams:
  """Scale and zero point of a uniform quantizer (a pytree; bits etc. are static)."""
  scale: jax.Array
  zero_point: jax.Array
  bits: int = flax.struct.field(pytree_node=False, default=8)
  axis: Optional[Tuple[int, ...]] = flax.struct.field(pytree_node=False, default=None)
  symmetric: bool = flax.struct.field(pytree_node=False, default=True)

  def __post_init__(self):
    check_bits(self.bits)
    s = self.scale
    if not isinstance(s, jax.core.Tracer) and isinstance(s, (jax.Array, np.ndarray, float, int)):
      s = np.asarray(s)
      if s.size and not np.all(np.isfinite(s) & (s > 0)):
        raise ValueError(f"QuantParams.scale must be finite and > 0, got min {s.min()!r}; "
                         "build QuantParams with params_from_range or an observer.")

  @property
  def qmin(self) -> int:
    return qrange(self.bits, self.symmetric)[0]

  @property
  def qmax(self) -> int:
    return qrange(self.bits, self.symmetric)[1]


def reduce_axes(ndim: int, axis: Optional[Tuple[int, ...]]) -> Tuple[int, ...]:
  """Axes reduced over when computing statistics for `axis` granularity."""
  keep = () if axis is None else axis
  return tuple(a for a in range(ndim) if a not in keep)


def check_range(lo, hi) -> None:
  """Raises ValueError when a concrete range holds NaN or has lo > hi anywhere; traced
  values (under jit) are not checked, so the call is jit-safe."""
  if is_traced(lo) or is_traced(hi):
    return
  lo, hi = np.asarray(to_host(lo), np.float64), np.asarray(to_host(hi), np.float64)
  try:
    lo, hi = np.broadcast_arrays(lo, hi)
  except ValueError:
    raise ValueError(f"params_from_range: lo has shape {lo.shape} and hi {hi.shape}; pass "
                     "ranges of one shape (per channel: the tensor's rank).") from None
  if np.isnan(lo).any() or np.isnan(hi).any():
    raise ValueError(f"params_from_range: lo/hi hold NaN ({int(np.isnan(lo).sum())} value(s) in "
                     f"lo, {int(np.isnan(hi).sum())} in hi); compute the range from finite data.")
  bad = lo > hi
  if bad.any():
    i = int(np.argmax(bad.ravel()))
    index = tuple(int(j) for j in np.unravel_index(i, lo.shape))
    at = f" at index {index}" if index else ""
    raise ValueError(f"params_from_range: lo must be <= hi, got lo={lo.ravel()[i]:g} > "
                     f"hi={hi.ravel()[i]:g}{at} ({int(bad.sum())} of {bad.size}); pass the range "
                     "as (lo, hi) = (min, max) of the data.")


def params_from_range(lo: jax.Array, hi: jax.Array, bits: int, axis: Axis = None,
                      symmetric: bool = True, ndim: Optional[int] = None) -> QuantParams:
  """QuantParams that map [lo, hi] (widened to contain 0) onto the integer grid.

  `lo`/`hi` are per-tensor scalars or arrays with the tensor's rank (size 1 on reduced
  axes). Zero is always exactly representable, so zero padding stays exact. A concrete
  range with NaN or lo > hi is a ValueError (`check_range`; traced ranges are not checked).
  """
  bits = check_bits(bits)
  check_range(lo, hi)
  lo = jnp.minimum(jnp.asarray(lo, jnp.float32), 0.0)
  hi = jnp.maximum(jnp.asarray(hi, jnp.float32), 0.0)
  ndim = lo.ndim if ndim is None else ndim
  axis = normalize_axis(axis, ndim) if ndim else None
  qmin, qmax = qrange(bits, symmetric)
  tiny = jnp.float32(1e-8)
  if symmetric:
    scale = jnp.maximum(jnp.maximum(-lo, hi) / qmax, tiny)
    zero = jnp.zeros_like(scale, jnp.int32)
  else:
    scale = jnp.maximum((hi - lo) / (qmax - qmin), tiny)
    zero = jnp.clip(jnp.round(qmin - lo / scale), qmin, qmax).astype(jnp.int32)
  return QuantParams(scale=scale, zero_point=zero, bits=bits, axis=axis, symmetric=symmetric)


def check_params_match(x: jax.Array, qp: QuantParams) -> None:
  """Raises ValueError when the params cannot apply to `x` (static shapes only)."""
  scale_shape = tuple(jnp.shape(qp.scale))
  if qp.axis is None:
    if int(np.prod(scale_shape)) != 1:
      raise ValueError(
          f"per-tensor QuantParams must hold one scale, got scale shape {scale_shape}.")
    return
  if len(scale_shape) != x.ndim:
    raise ValueError(
        f"QuantParams for axis {qp.axis} have scale shape {scale_shape} (rank "
        f"{len(scale_shape)}) but the tensor has shape {tuple(x.shape)}; build the params "
        "from a tensor of the same rank.")
  for a in range(x.ndim):
    want = x.shape[a] if a in qp.axis else 1
    if scale_shape[a] != want:
      raise ValueError(
          f"QuantParams scale shape {scale_shape} does not match tensor shape "
          f"{tuple(x.shape)} on axis {a} (expected {want}); the params were fitted for "
          "a differently shaped tensor.")


def quantize(x: jax.Array, qp: QuantParams) -> jax.Array:
  """Float -> int8 container holding `qp.bits`-bit integers."""
  check_params_match(x, qp)
  q = jnp.round(x / qp.scale) + qp.zero_point
  return jnp.clip(q, qp.qmin, qp.qmax).astype(jnp.int8)


def dequantize(q: jax.Array, qp: QuantParams, dtype=jnp.float32) -> jax.Array:
  return ((q.astype(jnp.int32) - qp.zero_point).astype(dtype) * qp.scale).astype(dtype)


def clip_range(qp: QuantParams) -> Tuple[jax.Array, jax.Array]:
  """Float values that map to qmin and qmax."""
  return ((qp.qmin - qp.zero_point) * qp.scale, (qp.qmax - qp.zero_point) * qp.scale)


def fake_quant(x: jax.Array, qp: QuantParams) -> jax.Array:
  """dequantize(quantize(x)) with a straight-through gradient.

  The gradient is the identity where x lies inside the representable range and zero
  where it is clipped (the usual clipped STE).
  """
  lo, hi = clip_range(qp)
  x_clipped = jnp.clip(x, lo, hi)
  return x_clipped + jax.lax.stop_gradient(dequantize(quantize(x, qp), qp, x.dtype) - x_clipped)


# ----------------------------------------------------------------------------- int4 storage

def pack_int4(q: jax.Array) -> jax.Array:
  """Packs 4-bit integers (int8 container, values in [-8, 7]) two per byte.

  Packs along the last axis; an odd length is padded with one zero (pass the original
  length to `unpack_int4`).
  """
  q = jnp.asarray(q)
  if q.dtype != jnp.int8:
    raise ValueError(f"pack_int4 expects an int8 array, got {q.dtype}.")
  if not isinstance(q, jax.core.Tracer):
    lo_v, hi_v = int(jnp.min(q)) if q.size else 0, int(jnp.max(q)) if q.size else 0
    if lo_v < -8 or hi_v > 7:
      raise ValueError(f"pack_int4 holds signed 4-bit values in [-8, 7], got values in "
                       f"[{lo_v}, {hi_v}]; quantize with bits=4 first.")
  n = q.shape[-1]
  if n % 2:
    q = jnp.pad(q, [(0, 0)] * (q.ndim - 1) + [(0, 1)])
  lo = q[..., 0::2].astype(jnp.uint8) & jnp.uint8(0x0F)
  hi = q[..., 1::2].astype(jnp.uint8) << jnp.uint8(4)
  return (lo | hi).astype(jnp.int8)


def unpack_int4(packed: jax.Array, length: int) -> jax.Array:
  """Inverse of `pack_int4`: int8 array with `length` entries on the last axis."""
  if packed.dtype != jnp.int8:
    raise ValueError(f"unpack_int4 expects an int8 array, got {packed.dtype}.")
  if not 2 * packed.shape[-1] - 1 <= length <= 2 * packed.shape[-1]:
    raise ValueError(
        f"length {length} does not fit a packed last axis of {packed.shape[-1]} bytes.")
  lo = jnp.left_shift(packed, 4) >> 4  # arithmetic shift sign-extends
  hi = packed >> 4
  both = jnp.stack([lo, hi], axis=-1).reshape(packed.shape[:-1] + (2 * packed.shape[-1],))
  return both[..., :length]


def storage_bytes(x) -> int:
  return int(np.prod(jnp.shape(x))) * jnp.dtype(x.dtype).itemsize
