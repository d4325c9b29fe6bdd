"""A class-conditional flow-matching DiT written outside tac_jax, to check that the main job
takes a transformer it was not written for, without code changes (issues 24 and 25).

It follows other conventions than tac_jax's own DiT on purpose, those of torchcfm and the
flow-matching papers: time t in [0, 1] with NOISE at t = 0 and data at t = 1,
x_t = t x1 + (1 - t) x0 (x0 the noise), and the network predicts u = x1 - x0 (data minus
noise); its own layer names; flax's MultiHeadDotProductAttention (DenseGeneral
projections); the class embedding added to the time embedding, which modulates each block's
LayerNorms (no adaLN-Zero gates); label 10 is the null class (label dropout 0.1).

    python examples/third_party_dit.py --workdir=runs/third_party_dit       # trains (~8 min)
    python experiments/quantize.py --config=configs/quantize_dit.py --config.checkpoint= \
        --config.model=examples.third_party_dit:make --outdir=runs/third_party

The factory declares the conventions ({"type": "flow", "time_scale": 1, "noise_at": 0,
"velocity": "data_minus_noise"}) and wraps the network in `diffusion.ClassGuided` for
classifier-free guidance at w = 3 on all ten classes; the main job does the rest. `tiny` is
a random small one for tests. Trained weights are read from $THIRD_PARTY_DIT (default
runs/third_party_dit).
"""

import json
import os
import time

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tac_jax.diffusion import ClassGuided

NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES
SHAPE = (16, 16, 3)
DECLARATION = {"type": "flow", "num_train_timesteps": 1000, "shift": 1.0, "time_scale": 1.0,
               "noise_at": 0, "velocity": "data_minus_noise"}
GUIDANCE = 3.0
TINY = dict(patch=2, width=16, depth=1, heads=2)


def _modulate(h, c, name):
  """LayerNorm of h, scaled and shifted by a projection of the condition c."""
  shift, scale = jnp.split(nn.Dense(2 * h.shape[-1], kernel_init=nn.initializers.zeros,
                                    name=name)(nn.silu(c))[:, None], 2, axis=-1)
  return nn.LayerNorm(use_scale=False, use_bias=False)(h) * (1 + scale) + shift


class Block(nn.Module):
  heads: int

  @nn.compact
  def __call__(self, h, c):
    width = h.shape[-1]
    h = h + nn.MultiHeadDotProductAttention(self.heads, name="attn")(_modulate(h, c, "mod_attn"))
    y = nn.gelu(nn.Dense(4 * width, name="fc1")(_modulate(h, c, "mod_mlp")))
    return h + nn.Dense(width, name="fc2")(y)


