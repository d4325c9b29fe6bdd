"""The main job end to end on a tiny model, through the absl launcher (one shared run)."""

import json
import os
import subprocess
import sys

import jax
import pytest

from configs_loader import load_config
from tac_jax import pipeline, stages


def _results(tiny_runs):
  outdir, proc = tiny_runs["main"]
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(outdir, "results.json")) as f:
    return outdir, proc, json.load(f)


def test_main_job_launcher_writes_results(tiny_runs):
  out, proc, res = _results(tiny_runs)
  assert "PSNR vs float" in proc.stdout  # progress output
  runs = {(r["setting"], r["method"]): r for r in res["runs"]}
  assert set(m for _, m in runs) == {"none", "tcec", "tcec_safe"}
  for (_, m), r in runs.items():
    assert r["std_ratio"] > 0 and r["sharpness_ratio"] > 0
    if m == "tcec_safe":  # validated strength, or the fallback, on held-out calibration seeds
      assert r["safe"]["num_fit"] == 4 and r["safe"]["num_val"] == 4
      assert r["safe"]["fell_back"] or r["safe"]["val_psnr"] >= r["safe"]["val_psnr_none"]
      assert r["safe"]["fell_back"] or r["safe"]["val_fd"] <= r["safe"]["val_fd_none"]  # FD guard
    if "psnr_int" in r:  # fake-quant and the integer path agree (same integers, same rescale)
      assert abs(r["psnr_fake"]["mean"] - r["psnr_int"]["mean"]) < 0.05
    assert len(r["error_rms_per_step"]) == 3
  assert "psnr_int" in runs[("W4A4", "none")] and "psnr_int" in runs[("W4A4", "tcec_safe")]
  assert runs[("W8A8", "none")]["psnr_fake"]["mean"] > runs[("W4A4", "none")]["psnr_fake"]["mean"]
  for setting in ("W8A8", "W4A4"):   # on a tiny UNet at 4 bits, TCEC beats plain PTQ
    assert runs[(setting, "tcec")]["psnr_fake"]["mean"] > runs[(setting, "none")]["psnr_fake"]["mean"] + 1
  mem = runs[("W4A4", "none")]["memory_bytes"]
  assert mem["layers_stored"] < mem["layers_int8"] < mem["layers_float32"]
  for name in ["results.md", "grid_W4A4_minmax.png", "errors_W4A4_minmax.png"]:
    assert os.path.getsize(os.path.join(out, name)) > 0
  with open(os.path.join(out, "results.md")) as f:
    assert f.read().count("\n") == 2 + 6


def test_main_job_writes_a_manifest_of_its_files(tiny_runs):
  from tac_jax import files
  out, _, res = _results(tiny_runs)
  with open(os.path.join(out, "manifest.json")) as f:
    man = json.load(f)
  assert man["config"]["methods"] == res["config"]["methods"]
  assert man["versions"]["jax"] == jax.__version__
  assert set(man["files"]) == set(os.listdir(out)) - {"manifest.json"}
  files.verify_checksums(out, man["files"], "run")
  assert not [n for n in os.listdir(os.path.dirname(out)) if n.startswith(".main.")]


def test_main_job_and_sweep_agree_on_the_same_seed(tiny_runs):
  """Both launchers run the shared stages: plain PTQ and tcec at W4A4, DDIM 3, seed 0."""
  _, _, res = _results(tiny_runs)
  outdir, proc = tiny_runs["sweep"]
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(outdir, "sweep.json")) as f:
    sw = json.load(f)
  main = {r["method"]: r for r in res["runs"] if r["setting"] == "W4A4"}
  for m in ("none", "tcec"):
    rec = [r for r in sw["records"] if r["kind"] == "main" and r["sampler"] == "ddim3"
           and r["method"] == m]
    assert len(rec) == 1
    assert rec[0]["psnr"] == pytest.approx(main[m]["psnr_fake"]["mean"], abs=1e-3)
    assert rec[0]["error_rms_per_step"] == pytest.approx(main[m]["error_rms_per_step"], rel=1e-4)


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
                              ("checkpoint", str(tmp_path / "missing"), "does not exist"),
                              ("checkpoint", __file__, "is a file")):
    bad = load_config("quantize")
    bad.checkpoint = cfg.checkpoint
    bad[field] = value
    with pytest.raises((ValueError, FileNotFoundError), match=match):
      pipeline.run(bad, out, verbose=False)
    assert not os.path.exists(out)
  bad = load_config("quantize")
  bad.sampler, bad.eta = "ddpm", 0.5
  with pytest.raises(ValueError, match="applies to DDIM only"):
    pipeline.run(bad, out, verbose=False)
  bad = load_config("quantize")
  bad.quant.w_bits = 9
  with pytest.raises(ValueError, match="bits come from --config.settings"):
    pipeline.run(bad, out, verbose=False)
  assert not os.path.exists(out)


def test_overhead_measurement_reports_side_by_side_ratios():
  from tac_jax import errors
  from tac_jax.diffusion import samplers, schedules
  sampler = samplers.ddim(schedules.make_schedule("linear", 1000), 5)
  apply_fn = lambda v, x, t: jax.numpy.tanh(x * v)
  params = errors.zero_params(5, 3, sampler.coeffs.t)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  t = stages.measure_overhead(apply_fn, sampler, 0.5, params, x, jax.random.key(1), repeats=2)
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


def test_acceptance_report_reads_the_main_job_output(tiny_runs):
  out, _, res = _results(tiny_runs)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, os.path.join(root, "experiments", "acceptance.py"),
                         f"--dirs={out}"], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  runs = {(r["setting"], r["method"]): r for r in res["runs"]}
  for setting in ("W8A8", "W4A4"):
    none, safe = runs[(setting, "none")]["psnr_fake"]["mean"], runs[(setting, "tcec_safe")]["psnr_fake"]["mean"]
    line = next(l for l in proc.stdout.splitlines() if f"| {setting} |" in l)
    assert f"{none:.2f} -> {safe:.2f}" in line and ("1 of 1" in line or "0 of 1" in line)
    assert ("| ok |" in line) == (safe >= none - 0.2)   # no FD here: the tiny model has no data
  assert "bar met in" in proc.stdout
