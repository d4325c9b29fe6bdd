"""Model parameterisations (v, x0), flow-matching samplers and DPM-Solver++(2M), each
checked step by step against diffusers' schedulers on toy analytic networks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tac_jax.diffusion import flow, multistep, prediction, samplers, schedules

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

W = (np.random.RandomState(0).randn(3, 3) / 2).astype(np.float32)
SHAPE = (2, 4, 4, 3)   # NHWC; the schedulers are elementwise, so torch uses it as is


def _nets(scale=1.0, offset=-0.5):
  """A fixed random channel map through tanh, in jnp (apply(variables, x, t) with t [B])
  and in torch (apply(x, t) with a scalar t), time-dependent through 1e-3 t."""
  w = jnp.asarray(W)

  def jnp_net(_, x, t):
    t = jnp.asarray(t, jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    return scale * jnp.tanh(x @ w + 1e-3 * t + offset)

  def torch_net(x, t):
    return scale * torch.tanh(x @ torch.tensor(W) + 1e-3 * torch.as_tensor(t, dtype=torch.float32)
                              + offset)

  return jnp_net, torch_net


def _x_T(seed=1):
  return jax.random.normal(jax.random.key(seed), SHAPE, jnp.float32)


def _ref_run(ref, torch_net, x_T, **step_kw):
  """diffusers' loop from x_T; every step's output, [N, ...]."""
  x, outs = torch.tensor(np.asarray(x_T)), []
  for t in ref.timesteps:
    x = ref.step(torch_net(x, t), t, x, **step_kw).prev_sample
    outs.append(x.numpy())
  return np.stack(outs)


def _our_run(apply_fn, sampler, x_T):
  """Every step's output of `samplers.sample` (one lax.scan) under jit, [N, ...]."""
  run = jax.jit(lambda x: samplers.sample(apply_fn, None, sampler, x, jax.random.key(0), True))
  state, traj = run(x_T)
  return np.asarray(samplers.step_outputs(traj, state.x))


def _close(got, want, rtol=1e-4):
  """Relative agreement at the scale of the reference trajectory."""
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(np.abs(want).max()))


# ----------------------------------------------------------------------------- prediction


def test_as_epsilon_inverts_v_and_x0_parameterisations():
  sched = schedules.make_schedule("cosine", 1000)
  x0, eps = _x_T(2), _x_T(3)
  t = jnp.array([10, 700])
  ab = jnp.asarray(sched.alphas_cumprod, jnp.float32)[t][:, None, None, None]
  x_t = jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * eps
  v = jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * x0
  for kind, out in (("epsilon", eps), ("v_prediction", v), ("sample", x0)):
    got = prediction.as_epsilon(lambda _, x, t, out=out: out, kind, sched)(None, x_t, t)
    np.testing.assert_allclose(got, eps, rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(prediction.x0_from_epsilon(eps, x_t, ab), x0, atol=1e-3)
  with pytest.raises(ValueError, match="unknown prediction_type 'x0'"):
    prediction.as_epsilon(lambda *a: a[1], "x0", sched)
  with pytest.raises(ValueError, match="flow models predict a velocity"):
    prediction.check_prediction_type("flow_prediction")
  with pytest.raises(TypeError, match="must be integers"):
    prediction.as_epsilon(lambda _, x, t: x, "sample", sched)(None, x_t, t.astype(jnp.float32))


@pytest.mark.parametrize("kind,clip", [("v_prediction", False), ("v_prediction", True),
                                       ("sample", False), ("sample", True)])
def test_ddim_over_v_and_x0_models_matches_diffusers(kind, clip):
  """DDIM (leading spacing, where diffusers' prev_t = t - T // N is the next timestep)
  over a v- or x0-network wrapped by as_epsilon equals DDIMScheduler(prediction_type)
  at every step; the x0 network's 1.5 tanh makes clip_sample bite."""
  sched = schedules.make_schedule("linear", 1000)
  jnp_net, torch_net = _nets(scale=1.5 if kind == "sample" else 1.0)
  ref = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                prediction_type=kind, clip_sample=clip, set_alpha_to_one=True,
                                steps_offset=0, timestep_spacing="leading")
  ref.set_timesteps(10)
  ours = samplers.ddim(sched, 10, spacing="leading", clip_sample=clip)
  np.testing.assert_array_equal(np.asarray(ours.coeffs.t), ref.timesteps.numpy())
  x_T = _x_T()
  want = _ref_run(ref, torch_net, x_T, eta=0.0)
  _close(_our_run(prediction.as_epsilon(jnp_net, kind, sched), ours, x_T), want)


