"""Bad input to the library gives one clear ValueError naming the argument, the field or the
file (issue 28): quantizer ranges, schedules, sampler step counts, diffusers scheduler
configs, and networks that do not accept the calibration call (or a factory's params); and
valid input still works (under jit too)."""

import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tac_jax import compensation, validate
from tac_jax.diffusion import flow, guidance, multistep, samplers, schedules
from tac_jax.models import convert, dit_factory
from tac_jax.quant import core, observers

SCHED = schedules.make_schedule()


class Toy(nn.Module):
  """eps = conv1x1(x): its kernel fixes the channel count (3)."""

  @nn.compact
  def __call__(self, x, t):
    return nn.Conv(3, (1, 1))(x) * (1.0 + 0.0 * t[:, None, None, None])


class CondToy(nn.Module):
  """A class-conditioned toy: eps = conv1x1(x) + embed(y)."""

  @nn.compact
  def __call__(self, x, t, y):
    return nn.Conv(3, (1, 1))(x) + nn.Embed(10, 3)(y)[:, None, None, :]


def _toy(module, *extra):
  x = jnp.zeros((1, 4, 4, 3))
  return module.init(jax.random.key(0), x, jnp.zeros((1,), jnp.int32), *extra)


# ----------------------------------------------------------------------------- 1. quant ranges

def test_params_from_range_refuses_reversed_or_nan_ranges():
  with pytest.raises(ValueError, match=r"params_from_range: lo must be <= hi, got lo=5 > hi=-5"):
    core.params_from_range(5.0, -5.0, 8)
  with pytest.raises(ValueError, match=r"lo/hi hold NaN"):
    core.params_from_range(float("nan"), 1.0, 8)
  with pytest.raises(ValueError, match=r"lo must be <= hi.* at index \(0, 1\)"):
    core.params_from_range(jnp.array([[-1.0, 2.0]]), jnp.array([[1.0, 1.0]]), 8, axis=1)
  with pytest.raises(ValueError, match=r"lo has shape \(3,\) and hi \(2,\)"):
    core.params_from_range(np.zeros(3), np.zeros(2), 8)


def test_params_from_range_still_works_eagerly_and_under_jit():
  qp = core.params_from_range(-1.0, 1.0, 8)
  np.testing.assert_allclose(qp.scale, 1 / 127, rtol=1e-6)
  traced = jax.jit(lambda lo, hi: core.params_from_range(lo, hi, 8, symmetric=False).scale)
  np.testing.assert_allclose(traced(-1.0, 3.0), 4 / 255, rtol=1e-6)
  x = jax.random.normal(jax.random.key(0), (4, 8))
  assert observers.minmax(x, 8, axis=1).scale.shape == (1, 8)
  assert observers.mse(x, 4).scale.shape == ()          # params_from_range traced in a jit


# ----------------------------------------------------------------------------- 2. schedules

@pytest.mark.parametrize("kwargs,match", [
    ({"num_timesteps": 2.5}, r"num_timesteps must be an integer >= 2.*got 2\.5"),
    ({"num_timesteps": True}, r"num_timesteps must be an integer >= 2"),
    ({"num_timesteps": 1}, r"num_timesteps must be an integer >= 2"),
    ({"beta_end": 0.9}, r"alphas_cumprod falls to .*beta_end=0\.9"),
    ({"beta_end": 2}, r"betas must lie in \(0, 1\).*beta_end=2"),
    ({"beta_start": float("nan")}, r"beta_start must be a finite number"),
    ({"beta_end": "0.02"}, r"beta_end must be a finite number"),
])
def test_make_schedule_names_the_bad_argument(kwargs, match):
  with pytest.raises(ValueError, match=match):
    schedules.make_schedule(**kwargs)


