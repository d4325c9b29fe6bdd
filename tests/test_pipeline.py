"""The main job end to end on a tiny model, through the absl launcher."""

import json
import os
import subprocess

import jax
import pytest

from configs_loader import launcher_cmd
from tac_jax import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
  return tiny_model_dir(8)


def test_main_job_launcher_writes_results(tiny_model, tmp_path):
  out = str(tmp_path / "run")
  cmd = launcher_cmd("quantize", "quantize",
         f"--config.checkpoint={tiny_model}", f"--outdir={out}",
         "--config.num_steps=4", "--config.num_calib=8", "--config.num_eval=8",
         "--config.settings=W8A8,W4A4", "--config.observers=minmax",
         "--config.variants=none,tcec_safe", "--config.timing_repeats=0")
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "PSNR vs float" in proc.stdout  # progress output
  with open(os.path.join(out, "results.json")) as f:
    res = json.load(f)
  runs = {(r["setting"], r["variant"]): r for r in res["runs"]}
  assert set(v for _, v in runs) == {"none", "tcec_safe"}
  for (_, v), r in runs.items():
    assert r["std_ratio"] > 0 and r["sharpness_ratio"] > 0
    if v == "tcec_safe":  # validated strength, or the fallback, on held-out calibration seeds
      assert r["safe"]["num_fit"] == 4 and r["safe"]["num_val"] == 4
      assert r["safe"]["fell_back"] or r["safe"]["val_psnr"] >= r["safe"]["val_psnr_none"]
    # fake-quant and the integer path agree (same integers, same rescale).
    assert abs(r["psnr_fake"]["mean"] - r["psnr_int"]["mean"]) < 0.05
    assert len(r["error_rms_per_step"]) == 4
  assert runs[("W8A8", "none")]["psnr_fake"]["mean"] > runs[("W4A4", "none")]["psnr_fake"]["mean"]
  mem = runs[("W4A4", "none")]["memory_bytes"]
  assert mem["layers_stored"] < mem["layers_int8"] < mem["layers_float32"]
  for name in ["results.md", "grid_W4A4_minmax.png", "errors_W4A4_minmax.png"]:
    assert os.path.getsize(os.path.join(out, name)) > 0
  with open(os.path.join(out, "results.md")) as f:
    assert f.read().count("\n") == 2 + 4


def test_bad_config_values_are_rejected(tiny_model, tmp_path):
  from configs_loader import load_config  # noqa: F401  (see conftest)
  cfg = load_config("quantize")
  cfg.checkpoint = tiny_model
  cfg.settings = "W3A3"
  with pytest.raises(ValueError, match="unknown setting"):
    pipeline.run(cfg, str(tmp_path), verbose=False)
  cfg.settings = "W8A8"
  cfg.variants = "none,magic"
  with pytest.raises(ValueError, match="unknown method"):
    pipeline.run(cfg, str(tmp_path), verbose=False)
  cfg.variants = "tcec"
  cfg.checkpoint = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    pipeline.run(cfg, str(tmp_path), verbose=False)


def test_overhead_measurement_reports_side_by_side_ratios():
  from tac_jax import errors
  from tac_jax.diffusion import samplers, schedules
  sampler = samplers.ddim(schedules.make_schedule("linear", 1000), 5)
  apply_fn = lambda v, x, t: jax.numpy.tanh(x * v)
  params = errors.zero_params(5, 3, sampler.coeffs.t)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  t = pipeline.measure_overhead(apply_fn, sampler, 0.5, params, x, jax.random.key(1), repeats=2)
  assert t["plain_s"] > 0 and t["compensated_s"] > 0 and t["compensation_ops_s"] > 0
  assert t["overhead_ab"] == pytest.approx(t["compensated_s"] / t["plain_s"] - 1)
  assert t["overhead_ops"] == pytest.approx(t["compensation_ops_s"] / t["plain_s"])
