"""Bring your own model: a Flax epsilon-prediction network that is not tac_jax's UNet,
run through the main job and the sweep by naming its factory:

    python experiments/quantize.py --config.model=examples.own_model:make --outdir=runs/own

A factory takes no arguments and returns (module, params, schedule, shape):
  module    a Flax module called as module.apply({"params": params}, x, t), x [B, H, W, C]
            float, t int32 [B] (one timestep per sample), returning the predicted noise
            with x's shape;
  params    its float params (here random; load yours with orbax or from PyTorch);
  schedule  the keyword arguments of tac_jax.diffusion.make_schedule it was trained with;
  shape     the image shape (H, W, C).
Its Dense, Conv and ConvTranspose layers are quantized; anything else stays in float (listed
with the reason). PyTorch weights: tac_jax.models.torch_weights.map_state_dict (README).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


class TinyEpsNet(nn.Module):
  """Two conv layers with a sinusoidal time embedding added in between."""
  channels: int = 16

  @nn.compact
  def __call__(self, x, t):
    half = 8
    freqs = jnp.exp(-jnp.log(10_000.0) * jnp.arange(half) / half)
    emb = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = nn.Dense(self.channels, name="time")(jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], -1))
    h = nn.silu(nn.Conv(self.channels, (3, 3), name="conv_in")(x))
    h = h + emb[:, None, None, :]
    h = nn.silu(nn.Conv(self.channels, (3, 3), name="mid")(h))
    return nn.Conv(x.shape[-1], (3, 3), name="conv_out")(h)


def make():
  shape = (8, 8, 1)
  module = TinyEpsNet()
  params = module.init(jax.random.key(0), jnp.zeros((1,) + shape),
                       jnp.zeros((1,), jnp.int32))["params"]
  return module, params, {"name": "linear", "num_timesteps": 1000}, shape
