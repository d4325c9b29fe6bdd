"""The training loop (tac_jax.app.train): the loss goes down, an interrupted run resumes to
the same params, the exported model loads back as a model checkpoint; and bad input is
refused up front (before data loading or compiling) naming the config field, a diverging
run stops exporting nothing, a workdir of another model is named with the differing field."""

import copy
import os
import shutil

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tac_jax.app import train as train_lib
from tac_jax.models import UNetConfig
from tac_jax.models import checkpoint as ckpt_lib

TINY = UNetConfig(sample_size=8, block_out_channels=(8, 16), attention_levels=(1,),
                  attention_head_dim=16, norm_num_groups=4)
STEPS = 60
class _Missing:
  def __repr__(self):   # a stable test id (pytest-xdist workers must collect the same ids)
    return "missing"


del_ = _Missing()   # a field's value in _config: remove the field
BASE = dict(
    seed=0, model=TINY.to_dict(),
    schedule=dict(name="linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02),
    data=dict(name="digits", num_color_seeds=1),
    optim=dict(learning_rate=3e-3, warmup_steps=5, weight_decay=0.0, grad_clip=1.0,
               ema_decay=0.9),
    batch_size=8, num_train_steps=STEPS, log_every=10, checkpoint_every=30,
    data_parallel=True, sample_steps=2, num_samples=4)


def _config(**fields):
  """The tiny training config with dotted `fields` ("optim__learning_rate": optim's) set;
  a value of `del` removes the field. Built from a plain dict, so any type goes in."""
  d = copy.deepcopy(BASE)
  for name, value in fields.items():
    *parents, leaf = name.split("__")
    node = d
    for p in parents:
      node = node[p]
    if value is del_:
      del node[leaf]
    else:
      node[leaf] = value
  return ml_collections.ConfigDict(d)


def _not_reached(*args, **kwargs):
  raise AssertionError("training loaded data although its input is bad")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(root, train output): one tiny run, workdir root/work, export root/model."""
  root = tmp_path_factory.mktemp("trained")
  out = train_lib.train(_config(), str(root / "work"), export_dir=str(root / "model"))
  return root, out


def _copy_workdir(trained, tmp_path):
  work = tmp_path / "work"
  shutil.copytree(trained[0] / "work", work)
  return work


def test_training_lowers_loss_and_exports_a_loadable_model(trained):
  root, out = trained
  losses = [l for _, l in out["losses"]]
  assert losses[-1] < 0.7 * losses[0], losses
  module, params, meta = ckpt_lib.load_model(str(root / "model"))
  jax.tree.map(np.testing.assert_array_equal, params, out["params"])
  assert meta["train_steps"] == STEPS and UNetConfig.from_dict(meta["model"]) == TINY
  assert module.config == TINY
  record = root / "work" / train_lib.RECORD_JSON
  assert UNetConfig.from_dict(train_lib.files.read_json(str(record), "record")["model"]) == TINY


def test_an_interrupted_run_resumes_to_the_same_params(trained, tmp_path, capsys):
  work = _copy_workdir(trained, tmp_path)
  shutil.rmtree(work / "checkpoints" / str(STEPS))   # as if stopped after the step-30 save
  out = train_lib.train(_config(), str(work))
  assert "resumed from step 30" in capsys.readouterr().out
  assert [s for s, _ in out["losses"]] == [40, 50, 60]
  # Same data order and keys as the uninterrupted run (bit-identical on CPU).
  np.testing.assert_allclose(out["losses"], trained[1]["losses"][3:], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               out["params"], trained[1]["params"])


BAD_FIELDS = [
    ("num_train_steps", 0, r"config\.num_train_steps must be an integer >= 1, got 0 \(0 steps "
                           r"would export the untrained initialisation\)"),
    ("num_train_steps", 2.0, r"config\.num_train_steps must be an integer >= 1, got 2\.0"),
    ("num_train_steps", True, r"config\.num_train_steps must be an integer >= 1, got True"),
    ("batch_size", 0, r"config\.batch_size must be an integer >= 1, got 0"),
    ("log_every", 0, r"config\.log_every must be an integer >= 1, got 0"),
    ("checkpoint_every", -1, r"config\.checkpoint_every must be an integer >= 1, got -1"),
    ("seed", -1, r"config\.seed must be an integer >= 0, got -1"),
    ("seed", "0", r"config\.seed must be an integer >= 0, got '0'"),
    ("log_every", del_, r"config\.log_every is missing"),
    ("optim__learning_rate", float("nan"),
     r"config\.optim\.learning_rate must be a finite number > 0, got nan \(configs/"),
    ("optim__learning_rate", 0.0, r"config\.optim\.learning_rate must be a finite number > 0"),
    ("optim__learning_rate", float("inf"), r"config\.optim\.learning_rate must be a finite"),
    ("optim__learning_rate", del_, r"config\.optim\.learning_rate is missing"),
    ("optim__warmup_steps", -1, r"config\.optim\.warmup_steps must be an integer >= 0"),
    ("optim__warmup_steps", 1.5, r"config\.optim\.warmup_steps must be an integer >= 0"),
    ("optim__weight_decay", -1e-4, r"config\.optim\.weight_decay must be a finite number >= 0"),
    ("optim__weight_decay", float("nan"), r"config\.optim\.weight_decay must be a finite"),
    ("optim__grad_clip", 0.0, r"config\.optim\.grad_clip must be a finite number > 0"),
    ("optim__grad_clip", float("inf"), r"config\.optim\.grad_clip must be a finite number > 0"),
    ("optim__ema_decay", 1.0, r"config\.optim\.ema_decay must be a number in \[0, 1\), got 1\.0"),
    ("optim__ema_decay", -0.1, r"config\.optim\.ema_decay must be a number in \[0, 1\)"),
    ("optim__ema_decay", float("nan"), r"config\.optim\.ema_decay must be a number in \[0, 1\)"),
    ("optim__ema_decay", False, r"config\.optim\.ema_decay must be a number in \[0, 1\)"),
    ("data__num_color_seeds", 0, r"config\.data\.num_color_seeds must be an integer >= 1"),
    ("data__name", None, r"config\.data\.name must be a data set name"),
    ("data_parallel", "yes", r"config\.data_parallel must be True or False"),
    ("sample_steps", 0, r"config\.sample_steps must be an integer >= 1"),
    ("sample_steps", 5000, r"config\.sample_steps=5000 / config\.sample_spacing='uniform'"),
    ("sample_spacing", "bogus", r"config\.sample_spacing='bogus': unknown spacing"),
    ("num_samples", 0, r"config\.num_samples must be an integer >= 1"),
    ("model__norm_num_groups", 3, r"config\.model: block_out_channels .* norm_num_groups=3"),
    ("model__channels", 8, r"config\.model: unknown UNetConfig fields \['channels'\]"),
    ("schedule__beta_end", float("nan"), r"config\.schedule: "),
]


@pytest.mark.parametrize("field,value,match", BAD_FIELDS,
                         ids=[f"{f}={v!r}" for f, v, _ in BAD_FIELDS])
def test_a_bad_field_is_named_before_any_work(field, value, match, tmp_path, monkeypatch):
  monkeypatch.setattr(train_lib, "load_training_data", _not_reached)
  with pytest.raises(ValueError, match=match) as e:
    train_lib.train(_config(**{field: value}), str(tmp_path / "work"),
                    export_dir=str(tmp_path / "model"))
  assert "\n" not in str(e.value)
  assert not os.listdir(tmp_path)   # nothing written


@pytest.mark.parametrize("cause", ["nan_data", "huge_learning_rate"])
def test_a_diverging_run_stops_naming_the_step_and_exports_nothing(cause, tmp_path, monkeypatch):
  if cause == "nan_data":   # the fixture's config: its train step is in the compilation cache
    load = train_lib.load_training_data
    monkeypatch.setattr(train_lib, "load_training_data", lambda c: _poison(load(c)))
    config = _config()
  else:
    config = _config(optim__learning_rate=1e30, num_train_steps=20)
  with pytest.raises(FloatingPointError, match=r"training diverged: the mean loss up to step 10 "
                     r"is nan; nothing was exported\. Lower config\.optim\.learning_rate .* "
                     r"check the training data"):
    train_lib.train(config, str(tmp_path / "work"), export_dir=str(tmp_path / "model"))
  assert not (tmp_path / "model").exists()
  assert not ocp.utils.checkpoint_steps(str(tmp_path / "work" / "checkpoints"))


def _poison(data):
  images, labels = data
  images = images.copy()
  images[::7] = np.nan
  return images, labels


def test_non_finite_final_params_are_refused():
  params = {"a": np.ones(3, np.float32), "b": np.array([1.0, np.inf], np.float32)}
  with pytest.raises(FloatingPointError, match=r"EMA params after step 7 hold NaN/inf.*"
                                               r"config\.optim\.learning_rate"):
    train_lib._check_params(params, 7, _config())  # pylint: disable=protected-access
  train_lib._check_params({"a": np.ones(3)}, 7, _config())  # pylint: disable=protected-access


OTHER = dict(TINY.to_dict(), block_out_channels=[16, 16])


def test_resuming_a_workdir_of_another_model_names_the_field(trained, tmp_path, monkeypatch):
  work = _copy_workdir(trained, tmp_path)
  before = sorted(os.listdir(work)), ocp.utils.checkpoint_steps(str(work / "checkpoints"))
  monkeypatch.setattr(train_lib, "load_training_data", _not_reached)
  with pytest.raises(ValueError, match=r"workdir .*work holds checkpoints of another model "
                     r"\(config\.model\.block_out_channels was \[8, 16\] there, is \[16, 16\] "
                     r"now\); use another --workdir, or delete .*work to train from scratch\.$"):
    train_lib.train(_config(model=OTHER), str(work))
  assert (sorted(os.listdir(work)), ocp.utils.checkpoint_steps(str(work / "checkpoints"))) == before


def test_an_older_workdir_without_a_record_fails_in_one_line(trained, tmp_path):
  work = _copy_workdir(trained, tmp_path)
  os.remove(work / train_lib.RECORD_JSON)
  with pytest.raises(ValueError, match=r"cannot resume from the step-60 checkpoint in workdir "
                     r".*work: it does not fit this config's model.*use another --workdir, or "
                     r"delete .*work to train from scratch\.$") as e:
    train_lib.train(_config(model=OTHER), str(work))
  assert "\n" not in str(e.value)
  assert not (work / train_lib.RECORD_JSON).exists()
