"""Diffusion core: schedules, samplers, UNet, data and model checkpoints (training:
tests/test_training.py)."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tac_jax import data as data_lib
from tac_jax import files
from tac_jax.diffusion import samplers, schedules
from tac_jax.models import UNetConfig, init_unet, load_pretrained
from tac_jax.models import checkpoint as ckpt_lib

TINY = UNetConfig(sample_size=8, block_out_channels=(8, 16), attention_levels=(1,),
                  attention_head_dim=16, norm_num_groups=4)


@functools.lru_cache(maxsize=None)
def _init(cfg: UNetConfig):
  """init_unet once per config for the whole module (compiling init is the slow part)."""
  return init_unet(cfg, jax.random.key(0))


def test_ddim_step_matches_closed_formula():
  sched = schedules.make_schedule("linear", 1000)
  s = samplers.ddim(sched, 10)
  x = jax.random.normal(jax.random.key(0), (2, 4))
  eps = jax.random.normal(jax.random.key(1), (2, 4))
  ab = sched.alphas_cumprod
  for i in [0, 4, 9]:
    t = int(s.coeffs.t[i])
    ab_t, ab_prev = ab[t], (ab[int(s.coeffs.t[i + 1])] if i < 9 else 1.0)
    x0_hat = (x - np.sqrt(1 - ab_t) * eps) / np.sqrt(ab_t)
    want = np.sqrt(ab_prev) * x0_hat + np.sqrt(1 - ab_prev) * eps
    got = s.step(s.init(x, jax.random.key(2)), eps, i).x
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_ddpm_equals_ddim_with_eta_one(name):
  sched = schedules.make_schedule(name, 1000)
  c1, c2 = samplers.ddpm_coeffs(sched, 25), samplers.ddim_coeffs(sched, 25, eta=1.0)
  for a, b in zip(c1, c2):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _gaussian_oracle(sched, mu, std):
  ab = jnp.asarray(sched.alphas_cumprod, jnp.float32)

  def apply_fn(_, x, t):
    a = ab[t][:, None]
    return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu) / (a * std ** 2 + 1 - a)

  return apply_fn


@pytest.mark.parametrize("sampler_name", ["ddim", "ddpm"])
def test_exact_oracle_recovers_gaussian_data(sampler_name):
  sched = schedules.make_schedule("linear", 1000)
  mu, std = jnp.array([0.5, -0.3]), jnp.array([0.2, 0.6])
  # DDIM (an ODE solver) is accurate in 100 steps; ancestral DDPM needs the full chain.
  steps = 100 if sampler_name == "ddim" else 1000
  sampler = samplers.make_sampler(sampler_name, sched, steps)
  x_T = jax.random.normal(jax.random.key(0), (8192, 2))
  state, traj = jax.jit(lambda x: samplers.sample(_gaussian_oracle(sched, mu, std), None, sampler,
                                                  x, jax.random.key(1), True))(x_T)
  x0 = state.x
  assert traj.shape == (steps, 8192, 2)
  np.testing.assert_array_equal(traj[0], x_T)
  np.testing.assert_allclose(jnp.mean(x0, 0), mu, atol=0.03)
  np.testing.assert_allclose(jnp.std(x0, 0), std, rtol=0.06)


def test_shared_noise_makes_stochastic_runs_identical():
  sched = schedules.make_schedule("linear", 1000)
  sampler = samplers.ddpm(sched, 10)
  oracle = _gaussian_oracle(sched, jnp.zeros(2), jnp.ones(2))
  x_T = jax.random.normal(jax.random.key(0), (4, 2))
  a = samplers.sample(oracle, None, sampler, x_T, jax.random.key(5))[0].x
  b = samplers.sample(oracle, None, sampler, x_T, jax.random.key(5))[0].x
  c = samplers.sample(oracle, None, sampler, x_T, jax.random.key(6))[0].x
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_timestep_spacing():
  u = schedules.timestep_subsequence(1000, 10, "uniform")
  q = schedules.timestep_subsequence(1000, 10, "quadratic")
  assert u[0] == 999 and u[-1] == 0 and np.all(np.diff(u) < 0)
  assert np.all(np.diff(q) < 0) and q[-2] < u[-2]  # quadratic crowds steps near t = 0


@pytest.mark.parametrize("cfg", [
    TINY,
    UNetConfig(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8, 16),
               layers_per_block=2, attention_levels=(), norm_num_groups=4, mid_attention=False),
])
def test_unet_shapes_and_time_dependence(cfg):
  model, params = _init(cfg)
  x = jax.random.normal(jax.random.key(1), (2, cfg.sample_size, cfg.sample_size, cfg.in_channels))
  apply = jax.jit(model.apply)
  y1 = apply({"params": params}, x, jnp.array([10, 10]))
  y2 = apply({"params": params}, x, jnp.array([900, 900]))
  assert y1.shape == x.shape[:3] + (cfg.out_channels,)
  assert float(jnp.max(jnp.abs(y1 - y2))) > 1e-4


def test_unet_uses_diffusers_names():
  _, params = _init(TINY)
  assert set(params) >= {"conv_in", "time_embedding", "down_blocks_0", "down_blocks_1",
                         "mid_block", "up_blocks_0", "up_blocks_1", "conv_norm_out", "conv_out"}
  assert set(params["down_blocks_1"]["attentions_0"]) == {"group_norm", "to_q", "to_k", "to_v",
                                                         "to_out_0"}
  assert "downsamplers_0" in params["down_blocks_0"] and "upsamplers_0" in params["up_blocks_0"]


def test_bad_inputs_have_clear_errors():
  model, params = _init(TINY)
  with pytest.raises(ValueError, match="expects images of shape"):
    model.apply({"params": params}, jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,), jnp.int32))
  with pytest.raises(ValueError, match="unknown schedule"):
    schedules.make_schedule("sigmoid")
  sched = schedules.make_schedule("linear", 1000)
  with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 999\]"):
    sched.check_timesteps([1000])
  with pytest.raises(ValueError, match="num_steps"):
    samplers.ddim(sched, 2000)
  with pytest.raises(ValueError, match="unknown sampler"):
    samplers.make_sampler("euler", sched, 10)
  with pytest.raises(ValueError, match="divisible"):
    UNetConfig(block_out_channels=(10, 20), norm_num_groups=4)
  with pytest.raises(ValueError, match=r"unknown UNetConfig fields \['channels'\]"):
    UNetConfig.from_dict({"channels": 32})


def test_data_sets_are_deterministic_and_in_range():
  d1, d2 = data_lib.digits(size=16, seed=3), data_lib.digits(size=16, seed=3)
  np.testing.assert_array_equal(d1, d2)
  assert d1.shape == (1797, 16, 16, 3) and d1.min() >= -1 and d1.max() <= 1
  s = data_lib.shapes(num=16, size=16, seed=1)
  np.testing.assert_array_equal(s, data_lib.shapes(num=16, size=16, seed=1))
  assert s.shape == (16, 16, 16, 3) and s.min() >= -1 and s.max() <= 1


def test_missing_and_corrupt_checkpoints(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ckpt_lib.load_model(str(tmp_path / "nope"))
  _, params = _init(TINY)
  d = str(tmp_path / "m")
  ckpt_lib.save_model(d, params, {"model": TINY.to_dict()})
  record = files.read_json(os.path.join(d, "model.json"), "checkpoint")
  with open(os.path.join(d, "model.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    ckpt_lib.load_model(d)
  os.remove(os.path.join(d, "model.json"))
  with pytest.raises(FileNotFoundError, match="model.json is missing"):
    ckpt_lib.load_model(d)
  other = UNetConfig(sample_size=8, block_out_channels=(16, 16), attention_levels=(),
                     norm_num_groups=4)
  files.write_json_atomic(os.path.join(d, "model.json"), {**record, "model": other.to_dict()})
  with pytest.raises(ValueError, match="does not match its model config"):
    ckpt_lib.load_model(d)
  del record["checksums"]   # an edited record without checksums: refused unless opted in
  files.write_json_atomic(os.path.join(d, "model.json"), record)
  with pytest.raises(ValueError, match="holds no checksums.*TAC_JAX_ALLOW_UNVERIFIED=1"):
    ckpt_lib.load_model(d)


def test_shipped_models_load_by_name(tmp_path):
  module, params, meta = load_pretrained("default")
  assert ckpt_lib.pretrained_dir("default") == ckpt_lib.default_model_dir()
  assert UNetConfig.from_dict(meta["model"]) == module.config
  assert schedules.make_schedule(**meta["schedule"]).num_timesteps > 1
  assert set(params) >= {"conv_in", "time_embedding", "mid_block", "conv_out"}
  assert ckpt_lib.pretrained_dir(str(tmp_path)) == str(tmp_path)   # a directory as it is
  with pytest.raises(ValueError, match="no model 'nope'"):
    load_pretrained("nope")


def test_diffusers_spacings():
  from tac_jax.diffusion.schedules import timestep_subsequence
  np.testing.assert_array_equal(timestep_subsequence(1000, 20, "leading"), np.arange(950, -1, -50))
  np.testing.assert_array_equal(timestep_subsequence(1000, 20, "trailing"), np.arange(999, 0, -50))
  # A cosine schedule's first DDIM step from t = 999 divides by sqrt(abar) ~ 0; leading does not.
  sched = schedules.make_schedule("cosine", 1000)
  assert samplers.ddim(sched, 20).coeffs.a[0] > 50 * samplers.ddim(sched, 20, spacing="leading").coeffs.a[0]


def test_clip_sample_matches_diffusers_and_is_affine_where_inactive():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  sched = schedules.make_schedule("linear", 1000)
  ours = samplers.ddim(sched, 20, spacing="leading", clip_sample=True)
  ref = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                clip_sample=True, set_alpha_to_one=True, steps_offset=0,
                                timestep_spacing="leading")
  ref.set_timesteps(20)
  np.testing.assert_array_equal(np.asarray(ours.coeffs.t), ref.timesteps.numpy())
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3)) * 1.5
  eps = jax.random.normal(jax.random.key(1), (2, 4, 4, 3))
  state = ours.init(x, jax.random.key(2))
  for i in (0, 10, 19):   # an early step clips the x0 estimate hard, the last lands on x0
    t = int(ours.coeffs.t[i])
    want = ref.step(torch.tensor(np.asarray(eps)), t, torch.tensor(np.asarray(x)),
                    eta=0.0).prev_sample.numpy()
    np.testing.assert_allclose(ours.step(state, eps, i).x, want, rtol=1e-4, atol=1e-4)
  # Where |x0| <= 1 the clipped step is the affine one (what the error model uses).
  ab = float(sched.alphas_cumprod[int(ours.coeffs.t[5])])
  x_small = np.sqrt(ab) * 0.9 * jnp.tanh(x) + np.sqrt(1 - ab) * eps   # its x0 is in (-1, 1)
  for s in (samplers.ddim, samplers.ddpm):
    a = s(sched, 20, spacing="leading", clip_sample=True).step(state._replace(x=x_small), eps, 5)
    b = s(sched, 20, spacing="leading").step(state._replace(x=x_small), eps, 5)
    np.testing.assert_allclose(a.x, b.x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spacing,offset", [("linspace", 0), ("leading", 0), ("leading", 1),
                                            ("trailing", 0)])
def test_spacings_and_steps_match_diffusers(spacing, offset, monkeypatch):
  """Timesteps for 20 and 7 of 1000, and one DDPM step (noise zeroed on both sides) with
  each x0 rule, equal diffusers' DDPMScheduler; DDIM's timesteps equal DDIMScheduler's."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from diffusers.schedulers import scheduling_ddpm
  sched = schedules.make_schedule("linear", 1000)
  kw = dict(num_train_timesteps=1000, beta_schedule="linear", timestep_spacing=spacing,
            steps_offset=offset)
  for n in (20, 7):
    ddim_ref = diffusers.DDIMScheduler(**kw)
    ddim_ref.set_timesteps(n)
    ours = samplers.ddim(sched, n, spacing=spacing, steps_offset=offset)
    np.testing.assert_array_equal(np.asarray(ours.coeffs.t), ddim_ref.timesteps.numpy())
  monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, **_: torch.zeros(shape))
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1)) * 1.5
  eps = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  for rule in (dict(), dict(clip_sample=True), dict(thresholding=0.9, sample_max_value=1.3)):
    ref = diffusers.DDPMScheduler(**kw, clip_sample=rule.get("clip_sample", False),
                                  thresholding=rule.get("thresholding", 0) > 0,
                                  dynamic_thresholding_ratio=rule.get("thresholding", 0.995),
                                  sample_max_value=rule.get("sample_max_value", 1.0))
    ref.set_timesteps(20)
    ours = samplers.make_sampler("ddpm", sched, 20, spacing=spacing, steps_offset=offset, **rule)
    np.testing.assert_array_equal(np.asarray(ours.coeffs.t), ref.timesteps.numpy())
    state = ours.init(x, jax.random.key(2))
    for i in (0, 12, 19):
      t = int(ours.coeffs.t[i])
      want = ref.step(torch.tensor(np.asarray(eps)).permute(0, 3, 1, 2), t,
                      torch.tensor(np.asarray(x)).permute(0, 3, 1, 2)).prev_sample
      got = ours.step(state, eps, i, noise_scale=0.0).x
      np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-4)