def test_ddpm_over_a_v_model_matches_diffusers(monkeypatch):
  from diffusers.schedulers import scheduling_ddpm  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, **_: torch.zeros(shape))
  sched = schedules.make_schedule("linear", 1000)
  jnp_net, torch_net = _nets()
  ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                prediction_type="v_prediction", clip_sample=False,
                                timestep_spacing="leading")
  ref.set_timesteps(10)
  ours = samplers.ddpm(sched, 10, spacing="leading")
  eps_fn = prediction.as_epsilon(jnp_net, "v_prediction", sched)
  x_T = _x_T()
  want = _ref_run(ref, torch_net, x_T)
  state, got = ours.init(x_T, jax.random.key(0)), []
  for i in range(10):
    eps = eps_fn(None, state.x, samplers.batch_timestep(ours.coeffs.t[i], state.x))
    state = ours.step(state, eps, i, noise_scale=0.0)
    got.append(np.asarray(state.x))
  _close(np.stack(got), want)


# ----------------------------------------------------------------------------- flow


@pytest.mark.parametrize("shift", [1.0, 1.7, 3.0])
def test_flow_sigmas_match_diffusers(shift):
  for n in (1, 7, 20):
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(n)
    fs = flow.flow_sigmas(n, shift)
    np.testing.assert_allclose(fs.timesteps, ref.timesteps.numpy(), rtol=1e-6)
    np.testing.assert_allclose(fs.sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    assert fs.sigmas[0] == 1.0 and fs.sigmas[-1] == 0.0
  ref = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
  ref.set_timesteps(10, mu=0.8)
  fs = flow.flow_sigmas(10, mu=0.8)
  np.testing.assert_allclose(fs.sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_matches_diffusers(shift):
  ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
  ref.set_timesteps(12)
  ours = flow.flow_euler(12, shift=shift)
  c = ours.coeffs
  np.testing.assert_array_equal(c.a, 1.0)
  np.testing.assert_array_equal(c.sigma, 0.0)
  np.testing.assert_allclose(c.b, np.diff(ref.sigmas.numpy()), rtol=1e-6)
  np.testing.assert_array_equal(c.t, np.rint(ref.timesteps.numpy()).astype(np.int32))
  state = ours.init(_x_T(), jax.random.key(0))
  t_in = [samplers.network_input(ours, state, i)[1] for i in range(12)]
  assert all(t.dtype == jnp.float32 for t in t_in)
  np.testing.assert_allclose(np.stack(t_in), ref.timesteps.numpy(), rtol=1e-6)
  jnp_net, torch_net = _nets()
  x_T = _x_T()
  _close(_our_run(jnp_net, ours, x_T), _ref_run(ref, torch_net, x_T), rtol=1e-5)


def test_flow_heun_matches_diffusers():
  ref = diffusers.FlowMatchHeunDiscreteScheduler(shift=3.0)
  ref.set_timesteps(6)
  ours = flow.flow_heun(6, shift=3.0)
  assert ours.coeffs.num_steps == len(ref.timesteps) == 11
  jnp_net, torch_net = _nets()
  x_T = _x_T()
  _close(_our_run(jnp_net, ours, x_T), _ref_run(ref, torch_net, x_T), rtol=1e-5)


def test_flow_matching_loss():
  """Zero for the exact velocity of a one-point data set, v = (x_s - x0) / s; E||eps - x0||^2
  for a zero network; pure (same key, same loss), jit-able and differentiable."""
  x0 = jnp.full(SHAPE, 0.3)
  oracle = lambda _, x, t: (x - 0.3) / (t / 1000.0).reshape(-1, 1, 1, 1)
  key = jax.random.key(4)
  loss = jax.jit(flow.flow_matching_loss, static_argnums=0)
  assert float(loss(oracle, None, x0, key)) < 1e-8
  _, k_eps = jax.random.split(key)
  want = jnp.mean((jax.random.normal(k_eps, SHAPE) - x0) ** 2)
  np.testing.assert_allclose(loss(lambda _, x, t: 0 * x, None, x0, key), want, rtol=1e-6)
  linear = lambda p, x, t: p * x
  g = jax.grad(lambda p: flow.flow_matching_loss(linear, p, x0, key))(0.5)
  assert np.isfinite(float(g)) and float(g) != 0.0
  assert float(loss(oracle, None, x0, key)) == float(loss(oracle, None, x0, key))


# ----------------------------------------------------------------------------- DPM-Solver++


@pytest.mark.parametrize("num_steps,kind", [(10, "epsilon"), (20, "epsilon"),
                                            (10, "v_prediction")])
def test_dpm_solver_2m_matches_diffusers(num_steps, kind):
  sched = schedules.make_schedule("linear", 1000)
  ref = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                              prediction_type=kind)
  ref.set_timesteps(num_steps)
  ours = multistep.dpm_solver_2m(sched, num_steps)
  np.testing.assert_array_equal(np.asarray(ours.coeffs.t), ref.timesteps.numpy())
  jnp_net, torch_net = _nets()
  x_T = _x_T()
  want = _ref_run(ref, torch_net, x_T)
  _close(_our_run(prediction.as_epsilon(jnp_net, kind, sched), ours, x_T), want)


def test_dpm_solver_coefficients_and_spacings():
  """First and last steps are first order (c = d = 0) and equal DDIM's step between the
  same timesteps; leading / trailing timesteps equal diffusers'; 1 and 2 steps work."""
  sched = schedules.make_schedule("linear", 1000)
  c = multistep.dpm_solver_coeffs(sched, 10)
  assert c.c[0] == c.d[0] == c.c[-1] == c.d[-1] == 0.0 and np.all(np.asarray(c.d[1:-1]) < 0)
  ab = sched.alphas_cumprod[np.asarray(c.t)]
  for i, ab_prev in ((0, ab[1]), (9, 1.0)):
    a = np.sqrt(ab_prev / ab[i])
    b = np.sqrt(1 - ab_prev) - np.sqrt(ab_prev * (1 - ab[i]) / ab[i])
    np.testing.assert_allclose([c.a[i], c.b[i]], [a, b], rtol=1e-5, atol=1e-7)
  assert isinstance(c.step_coeffs, samplers.StepCoeffs) and c.num_steps == 10
  assert not c.stochastic
  for spacing, offset in (("leading", 0), ("leading", 1), ("trailing", 0)):
    ref = diffusers.DPMSolverMultistepScheduler(timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(20)
    np.testing.assert_array_equal(multistep.dpm_timesteps(1000, 20, spacing, offset),
                                  ref.timesteps.numpy())
  for n in (1, 2):
    s = multistep.dpm_solver_2m(sched, n)
    np.testing.assert_array_equal(s.coeffs.c, 0.0)
  # One step from pure noise lands on the x0 estimate.
  x, eps = _x_T(2), _x_T(3)
  s = multistep.dpm_solver_2m(sched, 1)
  want = prediction.x0_from_epsilon(eps, x, sched.alphas_cumprod[999])
  np.testing.assert_allclose(s.step(s.init(x, jax.random.key(0)), eps, 0).x, want, rtol=1e-4)


def test_multistep_step_keeps_the_sampler_contract():
  """step(state, eps, i) with a traced i and noise_scale; x_prev / eps_prev carried;
  linearise leaves it as it is (affine)."""
  sched = schedules.make_schedule("linear", 1000)
  s = multistep.dpm_solver_2m(sched, 5)
  x, eps0, eps1 = _x_T(2), _x_T(3), _x_T(4)
  st = s.init(x, jax.random.key(0))
  st1 = jax.jit(s.step)(st, eps0, jnp.int32(0))
  st2 = jax.jit(lambda st, e, i: s.step(st, e, i, noise_scale=0.5))(st1, eps1, jnp.int32(1))
  np.testing.assert_array_equal(st2.x_prev, st1.x)
  np.testing.assert_array_equal(st2.eps_prev, eps1)
  c = s.coeffs
  want = c.a[1] * st1.x + c.b[1] * eps1 + c.c[1] * eps0 + c.d[1] * x
  np.testing.assert_allclose(st2.x, want, rtol=1e-6, atol=1e-5)
  assert samplers.linearise(s, lambda _, x, t: x, None, x, jax.random.key(0)) is s


def test_bad_arguments_have_clear_errors():
  sched = schedules.make_schedule("linear", 1000)
  for bad in (0, -3, 2.5, True, "10"):
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
      flow.flow_euler(bad)
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
      multistep.dpm_solver_2m(sched, bad)
  for bad in (0.0, -1.0, float("nan"), float("inf")):
    with pytest.raises(ValueError, match="shift must be a finite number > 0"):
      flow.flow_euler(10, shift=bad)
  with pytest.raises(ValueError, match="replaces the static shift"):
    flow.flow_sigmas(10, shift=3.0, mu=0.5)
  with pytest.raises(ValueError, match="num_train_timesteps"):
    flow.flow_heun(10, num_train_timesteps=1)
  with pytest.raises(ValueError, match="unknown DPM-Solver spacing 'uniform'"):
    multistep.dpm_solver_2m(sched, 10, spacing="uniform")
  with pytest.raises(ValueError, match="distinct timesteps"):
    multistep.dpm_solver_2m(sched, 1000)
  with pytest.raises(ValueError, match="unknown prediction_type"):
    prediction.as_epsilon(lambda _, x, t: x, "velocity", sched)
  with pytest.raises(ValueError, match="deterministic"):
    noisy = multistep.dpm_solver_coeffs(sched, 4)
    multistep.multistep_sampler(noisy._replace(sigma=noisy.sigma + 0.1))
