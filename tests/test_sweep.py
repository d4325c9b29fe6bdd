"""The sweep end to end on a tiny model (every stage, tiny sizes), through its launcher."""

import json
import os
import subprocess

import pytest

from configs_loader import launcher_cmd
from tac_jax import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sweep_launcher_writes_report(tiny_model_dir, tmp_path):
  out = str(tmp_path / "sweep")
  cmd = launcher_cmd("sweep", "sweep", f"--outdir={out}",
         f"--config.checkpoint={tiny_model_dir(16)}", "--config.seeds=0", "--config.settings=W4A8",
         "--config.methods=none,ptqd,tcec", "--config.samplers=ddim2,ddim3",
         "--config.ref_sampler=ddim3", "--config.ptq_options=minmax,minmax_tg2",
         "--config.num_calib=8", "--config.num_eval=8", "--config.num_fd=24", "--config.fd_methods=none,tcec",
         "--config.ablation_settings=W4A8", "--config.calib_sizes=4")
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(out, "sweep.json")) as f:
    res = json.load(f)
  main = [r for r in res["records"] if r["kind"] == "main"]
  assert len(main) == 3 * 2  # methods x samplers
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
  assert "| W4A8 | tcec |" in headline and "| float | - |" in headline
  for fig in ("psnr_vs_steps.png", "error_vs_step.png", "grid_W4A8.png"):
    assert os.path.getsize(os.path.join(out, fig)) > 1000


def test_sweep_rejects_bad_names():
  with pytest.raises(ValueError, match="ddim<steps>"):
    sweep.parse_sampler("euler20")
  with pytest.raises(ValueError, match="PTQ option"):
    sweep.ptq_option("minmax_tgx")
