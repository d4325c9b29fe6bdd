"""Class-conditional flow-matching DiTs end to end: the training launcher's DiT / flow /
label-dropout path, the exported checkpoint loading as a guided velocity model, the main job
on it with Euler and label accuracy, and factories declaring other flow conventions
(`flow.flow_model`); PTQ calibrates flow networks at their float timesteps."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs_loader import load_config
from tac_jax.app import pipeline, stages
from tac_jax.app import train as train_lib
from tac_jax.diffusion import flow, samplers
from tac_jax.metrics import frechet
from tac_jax.models import checkpoint as ckpt_lib
from tac_jax.models.dit import init_dit
from tac_jax.models.dit_config import DiTConfig

TINY_DIT = dict(sample_size=16, patch_size=4, in_channels=3, out_channels=3, num_layers=1,
                num_attention_heads=2, attention_head_dim=8, num_embeds_ada_norm=10)


def _train_config(**fields):
  c = load_config("dit_flow_model")
  c.model.update(TINY_DIT)
  c.data.num_color_seeds = 1
  c.update(dict(num_train_steps=10, log_every=5, checkpoint_every=10, batch_size=8,
                num_samples=10))
  for k, v in fields.items():
    node, *path = k.split("__")
    if path:
      c[node][path[0]] = v
    else:
      c[node] = v
  return c


@pytest.fixture(scope="module")
def dit_model(tmp_path_factory):
  """A tiny class-conditional flow DiT trained for 10 steps and exported."""
  root = tmp_path_factory.mktemp("dit_flow")
  out = train_lib.train(_train_config(guidance_scale=2.5), str(root / "work"),
                        export_dir=str(root / "model"))
  return str(root / "model"), out


def test_the_shipped_dit_samples_the_requested_digits_when_guided():
  """The shipped flow DiT (tac_jax/assets/dit_flow_model) loads by name, verified, guided at
  its recorded w = 3; its float Euler samples are mostly of the requested class (400 samples
  measured 94 %; 40 here), and unguided (w = 0) they are not."""
  accuracy = {}
  for w in (None, 0.0):
    model = stages.load_model("dit_flow", guidance_scale=w)
    assert model.meta["guidance_scale"] == 3.0 and model.prediction == "flow"
    sampler = flow.flow_euler(20, model.schedule.shift, model.schedule.num_train_timesteps)
    x_T = jax.random.normal(jax.random.key(7), (40,) + model.shape)
    x = samplers.sample(model.module.apply, model.variables, sampler, x_T,
                        jax.random.key(0))[0].x
    predicted = frechet.FeatureExtractor().classify(np.asarray(jnp.clip(x, -1, 1)))
    accuracy[w] = frechet.label_accuracy(predicted, model.requested_labels(40))
  assert accuracy[None] >= 0.8 and accuracy[0.0] < 0.4, accuracy


def test_the_exported_dit_loads_as_a_guided_velocity_model(dit_model):
  directory, out = dit_model
  with open(os.path.join(directory, "model.json")) as f:
    meta = json.load(f)
  assert (meta["architecture"], meta["objective"]) == ("dit", "flow")
  assert meta["flow"] == {"num_train_timesteps": 1000, "shift": 1.0} and "schedule" not in meta
  assert meta["guidance_scale"] == 2.5 and meta["label_dropout"] == 0.1
  model = stages.load_model(directory)
  assert model.prediction == "flow" and model.labels == tuple(range(10))
  assert model.module.scale == 2.5
  np.testing.assert_array_equal(model.requested_labels(12), np.arange(12) % 10)
  # The guided apply is the CFG combination of the exported DiT's two calls.
  module, params, _ = ckpt_lib.load_model(directory)
  x = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
  t = jnp.full((3,), 512.5, jnp.float32)
  y = jnp.asarray([0, 1, 2])
  v_c = module.apply({"params": params}, x, t, y)
  v_u = module.apply({"params": params}, x, t, jnp.full((3,), 10))
  np.testing.assert_allclose(model.module.apply(model.variables, x, t), v_u + 2.5 * (v_c - v_u),
                             rtol=1e-5, atol=1e-5)
  # Another scale and a label subset from the job's fields.
  other = stages.load_model(directory, guidance_scale=0.0, labels=(3, 4))
  assert other.module.scale == 0.0 and other.labels == (3, 4)
  np.testing.assert_allclose(other.module.apply(other.variables, x, t), v_u, rtol=1e-5, atol=1e-5)


def test_the_sample_grid_has_one_column_per_class(dit_model):
  _, out = dit_model
  imgs, cols = train_lib.sample_grid(_train_config(), out)
  assert cols == 10 and imgs.shape == (10, 16, 16, 3)
  assert np.all(np.isfinite(imgs)) and float(jnp.max(jnp.abs(imgs))) <= 1.0


def test_label_dropout_replaces_the_expected_share():
  labels = jnp.zeros((20000,), jnp.int32)
  key = jax.random.key(0)
  assert not np.any(np.asarray(train_lib.drop_labels(labels, 10, 0.0, key)) == 10)
  share = float(np.mean(np.asarray(train_lib.drop_labels(labels, 10, 0.1, key)) == 10))
  assert abs(share - 0.1) < 0.01


def test_the_flow_loss_trains_with_dropped_labels():
  """make_loss is flow matching on (x0, labels): zero for the exact velocity of a toy model,
  and the null label appears in the calls at the dropout rate."""
  seen = []

  class Toy:
    def apply(self, variables, x, t, y):
      seen.append(y)
      return variables["params"] * x

  cfg = _train_config(label_dropout=0.5)
  cfg_model = train_lib.model_config(cfg)
  loss = train_lib.make_loss(cfg, Toy(), flow.flow_config(), cfg_model)
  x0 = jnp.zeros((4096, 2, 2, 3))
  # x0 = 0: x_s = s eps and v = eps, so a gain 1 / s would be exact; gain 0 leaves |eps|^2.
  value = float(loss(jnp.float32(0.0), x0, jnp.ones((4096,), jnp.int32), jax.random.key(1)))
  assert abs(value - 1.0) < 0.05
  assert abs(float(np.mean(np.asarray(seen[-1]) == 10)) - 0.5) < 0.05


@pytest.mark.parametrize("field,value,match", [
    ("architecture", "vit", r"config\.architecture must be one of \['dit', 'unet'\]"),
    ("objective", "v", r"config\.objective must be one of \['epsilon', 'flow'\]"),
    ("label_dropout", 1.0, r"config\.label_dropout must be a number in \[0, 1\)"),
    ("model__out_channels", 6, r"config\.model\.out_channels must be in_channels = 3"),
    ("model__num_embeds_ada_norm", 5, r"config\.model\.num_embeds_ada_norm must be the class "
                                      r"count of 'digits' or more"),
    ("data__name", "shapes", r"config\.data\.name must be a labelled data set"),
    ("flow__shift", -1.0, r"config\.flow: shift must be a finite number > 0"),
])
def test_bad_dit_training_fields_are_named(field, value, match, tmp_path):
  with pytest.raises(ValueError, match=match):
    train_lib.train(_train_config(**{field: value}), str(tmp_path / "w"))
  assert not os.listdir(tmp_path)


def test_a_workdir_of_another_objective_is_refused(dit_model, tmp_path):
  directory, _ = dit_model
  work = os.path.join(os.path.dirname(directory), "work")
  with pytest.raises(ValueError, match=r"config\.objective was 'flow' there, is 'epsilon' now"):
    train_lib.check_workdir(work, train_lib.model_config(_train_config()),
                            {"architecture": "dit", "objective": "epsilon"})


def test_the_main_job_runs_the_flow_dit_with_euler_and_label_accuracy(dit_model, tmp_path):
  directory, _ = dit_model
  q = load_config("quantize_dit")
  q.update(dict(checkpoint=directory, num_steps=3, num_calib=4, num_eval=4, settings="W8A8",
                methods="none,tcec", default_method="tcec", int_path=False,
                timing_repeats=0))
  q.safe.fd_resamples = 10
  res = pipeline.run(q, str(tmp_path / "out"), verbose=False)
  assert 0.0 <= res["label_accuracy_float"] <= 1.0
  by = {r["method"]: r for r in res["runs"]}
  for r in by.values():
    assert 0.0 <= r["label_accuracy"] <= 1.0 and np.isfinite(r["psnr_fake"]["mean"])
  # The quantized run is another run than float (PTQ did something) but close at W8A8.
  assert 20.0 < by["none"]["psnr_fake"]["mean"] < 80.0
  table = open(tmp_path / "out" / "results.md").read()
  assert "label acc." in table and "Float model's label accuracy" in table


@pytest.mark.parametrize("fields,match", [
    (dict(sampler="ddim"), r"trained by flow matching; use --config\.sampler=euler"),
    (dict(methods="none,stepbaq"), r"\['stepbaq'\] re-derive the sampler's steps from a DDPM"),
    (dict(sampler="heun", methods="none,stepbaq,tcec"), r"\['stepbaq'\] model each step"),
    (dict(shift=-1.0), r"config\.shift must be a number > 0"),
    (dict(spacing="leading"), r"the flow grid is set by config\.shift"),
    (dict(labels="3,x"), r"config\.labels: 'x' is not an integer"),
    (dict(guidance_scale=-1.0), r"guidance scale must be a finite number >= 0"),
])
def test_flow_job_fields_are_checked(fields, match, dit_model, tmp_path):
  directory, _ = dit_model
  q = load_config("quantize_dit")
  q.update(dict(checkpoint=directory, **fields))
  with pytest.raises(ValueError, match=match):
    pipeline.run(q, str(tmp_path / "out"), verbose=False)
  assert not (tmp_path / "out").exists()


def test_an_epsilon_model_refuses_the_flow_sampler(tmp_path):
  q = load_config("quick")
  q.sampler = "euler"
  q.methods = "none,tcec"
  with pytest.raises(ValueError, match=r"'euler' integrates a flow-matching velocity, but this "
                     r"model predicts noise"):
    pipeline.run(q, str(tmp_path / "out"), verbose=False)


# ----------------------------------------------------------------------------- conventions

def _velocity_net():
  """A random tiny unconditional 'velocity' network on float diffusers time t = s T."""
  cfg = DiTConfig(sample_size=8, patch_size=2, in_channels=2, num_layers=1,
                  num_attention_heads=2, attention_head_dim=4, num_embeds_ada_norm=1)
  module, params = init_dit(cfg, jax.random.key(3))
  return lambda v, x, t: module.apply(v, x, t, jnp.zeros((x.shape[0],), jnp.int32)), params


class _Net:
  """An object with a Flax-style apply, the shape factories hand over."""

  def __init__(self, fn):
    self.fn = fn

  def apply(self, variables, x, t, *args, **kw):
    return self.fn(variables, x, t)


@pytest.mark.parametrize("time_scale,noise_at,velocity", [
    (1.0, 0, "data_minus_noise"),      # torchcfm-style: time 0 = noise, v = x1 - x0
    (1.0, 1, "noise_minus_data"),      # diffusers' direction, time in [0, 1]
    (1000.0, 0, "noise_minus_data")])
def test_flow_conventions_adapt_to_the_samplers_time_and_sign(time_scale, noise_at, velocity):
  f, params = _velocity_net()
  T = 1000

  def theirs(v, x, tau):   # the same network in the declared convention
    s = tau / time_scale if noise_at == 1 else 1.0 - tau / time_scale
    out = f(v, x, s * T)
    return out if velocity == "noise_minus_data" else -out

  cfg, adapted = flow.flow_model({"type": "flow", "time_scale": time_scale, "noise_at": noise_at,
                                  "velocity": velocity}, _Net(theirs))
  assert cfg == flow.FlowConfig(1000, 1.0) and isinstance(adapted, flow.FlowConvention)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 2))
  t = jnp.asarray([1000.0, 250.0])
  np.testing.assert_allclose(adapted.apply({"params": params}, x, t), f({"params": params}, x, t),
                             rtol=1e-4, atol=1e-5)
  hash(adapted)   # a static argument of jitted code


def test_the_diffusers_convention_needs_no_adapter_and_bad_fields_are_named():
  net = _Net(None)
  assert flow.flow_model({"type": "flow", "shift": 3.0}, net) == (flow.FlowConfig(1000, 3.0), net)
  for bad, match in (({"noise_at": 2}, "noise_at must be 1"), ({"velocity": "v"}, "velocity must"),
                     ({"time_scale": 0}, "time_scale must be"), ({"sigma": 1}, "unknown fields")):
    with pytest.raises(ValueError, match=match):
      flow.flow_model({"type": "flow", **bad}, net)


def test_flow_calibration_batches_carry_the_float_timesteps():
  sampler = flow.flow_euler(5, shift=3.0)
  traj = jnp.zeros((6, 1, 2, 2, 1))
  got = [t for _, t in samplers.calibration_batches(traj, sampler)]
  assert all(isinstance(t, float) for t in got)
  np.testing.assert_allclose(got, flow.flow_sigmas(5, 3.0).timesteps, rtol=1e-6)
  assert [t for _, t in samplers.calibration_batches(traj, sampler.coeffs)] == [
      int(v) for v in np.asarray(sampler.coeffs.t)]


def test_label_accuracy_counts_matches():
  assert frechet.label_accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
  with pytest.raises(ValueError, match="3 predictions for 2"):
    frechet.label_accuracy([1, 2, 3], [1, 2])