def test_valid_schedules_and_samplers_build():
  assert SCHED.num_timesteps == 1000 and SCHED.alphas_cumprod[-1] > schedules.MIN_ALPHAS_CUMPROD
  assert schedules.make_schedule("cosine", 1000).alphas_cumprod[-1] > 0
  assert samplers.ddim(SCHED, 20).coeffs.num_steps == 20
  assert samplers.ddpm(SCHED, np.int64(10)).coeffs.num_steps == 10
  assert samplers.make_sampler("ddim", SCHED, 1000).coeffs.num_steps == 1000
  assert multistep.dpm_solver_2m(SCHED, 10).coeffs.num_steps == 10
  assert flow.flow_euler(8).coeffs.num_steps == 8 and flow.flow_heun(4).coeffs.num_steps == 7
  assert np.all(np.isfinite(samplers.ddim(SCHED, 20).coeffs.a))


# ----------------------------------------------------------------------------- 3. num_steps

@pytest.mark.parametrize("build", [
    lambda n: samplers.ddim(SCHED, n), lambda n: samplers.ddpm(SCHED, n),
    lambda n: samplers.ddim_coeffs(SCHED, n), lambda n: samplers.make_sampler("ddpm", SCHED, n),
    lambda n: multistep.dpm_solver_2m(SCHED, n), lambda n: flow.flow_euler(n),
    lambda n: flow.flow_heun(n),
], ids=["ddim", "ddpm", "ddim_coeffs", "make_sampler", "dpm_solver_2m", "flow_euler",
        "flow_heun"])
def test_sampler_constructors_name_num_steps(build):
  for bad in (2.5, 0, True, "10"):
    with pytest.raises(ValueError, match=r"num_steps must be an integer >= 1"):
      build(bad)
  if build.__name__ == "<lambda>" and "flow" in build.__code__.co_names:
    assert build(1001).coeffs.num_steps >= 1001   # continuous flow time: as diffusers allows
    return
  with pytest.raises(ValueError, match=r"num_steps must be in \[1, 1000\]"):
    build(1001)


# ----------------------------------------------------------------------------- 4. diffusers configs

def _scheduler_dir(tmp_path, text, sub="scheduler"):
  d = tmp_path / "pipe"
  (d / sub).mkdir(parents=True, exist_ok=True)
  (d / "transformer").mkdir(exist_ok=True)
  (d / sub / "scheduler_config.json").write_text(text)
  return d


@pytest.mark.parametrize("reader", [convert.schedule_from_diffusers,
                                    dit_factory.diffusers_schedule], ids=["unet", "dit"])
def test_scheduler_config_errors_name_the_file(tmp_path, reader):
  d = _scheduler_dir(tmp_path, '{"beta_schedule": "linear", ')
  with pytest.raises(ValueError, match=r"corrupt diffusers scheduler config: .*scheduler_config"
                                       r"\.json is not valid JSON"):
    reader(str(d))
  cases = [({"beta_end": 0.9}, r"alphas_cumprod falls.*beta_end=0\.9"),
           ({"beta_end": 2}, r"betas must lie in \(0, 1\)"),
           ({"num_train_timesteps": 2.5}, r"num_train_timesteps must be an integer >= 2"),
           ({"beta_start": "1e-4"}, r"beta_start must be a finite number"),
           ({"beta_schedule": "sigmoid"}, r"beta_schedule 'sigmoid' is not supported"),
           ({"prediction_type": "v_prediction"}, r"only epsilon")]
  for fields, match in cases:
    d = _scheduler_dir(tmp_path, json.dumps({"beta_schedule": "linear", **fields}))
    path = str(d / "scheduler" / "scheduler_config.json")
    with pytest.raises(ValueError, match="scheduler_config.json at " + re.escape(path) + ": .*"
                       + match):
      reader(str(d / "transformer"))      # found in the pipeline's scheduler/ too


