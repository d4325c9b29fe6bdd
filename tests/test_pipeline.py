"""The main job's config checks and API paths (its end-to-end launcher run on a tiny model:
tests/test_launchers.py)."""

import os

import jax
import pytest

from configs_loader import load_config
from tac_jax import compensation
from tac_jax.app import pipeline, settings, stages
from tac_jax.diffusion import samplers, schedules


def test_bad_config_values_are_rejected_before_anything_is_written(tiny_model_dir, tmp_path):
  cfg = load_config("quantize")
  cfg.checkpoint = tiny_model_dir(8)
  out = str(tmp_path / "run")
  for field, value, match in (("settings", "W3A3", "unknown setting"),
                              ("settings", "W8A8,W8A8", "more than once"),
                              ("methods", "none,magic", "unknown method"),
                              ("methods", "tcec,tcec", "more than once"),
                              ("eta", -0.5, "eta must be in"),
                              ("num_steps", 0, "num_steps must be"),
                              ("timing_repeats", -3, "timing_repeats must be an integer >= 0"),
                              ("default_method", "tcec_sfe", "not a compensation method"),
                              ("plugins", "no_such_module_here", "cannot import"),
                              ("checkpoint", str(tmp_path / "missing"), "does not exist"),
                              ("checkpoint", __file__, "is a file")):
    bad = load_config("quantize")
    bad.checkpoint = cfg.checkpoint
    bad[field] = value
    with pytest.raises((ValueError, FileNotFoundError), match=match):
      pipeline.run(bad, out, verbose=False)
    assert not os.path.exists(out)
  bad = load_config("quantize")
  bad.checkpoint, bad.num_calib, bad.methods = cfg.checkpoint, 1, "none,tac"
  with pytest.raises(ValueError, match="tac's mask threshold search splits"):
    pipeline.run(bad, out, verbose=False)
  bad = load_config("quantize")
  bad.sampler, bad.eta = "ddpm", 0.5
  with pytest.raises(ValueError, match="applies to DDIM only"):
    pipeline.run(bad, out, verbose=False)
  bad = load_config("quantize")
  bad.quant.w_bits = 9
  with pytest.raises(ValueError, match="bits come from --config.settings"):
    pipeline.run(bad, out, verbose=False)
  assert not os.path.exists(out)


def test_main_job_compares_the_default_with_the_fields_methods():
  methods = load_config("quantize").methods.split(",")
  assert {"none", "ptqd", "tac", "stepbaq", "qncd", compensation.DEFAULT_METHOD} <= set(methods)
  assert set(load_config("full").methods.split(",")) == set(compensation.names()) - {
      "tcec_vp", "tcec_ehat"}   # every method but the two tcec variants


def test_validate_turns_the_config_into_a_typed_job_spec(tiny_model_dir):
  cfg = load_config("quantize")
  cfg.update(dict(checkpoint=tiny_model_dir(8), settings="W4A4, W8A8", methods="tcec,ptqd",
                  sampler="ddpm", num_steps=7, ptq="minmax,mse"))
  cfg.safe.bases = "tcec,tac"
  job = pipeline.validate(cfg)
  assert isinstance(job, settings.JobSpec)
  assert job.common.settings == ("W4A4", "W8A8") and job.ptq == ("minmax", "mse")
  assert job.common.methods == ("none", "tcec", "ptqd")     # "none" first, added
  assert job.default == "ptqd"   # the default method is not listed: the last one is shown
  assert job.sampler == settings.SamplerSpec("ddpm", 7) and job.sampler.name == "ddpm7"
  assert job.common.model == settings.ModelSpec("", cfg.checkpoint)
  assert job.common.safe == compensation.SafeConfig(bases=("tcec", "tac"), fd_resamples=200)
  assert settings.method_options("tcec_safe", job.common, None) is job.common.safe
  assert settings.method_options("tcec", job.common, None) is None
  cfg.safe.bases = "tcec,magic"
  with pytest.raises(ValueError, match="unknown safe base"):
    pipeline.validate(cfg)
  cfg.safe.bases, cfg.default_method = "tcec", "magic"
  with pytest.raises(ValueError, match="is not a compensation method"):
    pipeline.validate(cfg)


def test_overhead_measurement_reports_side_by_side_ratios():
  sampler = samplers.ddim(schedules.make_schedule("linear", 1000), 5)
  q = compensation.Net(lambda v, x, t: jax.numpy.tanh(x * v), 0.5)
  cal = compensation.Calibration("tcec", compensation.zero_params(5, 3, sampler.coeffs.t), 0.0)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  t = stages.measure_overhead(q, sampler, cal, x, jax.random.key(1), repeats=2)
  assert t["plain_s"] > 0 and t["compensated_s"] > 0 and t["compensation_ops_s"] > 0
  assert t["overhead_ab"] == pytest.approx(t["compensated_s"] / t["plain_s"] - 1)
  assert t["overhead_ops"] == pytest.approx(t["compensation_ops_s"] / t["plain_s"])


def test_main_job_runs_a_model_from_a_factory(tmp_path):
  """Any Flax eps model (examples/own_model.py, not a UNet) through the main job."""
  cfg = load_config("quantize")
  cfg.update(dict(model="examples.own_model:make", num_steps=2, num_calib=4, num_eval=4,
                  settings="W8A8", methods="none,tcec", timing_repeats=0))
  res = pipeline.run(cfg, str(tmp_path / "run"), verbose=False)
  psnr = {r["method"]: r["psnr_fake"]["mean"] for r in res["runs"]}
  assert set(psnr) == {"none", "tcec"} and all(v == v for v in psnr.values())
  assert res["runs"][0]["memory_bytes"]["layers_float32"] > 0
  for spec, match in (("examples.own_model", "package.module:function"),
                      ("examples.nope:make", "cannot import"),
                      ("examples.own_model:nope", "has no function")):
    cfg.model = spec
    with pytest.raises(ValueError, match=match):
      pipeline.run(cfg, str(tmp_path / "bad"), verbose=False)


def test_main_job_runs_dpm_solver_with_the_two_term_error_model(tiny_model_dir, tmp_path):
  cfg = load_config("quantize")
  cfg.update(dict(checkpoint=tiny_model_dir(8), sampler="dpm", num_steps=4, num_calib=4,
                  num_eval=4, settings="W4A4", methods="none,tcec", frechet=False,
                  timing_repeats=0, int_path=False))
  res = pipeline.run(cfg, str(tmp_path / "run"), verbose=False)
  runs = {r["method"]: r for r in res["runs"]}
  assert runs["tcec"]["psnr_fake"]["mean"] > runs["none"]["psnr_fake"]["mean"]
  prop = runs["none"]["propagation"]
  assert len(prop["closed_form_j0_rel_err"]) == 4 and prop["closed_form_rel_err"][-1] < 1.0
  for field, value, match in (("methods", "none,stepbaq", r"\['stepbaq'\] model each step"),
                              ("spacing", "quadratic", "DPM-Solver\\+\\+ 2M takes one of"),
                              ("eta", 0.5, "deterministic")):
    bad = cfg.copy_and_resolve_references()
    bad[field] = value
    with pytest.raises(ValueError, match=match):
      pipeline.validate(bad)