def test_x0_bounds_keep_a_badly_scaled_model_bounded():
  """A model whose x0 estimate is off by 50x: plain DDIM from t = 999 explodes, clip_sample
  and dynamic thresholding keep the samples in [-1, 1] (the last step lands on the bounded
  x0)."""
  sched = schedules.make_schedule("cosine", 1000)
  bad = lambda v, x, t: 50.0 * x   # eps scaled so that x0 = (x - sqrt(1-ab) eps)/sqrt(ab) blows up
  x_T = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
  plain, _ = samplers.sample(bad, None, samplers.ddim(sched, 10), x_T, jax.random.key(1))
  dyn, _ = samplers.sample(bad, None, samplers.ddim(sched, 10, thresholding=0.99,
                                                    sample_max_value=2.0), x_T, jax.random.key(1))
  clip, _ = samplers.sample(bad, None, samplers.ddim(sched, 10, clip_sample=True), x_T,
                            jax.random.key(1))
  assert float(jnp.max(jnp.abs(plain.x))) > 100
  assert float(jnp.max(jnp.abs(dyn.x))) <= 1.0 + 1e-5   # clipped to [-s, s], then divided by s
  assert float(jnp.max(jnp.abs(clip.x))) <= 1.0 + 1e-5
  with pytest.raises(ValueError, match="dynamic_thresholding_ratio"):
    samplers.ddim(sched, 10, thresholding=1.5)
  with pytest.raises(ValueError, match="unknown sampler options"):
    samplers.make_sampler("ddim", sched, 10, clip_range=2.0)
  with pytest.raises(ValueError, match="steps_offset=60 puts the first"):
    samplers.ddim(sched, 20, spacing="leading", steps_offset=60)


