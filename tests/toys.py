"""Toy networks with known errors, shared by the compensation and propagation tests."""

import jax
import jax.numpy as jnp

from tac_jax.compensation import Net
from tac_jax.diffusion import schedules

C = 3
VARS = {"w": jnp.array([0.9, 1.1, 1.3]), "k": jnp.array([0.05, -0.08, 0.12]),
        "beta": jnp.array([0.02, -0.05, 0.03])}


def linear_eps(variables, x, t):
  """A toy 'network' with diagonal Jacobian: eps = g(t) w_c x."""
  g = 0.5 + 0.4 * jnp.cos(t.astype(jnp.float32) / 1000.0)
  return g.reshape((-1,) + (1,) * (x.ndim - 1)) * variables["w"] * x


def affine_error_eps(variables, x, t):
  """Its 'quantized' version: an error exactly affine per channel in the output."""
  tt = t.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1)) / 1000.0
  k = variables["k"] * (1.0 + tt)
  beta = variables["beta"] * (1.0 - 0.5 * tt)
  return (1.0 + k) * linear_eps(variables, x, t) + beta


LINEAR, AFFINE_Q = Net(linear_eps, VARS), Net(affine_error_eps, VARS)


def noise(seed, n=16, hw=4):
  return jax.random.normal(jax.random.key(seed), (n, hw, hw, C))


# Gaussian data x0 ~ N(0, SIGMA0^2) on a linear schedule: the optimal noise predictor is
# linear and known exactly (the field's and the safe fit's toys).
SCHED = schedules.make_schedule("linear", 1000)
SIGMA0 = 0.5


def gaussian_eps(v, x, t):
  """E[noise | x_t] for Gaussian data: sqrt(1 - abar) x / (abar s0^2 + 1 - abar)."""
  ab = jnp.asarray(SCHED.alphas_cumprod, jnp.float32)[t].reshape((-1, 1, 1, 1))
  return jnp.sqrt(1 - ab) * x / (ab * SIGMA0 ** 2 + 1 - ab)
