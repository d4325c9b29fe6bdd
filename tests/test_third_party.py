"""A class-conditional flow DiT written outside tac_jax (examples/third_party_dit.py: torchcfm's
conventions, noise at t = 0, velocity data - noise, flax attention) goes through the
factory path: its guidance, its time convention and PTQ + compensation on it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples import third_party_dit
from tac_jax import compensation as comp
from tac_jax import quant
from tac_jax.app import stages
from tac_jax.diffusion import ClassGuided, flow, samplers

SPEC = "examples.third_party_dit:tiny"


@pytest.fixture(scope="module")
def model():
  return stages.model_from_factory(SPEC)


def test_factory_declares_labels_guidance_and_flow(model):
  assert model.labels == tuple(range(10)) and model.guidance_scale == third_party_dit.GUIDANCE
  assert model.prediction == "flow" and isinstance(model.module, flow.FlowConvention)


def test_class_guided_is_one_batched_cfg_call():
  module, params, _, shape = third_party_dit.tiny()
  x = jax.random.normal(jax.random.key(0), (3,) + shape)
  t = jnp.full((3,), 0.4)
  raw = third_party_dit.FlowDiT(**third_party_dit.TINY)
  net = lambda y: raw.apply({"params": params["net"]}, x, t, jnp.asarray(y, jnp.int32))
  want = net([10] * 3) + 3.0 * (net([0, 1, 2]) - net([10] * 3))
  np.testing.assert_allclose(module.apply({"params": params}, x, t), want, atol=1e-5)
  with pytest.raises(ValueError, match="labels must be a non-empty tuple"):
    ClassGuided(raw, (), 10, 3.0)
  with pytest.raises(ValueError, match="guidance scale"):
    ClassGuided(raw, (1,), 10, -1.0)


def test_euler_on_the_declared_convention_is_torchcfm_euler(model):
  """tac_jax's Euler (noise at s = 1, velocity eps - x0) on the adapted model equals Euler
  written in the model's own convention: x <- x + dt u(x, t), t from 0 (noise) to 1."""
  steps = 6
  x_T = jax.random.normal(jax.random.key(1), (4,) + model.shape)
  sampler = flow.flow_euler(steps, 1.0, model.schedule.num_train_timesteps)
  state, _ = samplers.sample(model.module.apply, model.variables, sampler, x_T, jax.random.key(2))
  raw = model.module.module          # the ClassGuided network in its own convention
  x, ts = x_T, 1.0 - flow.flow_sigmas(steps).sigmas     # model time 0 -> 1
  for i in range(steps):
    u = raw.apply(model.variables, x, jnp.full((4,), ts[i]))
    x = x + (ts[i + 1] - ts[i]) * u
  np.testing.assert_allclose(state.x, x, atol=1e-4)


def test_ptq_and_compensation_run_on_it(model):
  """PTQ quantizes its Dense layers and flax attention's DenseGeneral projections (q, k, v
  [D] -> [H, Dh], out [H, Dh] -> [D]); tcec calibrates on the guided output and its
  correction lowers the error it was fitted on."""
  sampler = flow.flow_euler(4, 1.0, model.schedule.num_train_timesteps)
  x, key = jax.random.normal(jax.random.key(3), (8,) + model.shape), jax.random.key(4)
  fp = model.net
  _, traj = samplers.sample(fp.apply, fp.variables, sampler, x, key, return_trajectory=True)
  qm = quant.quantize_model(model.module, model.params,
                            samplers.calibration_batches(traj, sampler),
                            quant.QuantConfig(w_bits=4, a_bits=8), model.schedule.num_timesteps)
  attn = {f"net/block0/attn/{p}" for p in ("query", "key", "value", "out")}
  assert {"net/block0/fc1", "net/block0/fc2", "net/embed", "net/head"} | attn <= set(qm.specs)
  assert not attn & set(qm.float_layers)
  assert qm.specs["net/block0/attn/out"].in_axes == 2 and qm.specs["net/block0/attn/query"].features
  q = comp.Net(qm.apply_fn("fake"), qm.variables)
  ref, _ = samplers.sample(fp.apply, fp.variables, sampler, x, key)
  plain, _ = samplers.sample(q.apply, q.variables, sampler, x, key)
  cal = comp.calibrate(fp, q, sampler, x, key, method="tcec")
  fixed, _ = samplers.sample(q.apply, q.variables,
                             comp.online_sampler(cal.method, sampler, cal.params, q), x, key)
  err = lambda s: float(jnp.mean(jnp.square(s.x - ref.x)))
  assert err(fixed) < err(plain)


def with_meta():
  return third_party_dit.tiny() + ({"data": {"name": "digits"}},)


def with_bad_meta():
  return third_party_dit.tiny() + ("digits",)


def test_a_factory_may_say_what_it_was_trained_on():
  """A fifth element names the data set (FD vs data, label accuracy in the main job)."""
  m = stages.model_from_factory("test_third_party:with_meta")
  assert m.meta == {"data": {"name": "digits"}, "factory": "test_third_party:with_meta"}
  with pytest.raises(ValueError, match=r"\[, meta dict\]"):
    stages.model_from_factory("test_third_party:with_bad_meta")