def test_linearise_gives_the_clipped_steps_mean_derivatives():
  """Affine samplers come back as they are; a clipped DDIM step's a_i becomes a_i times the
  fraction of pixels whose x0 estimate is inside [-1, 1] (d x_prev / d x = 0 where clipped)."""
  sched = schedules.make_schedule("linear", 1000)
  eps_fn = lambda v, x, t: 0.5 * x     # x0 estimates well outside [-1, 1] early on
  x_T = jax.random.normal(jax.random.key(0), (4, 6, 6, 2))
  plain = samplers.ddim(sched, 10)
  assert samplers.linearise(plain, eps_fn, None, x_T, jax.random.key(1)) is plain
  clipped = samplers.ddim(sched, 10, clip_sample=True)
  lin = samplers.linearise(clipped, eps_fn, None, x_T, jax.random.key(1))
  _, traj = samplers.sample(eps_fn, None, clipped, x_T, jax.random.key(1), return_trajectory=True)
  ab = sched.alphas_cumprod[np.asarray(clipped.coeffs.t)]
  x0 = (1 - 0.5 * np.sqrt(1 - ab))[:, None, None, None, None] * np.asarray(traj) / np.sqrt(ab)[:, None, None, None, None]
  inside = np.mean(np.abs(x0) <= 1, axis=(1, 2, 3, 4))
  assert inside.min() < 0.5 and inside.max() == 1.0    # the clip is active on some steps only
  np.testing.assert_allclose(lin.coeffs.a, np.asarray(clipped.coeffs.a) * inside, rtol=1e-5)
  np.testing.assert_array_equal(lin.coeffs.t, clipped.coeffs.t)