def test_valid_scheduler_configs_are_read_by_one_helper(tmp_path):
  d = _scheduler_dir(tmp_path, json.dumps({"beta_schedule": "squaredcos_cap_v2",
                                            "num_train_timesteps": 500}))
  want = {"name": "cosine", "num_timesteps": 500}
  assert convert.schedule_from_diffusers(str(d)) == want
  assert dit_factory.diffusers_schedule(str(d / "transformer")) == want
  assert dit_factory.diffusers_schedule(str(tmp_path / "none")) == dit_factory.DIT_SCHEDULE
  bad = tmp_path / "cfg.json"
  bad.write_text("{")
  with pytest.raises(ValueError, match=r"cfg\.json is not valid JSON"):
    convert.read_config(str(bad))


# ----------------------------------------------------------------------------- 5. model calls

def _nets(module, params, *, channels=3):
  net = compensation.Net(module.apply, params)
  return net, net, jax.random.normal(jax.random.key(1), (4, 4, 4, channels))


def test_calibration_refuses_noise_the_model_does_not_take():
  params = _toy(Toy())
  fp, q, x_T = _nets(Toy(), params, channels=4)
  with pytest.raises(ValueError, match=r"calibration: the float network fp: the model does not "
                                       r"accept inputs of shape \(4, 4, 4, 4\), \(4,\) "
                                       r"\(ScopeParamShapeError: .*x_T must be \[B, H, W, C\]"):
    compensation.calibrate(fp, q, samplers.ddim(SCHED, 2), x_T, jax.random.key(2), "tcec")
  other = _toy(Toy())
  other = jax.tree.map(lambda p: jnp.zeros(p.shape[:-1] + (5,)) if p.ndim == 4 else p, other)
  fp, _, x_T = _nets(Toy(), params)
  with pytest.raises(ValueError, match=r"the quantized network q: .*ScopeParamShapeError"):
    compensation.calibrate(fp, compensation.Net(Toy().apply, other), samplers.ddim(SCHED, 2),
                           x_T, jax.random.key(2), "none")


def test_conditioned_calibration_still_works_and_is_checked():
  """A guided net (conditions in its variables, one 2B call) passes the probe; a guided net
  given noise of the wrong channel count is refused by name."""
  module = CondToy()
  params = _toy(module, jnp.zeros((1,), jnp.int32))
  labels, null = jnp.arange(4, dtype=jnp.int32), jnp.full((1,), 9, jnp.int32)
  g = guidance.guided(module.apply, labels, null, 2.0)
  fp = compensation.Net(g.apply, g.bind(params))
  x_T = jax.random.normal(jax.random.key(3), (4, 4, 4, 3))
  cal = compensation.calibrate(fp, fp, samplers.ddim(SCHED, 2), x_T, jax.random.key(4), "tcec")
  assert cal.params.beta.shape[0] == 2
  with pytest.raises(ValueError, match=r"float network fp: the model does not accept inputs "
                                       r"of shape \(4, 4, 4, 5\)"):
    compensation.calibrate(fp, fp, samplers.ddim(SCHED, 2), jnp.zeros((4, 4, 4, 5)),
                           jax.random.key(4), "tcec")


def test_check_applies_turns_a_factory_mismatch_into_a_clear_error():
  """What a model factory's (module, params) check gets (app.stages.model_from_factory)."""
  module, params = Toy(), _toy(Toy())
  x, t = jnp.zeros((1, 4, 4, 3)), jnp.zeros((1,), jnp.int32)
  assert validate.check_applies(module.apply, params, (x, t), "model factory 'm:f'").shape == x.shape
  with pytest.raises(ValueError, match=r"model factory 'm:f': the model does not accept inputs "
                                       r"of shape \(1, 4, 4, 6\), \(1,\) \(ScopeParamShapeError: "
                                       r".*; check the image shape\.$"):
    validate.check_applies(module.apply, params, (jnp.zeros((1, 4, 4, 6)), t),
                           "model factory 'm:f'", "check the image shape")
  with pytest.raises(ValueError, match=r"\(TypeError: .*missing 1 required positional"):
    validate.check_applies(CondToy().apply, params, (x, t), "cond")
