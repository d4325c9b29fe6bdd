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
