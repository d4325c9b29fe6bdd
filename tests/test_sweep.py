"""The sweep end to end on a tiny model (every stage, tiny sizes), through its launcher."""

import json
import os

import pytest

from configs_loader import load_config
from tac_jax import sweep


def test_sweep_launcher_writes_report(tiny_runs):
  out, proc = tiny_runs["sweep"]
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(out, "sweep.json")) as f:
    res = json.load(f)
  main = [r for r in res["records"] if r["kind"] == "main"]
  assert len(main) == 2 * 2  # methods x samplers
  assert {r["sampler"] for r in main} == {"ddim2", "ddim3"}
  assert all(r["std_ratio"] > 0 and r["sharpness_ratio"] > 0 for r in main)
  assert len([r for r in res["records"] if r["kind"] == "ptq"]) == 2
  abl = {r["ablation"] for r in res["ablations"]}
  assert "+ e_hat regressor" in abl and "calibration samples = 4" in abl
  assert "calibrated at ddim2, sampled at ddim3" in abl
  assert res["fd"][0]["setting"] == "float" and len(res["fd"]) == 1 + 2
  assert all(r["fd_vs_float"] >= 0 for r in res["fd"])
  report = open(os.path.join(out, "report.md")).read()
  for section in ("PSNR (dB) by setting", "PTQ options", "Frechet distance", "Ablations",
                  "Error analysis", "pixel std / float's", "mean |Laplacian| / float's"):
    assert section in report
  headline = open(os.path.join(out, "headline.md")).read()
  assert "| W4A4 | tcec |" in headline and "| float | - |" in headline
  for fig in ("psnr_vs_steps.png", "error_vs_step.png", "grid_W4A4.png"):
    assert os.path.getsize(os.path.join(out, fig)) > 1000
  assert os.path.exists(os.path.join(out, "manifest.json"))


def test_sweep_rejects_bad_names():
  with pytest.raises(ValueError, match="ddim<steps>"):
    sweep.parse_sampler("euler20")
  with pytest.raises(ValueError, match="PTQ option"):
    sweep.ptq_option("minmax_tgx")
  # The sweep takes the main job's sampler options and checks them before running.
  cfg = load_config("sweep")
  cfg.spacing = "leading"
  cfg.steps_offset = 1
  assert sweep.validate(cfg).samplers == ("ddim10", "ddim25", "ddim50", "ddpm50")
  cfg.spacing = "cosine"
  with pytest.raises(ValueError, match="unknown spacing 'cosine'"):
    sweep.validate(cfg)
  cfg.spacing, cfg.thresholding = "leading", 2.0
  with pytest.raises(ValueError, match="dynamic_thresholding_ratio"):
    sweep.validate(cfg)
