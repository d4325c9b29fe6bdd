"""Layers shared by models that want every product visible to the quantization injection."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class Einsum(nn.Module):
  """`jnp.einsum(equation, a, b)` of two activations (e.g. attention's q k^T and
  softmax(.) v) as a parameterless module, so `quant` can find and quantize it
  (QuantConfig.attention_matmuls). Float models compute exactly the einsum."""
  equation: str

  @nn.compact
  def __call__(self, a, b):
    return jnp.einsum(self.equation, a, b)


def batch_timesteps(t, batch: int) -> jnp.ndarray:
  """t as a [batch] array (a scalar is broadcast); ValueError for any other shape."""
  t = jnp.asarray(t)
  if t.ndim == 0:
    t = jnp.full((batch,), t)
  if t.shape != (batch,):
    raise ValueError(f"timesteps must be a scalar or have shape [{batch}], got {t.shape}.")
  return t