class FlowDiT(nn.Module):
  """(x [B, H, W, C], t [B] in [0, 1], y int [B]) -> u = data - noise, x's shape."""
  patch: int = 4
  width: int = 64
  depth: int = 4
  heads: int = 4

  @nn.compact
  def __call__(self, x, t, y):
    b, hh, ww, ch = x.shape
    p, n = self.patch, (hh // self.patch) * (ww // self.patch)
    tok = x.reshape(b, hh // p, p, ww // p, p, ch).transpose(0, 1, 3, 2, 4, 5).reshape(b, n, -1)
    h = nn.Dense(self.width, name="embed")(tok)
    h = h + self.param("pos", nn.initializers.normal(0.02), (1, n, self.width))
    freqs = jnp.exp(jnp.linspace(0.0, jnp.log(500.0), 16))
    ang = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    c = nn.Dense(self.width, name="time_fc1")(jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], -1))
    c = nn.Dense(self.width, name="time_fc2")(nn.silu(c))
    c = c + nn.Embed(NUM_CLASSES + 1, self.width, name="classes")(y)
    for i in range(self.depth):
      h = Block(self.heads, name=f"block{i}")(h, c)
    out = nn.Dense(p * p * ch, kernel_init=nn.initializers.zeros, name="head")(
        _modulate(h, c, "mod_out"))
    out = out.reshape(b, hh // p, ww // p, p, p, ch).transpose(0, 1, 3, 2, 4, 5)
    return out.reshape(b, hh, ww, ch)


def _init(net, seed, shape):
  x = jnp.zeros((1,) + shape)
  return net.init(jax.random.key(seed), x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"]


def _factory(net, params, shape, meta=None):
  guided = ClassGuided(net, tuple(range(NUM_CLASSES)), NULL_LABEL, GUIDANCE)
  out = (guided, {"net": params}, dict(DECLARATION), shape)
  return out if meta is None else out + (meta,)


def tiny(seed: int = 0):
  """A random small one on 8x8x3 (tests); its zero-initialised head and modulations are
  drawn at random too, so that its output depends on x, t and y."""
  net = FlowDiT(**TINY)
  params = _init(net, seed, (8, 8, 3))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [0.2 * jax.random.normal(k, v.shape) if not v.any() and v.ndim == 2 else v
            for k, v in zip(keys, leaves)]
  return _factory(net, jax.tree.unflatten(tree, leaves), (8, 8, 3))


def make():
  """The trained one, from $THIRD_PARTY_DIT (default runs/third_party_dit)."""
  directory = os.environ.get("THIRD_PARTY_DIT", "runs/third_party_dit")
  path = os.path.join(directory, "params.msgpack")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: train it first with `python "
                            f"examples/third_party_dit.py --workdir={directory}`.")
  net = FlowDiT()
  with open(path, "rb") as f:
    params = flax.serialization.from_bytes(_init(net, 0, SHAPE), f.read())
  return _factory(net, params, SHAPE, {"data": {"name": "digits"}})   # FD, label accuracy


def train(workdir: str, steps: int = 5000, batch: int = 64, seed: int = 0):
  """Conditional flow matching in this file's conventions, label dropout 0.1, EMA 0.999."""
  from tac_jax.data import datasets   # pylint: disable=import-outside-toplevel
  images = np.concatenate([datasets.digits(16, seed=seed + k) for k in range(4)])
  labels = np.tile(datasets.digit_labels(), 4)
  net = FlowDiT()
  params = _init(net, seed, SHAPE)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
      optax.warmup_cosine_decay_schedule(0.0, 1e-3, 300, steps), weight_decay=1e-4))

  def loss_fn(p, x1, y, key):
    k0, kt, kd = jax.random.split(key, 3)
    x0 = jax.random.normal(k0, x1.shape)
    t = jax.random.uniform(kt, (x1.shape[0],))
    y = jnp.where(jax.random.uniform(kd, y.shape) < 0.1, NULL_LABEL, y)
    xt = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0
    return jnp.mean(jnp.square(net.apply({"params": p}, xt, t, y) - (x1 - x0)))

  @jax.jit
  def step(p, ema, o, x1, y, key):
    loss, g = jax.value_and_grad(loss_fn)(p, x1, y, key)
    upd, o = opt.update(g, o, p)
    p = optax.apply_updates(p, upd)
    return p, jax.tree.map(lambda e, v: 0.999 * e + 0.001 * v, ema, p), o, loss

  rng, key, t0 = np.random.default_rng(seed), jax.random.key(seed), time.time()
  ema, state = params, opt.init(params)
  for i in range(steps):
    idx = rng.integers(0, len(images), batch)
    params, ema, state, loss = step(params, ema, state, images[idx], labels[idx],
                                    jax.random.fold_in(key, i))
    if i % 500 == 0 or i == steps - 1:
      print(f"[{time.time() - t0:7.1f}s] step {i}: loss {float(loss):.4f}", flush=True)
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, "params.msgpack.tmp")
  with open(tmp, "wb") as f:
    f.write(flax.serialization.to_bytes(ema))
  os.replace(tmp, os.path.join(workdir, "params.msgpack"))   # never half-written
  with open(os.path.join(workdir, "train.json"), "w") as f:
    json.dump({"steps": steps, "batch": batch, "seed": seed, "seconds": time.time() - t0}, f)
  print(f"wrote {workdir}/params.msgpack")


if __name__ == "__main__":
  import argparse   # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="runs/third_party_dit")
  parser.add_argument("--steps", type=int, default=5000)
  args = parser.parse_args()
  train(args.workdir, args.steps)
