"""The quantized artifact: export -> load -> sample is bit-identical to the in-memory model,
stores no float kernel of a quantized layer, is small, and refuses damaged folders. (Every
shipped model at W8A8 / W4A8 / W4A4, min-max and svdquant_bc: experiments/artifact_check.py,
docs/results_artifact.)"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import traverse_util

from tac_jax import array_file, compensation, files
from tac_jax.app import artifact, stages
from tac_jax.app.settings import SamplerSpec
from tac_jax.diffusion import samplers
from tac_jax.quant import presets

NUM_CALIB, NUM_EVAL = 4, 3


def _quantized(checkpoint: str, bits, preset: str, sampler: SamplerSpec, method: str = "tcec"):
  """The main job's stages on a few seeds: float calibration trajectories, PTQ, a fit."""
  model = stages.load_model(checkpoint)
  s = sampler.build(model.schedule)
  jit = stages.Compiled(model, s)
  noise = stages.seed_noise(0, NUM_CALIB, NUM_EVAL, model.shape)
  qm = stages.quantize(model, stages.calibration_batches(jit, model, noise),
                       presets.quant_config(presets.quant_defaults(), *bits, preset))
  return model, s, jit, noise, qm, stages.fit_method(method, model, jit, qm, noise)


def _quick(checkpoint: str, bits, preset: str, sampler: SamplerSpec):
  """A shipped model quantized on noise at the sampler's timesteps, with random (nonzero)
  correction params: what the round trip must keep, at a fraction of a real fit's compiles."""
  model = stages.load_model(checkpoint)
  s = sampler.build(model.schedule)
  x = jax.random.normal(jax.random.key(1), (2,) + model.shape)
  calib = samplers.calibration_batches(jnp.stack([x] * s.coeffs.num_steps), s)[::2]
  qm = stages.quantize(model, calib, presets.quant_config(presets.quant_defaults(), *bits, preset))
  params = compensation.zero_params(s.coeffs.num_steps, model.channels, s.coeffs.t)
  k1, k2 = jax.random.split(jax.random.key(2))
  params = params.replace(K=0.05 * jax.random.normal(k1, params.K.shape),
                          beta=0.01 * jax.random.normal(k2, params.beta.shape))
  return model, s, qm, compensation.Calibration("tcec", params, 0.0)


def _same_params(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("checkpoint,bits,preset,sampler", [
    ("default", (4, 4), "svdquant_bc", SamplerSpec("ddim", 3)),
    ("dit_flow", (4, 8), "minmax", SamplerSpec("euler", 3)),
])
def test_round_trip_on_shipped_models_is_bit_identical_and_reads_no_float_weights(
    tmp_path, monkeypatch, checkpoint, bits, preset, sampler):
  model, s, qm, cal = _quick(checkpoint, bits, preset, sampler)
  out = str(tmp_path / "art")
  record = artifact.export(out, model, qm, sampler, cal)
  # Loading must not touch the float checkpoint: make any read of it fail.
  monkeypatch.setattr(files, "restore_params", lambda *a, **k: pytest.fail("read float params"))
  art = artifact.load(out)
  assert art.shape == model.shape and art.labels == model.labels
  assert art.qmodel.specs == qm.specs and art.qmodel.config == qm.config
  _same_params(art.calibration.params, cal.params)
  x_T = jax.random.normal(jax.random.key(3), (2,) + model.shape)
  key = jax.random.key(4)
  np.testing.assert_array_equal(np.asarray(art.sample(x_T, key, "int")),
                                np.asarray(artifact.sample(qm, s, cal, x_T, key, "int")))
  stored = array_file.load_arrays(os.path.join(out, artifact.VARIABLES), "test")
  kept = set(traverse_util.flatten_dict(stored["params"], sep="/"))
  quantized = {f"{p}/kernel" for p, spec in qm.specs.items() if spec.weighted}
  assert quantized and not kept & quantized
  assert record["bytes"] < record["float_checkpoint_bytes"]


def test_w4a8_minmax_artifact_of_the_default_model_is_an_eighth_of_float(tmp_path):
  sampler = SamplerSpec("ddim", 3)
  model, _, qm, cal = _quick("default", (4, 8), "minmax", sampler)
  record = artifact.export(str(tmp_path / "a"), model, qm, sampler, cal)
  assert record["bytes"] <= 1.25 * record["float_checkpoint_bytes"] / 8, record["bytes"]


@pytest.fixture(scope="module")
def small_artifact(tiny_model_dir, tmp_path_factory):
  sampler = SamplerSpec("ddim", 3)
  model, _, jit, noise, qm, cal = _quantized(tiny_model_dir(8), (8, 8), "minmax", sampler)
  out = str(tmp_path_factory.mktemp("art") / "a")
  artifact.export(out, model, qm, sampler, cal)
  return out, noise, jit, qm, cal


def test_loaded_artifact_samples_as_the_main_job_does(small_artifact):
  """Fake-quant and integer samples of the loaded artifact equal the main job's own
  sampling (stages.Compiled) of the in-memory model, bit for bit."""
  out, noise, jit, qm, cal = small_artifact
  art = artifact.load(out)
  for mode in ("int", "fake"):
    want, _, _ = jit.sample(qm.apply_fn(mode), qm.variables, cal, noise.x_eval, noise.key_eval)
    np.testing.assert_array_equal(np.asarray(art.sample(noise.x_eval, noise.key_eval, mode)),
                                  np.asarray(want))


@pytest.mark.parametrize("damage,message", [
    ("truncate", "does not match the checksum"),
    ("delete", "is missing"),
    ("json", "not valid JSON"),
    ("format", "format"),
])
def test_a_damaged_artifact_gives_one_clear_error(small_artifact, tmp_path, damage, message):
  out = shutil.copytree(small_artifact[0], str(tmp_path / "a"))
  arrays, record = os.path.join(out, artifact.VARIABLES), os.path.join(out, artifact.ARTIFACT_JSON)
  if damage == "truncate":
    with open(arrays, "r+b") as f:
      f.truncate(os.path.getsize(arrays) // 2)
  elif damage == "delete":
    os.remove(arrays)
  elif damage == "json":
    with open(record, "a") as f:
      f.write("{")
  else:
    rec = json.load(open(record))
    files.write_json_atomic(record, {**rec, "format": "something/0"})
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    artifact.load(out)


def test_a_missing_folder_and_wrong_noise_are_refused(small_artifact, tmp_path):
  with pytest.raises(FileNotFoundError, match="--config.export"):
    artifact.load(str(tmp_path / "nothing"))
  art = artifact.load(small_artifact[0])
  with pytest.raises(ValueError, match=r"x_T must be \[B, 8, 8, 3\]"):
    art.sample(np.zeros((2, 4, 4, 3), np.float32), jax.random.key(0))


def test_array_files_round_trip_dtypes_and_refuse_garbage(tmp_path):
  tree = {"a": {"w": np.arange(-8, 8, dtype=np.int8).reshape(4, 4)},
          "b": np.float32([1.5, -2.0]), "c": np.zeros((0, 3), np.int32),
          "d": jax.numpy.ones((2,), jax.numpy.bfloat16)}
  path = str(tmp_path / "t.npz")
  array_file.save_arrays(path, tree)
  back = array_file.load_arrays(path, "test arrays")
  for k in ("b", "c", "d"):
    assert back[k].dtype == np.asarray(tree[k]).dtype and back[k].shape == np.shape(tree[k])
  np.testing.assert_array_equal(back["a"]["w"], tree["a"]["w"])
  with open(path, "wb") as f:
    f.write(b"not a zip")
  with pytest.raises(ValueError, match="corrupt test arrays"):
    array_file.load_arrays(path, "test arrays")
