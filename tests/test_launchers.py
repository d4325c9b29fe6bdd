"""The launchers end to end on a tiny model: every test that reads the shared tiny runs of
the main job and the sweep (`tiny_runs` in tests/conftest.py). They live in this one file
so that, with the suite spread over workers by file (pyproject.toml), the runs happen once
per session; conftest refuses a `tiny_runs` test anywhere else."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs_loader import launcher_cmd, load_config, xla_env
from tac_jax import files
from tac_jax.app import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _results(tiny_runs):
  outdir, proc = tiny_runs["main"]
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(outdir, "results.json")) as f:
    return outdir, proc, json.load(f)


def test_main_job_launcher_writes_results(tiny_runs):
  out, proc, res = _results(tiny_runs)
  assert "PSNR vs float" in proc.stdout  # progress output
  runs = {(r["setting"], r["method"]): r for r in res["runs"]}
  # toy_offset: a method registered outside the library (tests/toy_compensator.py, loaded
  # with --config.plugins), run like the library's own
  assert set(m for _, m in runs) == {"none", "tcec", "tcec_safe", "toy_offset"}
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
  # on a tiny UNet at 4 bits, TCEC beats plain PTQ
  assert runs[("W4A4", "tcec")]["psnr_fake"]["mean"] > runs[("W4A4", "none")]["psnr_fake"]["mean"] + 1
  mem = runs[("W4A4", "none")]["memory_bytes"]
  assert mem["layers_stored"] < mem["layers_int8"] < mem["layers_float32"]
  for name in ["results.md", "grid_W4A4_minmax.png", "errors_W4A4_minmax.png"]:
    assert os.path.getsize(os.path.join(out, name)) > 0
  with open(os.path.join(out, "results.md")) as f:
    assert f.read().count("\n") == 2 + 4
  # the plug-in's mean offset helps too
  assert runs[("W4A4", "toy_offset")]["psnr_fake"]["mean"] > runs[("W4A4", "none")]["psnr_fake"]["mean"]


def test_main_job_writes_a_manifest_of_its_files(tiny_runs):
  out, _, res = _results(tiny_runs)
  with open(os.path.join(out, "manifest.json")) as f:
    man = json.load(f)
  assert man["config"]["methods"] == res["config"]["methods"]
  assert man["versions"]["jax"] == jax.__version__
  assert set(man["files"]) == set(os.listdir(out)) - {"manifest.json"}
  files.verify_checksums(out, man["files"], "run")
  assert not [n for n in os.listdir(os.path.dirname(out)) if n.startswith(".main.")]
  # the checkout's state: a revision, and a diff hash exactly when tracked files changed
  diff = subprocess.run(["git", "diff", "HEAD"], cwd=ROOT, capture_output=True, text=True)
  if diff.returncode == 0:
    assert man["git_revision"] and man["git_dirty"] == bool(diff.stdout.strip())
    assert (man["git_diff_sha256"] is None) == (not man["git_dirty"])


def test_main_job_exports_an_artifact_that_samples_what_it_measured(tiny_runs):
  """--config.export: the loaded artifact's integer samples on the job's evaluation seeds
  give the PSNR the job reported for its default method's integer path."""
  from tac_jax.app import artifact, stages  # pylint: disable=import-outside-toplevel
  _, proc, res = _results(tiny_runs)
  entry = next(r for r in res["runs"] if r["method"] == "tcec_safe")
  path = os.path.join(tiny_runs["export"], "W4A4_minmax")
  assert entry["artifact"]["path"] == path and f"exported tcec_safe to {path}" in proc.stdout
  assert entry["artifact"]["bytes"] < entry["artifact"]["float_checkpoint_bytes"]
  art = artifact.load(path)
  model = stages.load_model(tiny_runs["model"])
  noise = stages.seed_noise(0, 8, 8, model.shape)
  ref = stages.float_reference(stages.Compiled(model, art.sampler), model, noise.x_eval,
                               noise.key_eval)
  x = art.sample(noise.x_eval, noise.key_eval, "int")
  assert stages.psnr_stats(x, ref.x)["mean"] == pytest.approx(entry["psnr_int"]["mean"], abs=1e-3)


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


def test_acceptance_report_reads_the_main_job_output(tiny_runs):
  out, _, res = _results(tiny_runs)
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "acceptance.py"),
                         f"--dirs={out}"], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  runs = {(r["setting"], r["method"]): r for r in res["runs"]}
  for setting in ("W4A4",):
    none, safe = runs[(setting, "none")]["psnr_fake"]["mean"], runs[(setting, "tcec_safe")]["psnr_fake"]["mean"]
    line = next(l for l in proc.stdout.splitlines() if f"| {setting} |" in l)
    # the others: tcec and the plug-in toy_offset
    assert f"{none:.2f} -> {safe:.2f}" in line and line.count(" of 2 |") == 2
    assert ("| ok |" in line) == (safe >= none - 0.2)   # no FD here: the tiny model has no data
  assert "bar met in" in proc.stdout


def test_sweep_launcher_writes_report(tiny_runs):
  out, proc = tiny_runs["sweep"]
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(out, "sweep.json")) as f:
    res = json.load(f)
  main = [r for r in res["records"] if r["kind"] == "main"]
  assert len(main) == 3 * 2  # methods (none, tcec, the plug-in toy_offset) x samplers
  assert {r["method"] for r in main} == {"none", "tcec", "toy_offset"}
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


def _free_port() -> int:
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_main_job_on_two_processes_matches_single_device(tiny_runs, tmp_path):
  """--distributed: two processes x two CPU devices each, one global mesh (as on a pod), the
  seeds split over all 4 devices (sampling and the sharded calibration scan); the numbers
  equal the shared single-device tiny run's (W4A4, plain PTQ and tcec)."""
  single_dir, single = tiny_runs["main"]
  assert single.returncode == 0, single.stderr[-2000:]
  out = str(tmp_path / "run")
  port = _free_port()
  cmd = launcher_cmd("quantize", "quantize",
         f"--config.checkpoint={tiny_runs['model']}", f"--outdir={out}",
         "--config.num_steps=3", "--config.num_calib=8", "--config.num_eval=8",
         "--config.settings=W4A4", "--config.ptq=minmax", "--config.methods=none,tcec",
         "--config.timing_repeats=0", "--config.int_path=False", "--config.frechet=False",
         "--distributed",
         f"--coordinator_address=localhost:{port}", "--num_processes=2")
  procs = [subprocess.Popen([*cmd, f"--process_id={i}"], cwd=ROOT, text=True,
                            env=xla_env(xla_force_host_platform_device_count=2),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (so, se) in zip(procs, outs):
    assert p.returncode == 0, so[-2000:] + se[-3000:]
  assert "data parallel over 4 devices (2 process(es))" in outs[0][0]
  with open(os.path.join(out, "results.json")) as f:   # written by process 0 only
    res = json.load(f)
  assert res["processes"] == 2
  with open(os.path.join(single_dir, "results.json")) as f:
    ref = {(r["setting"], r["method"]): r for r in json.load(f)["runs"]}
  assert [r["method"] for r in res["runs"]] == ["none", "tcec"]
  for got in res["runs"]:
    want = ref[("W4A4", got["method"])]
    np.testing.assert_allclose(got["psnr_fake"]["mean"], want["psnr_fake"]["mean"], atol=1e-2)
    np.testing.assert_allclose(got["error_rms_per_step"], want["error_rms_per_step"], rtol=1e-3)


def _wait_for(pred, proc, timeout=300.0):
  t0 = time.time()
  while not pred():
    assert proc.poll() is None, "the process ended before the condition held"
    assert time.time() - t0 < timeout, "timed out"
    time.sleep(0.2)


def test_killed_main_job_leaves_the_previous_run_intact(tiny_runs, tmp_path):
  outdir, proc = tiny_runs["main"]
  assert proc.returncode == 0, proc.stderr[-2000:]
  previous = str(tmp_path / "run")
  shutil.copytree(outdir, previous)
  manifest = files.read_json(os.path.join(previous, files.MANIFEST), "manifest")
  # the tiny run's sizes, so the programs it compiled come from the session's cache
  cmd = launcher_cmd("quantize", "quantize", f"--config.checkpoint={tiny_runs['model']}",
                     f"--outdir={previous}", "--overwrite", "--config.num_steps=3",
                     "--config.num_calib=8", "--config.num_eval=8", "--config.settings=W8A8,W4A4",
                     "--config.methods=none", "--config.timing_repeats=0")
  job = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    def first_grid_written():
      return any(os.path.exists(os.path.join(str(tmp_path), d, "grid_W8A8_minmax.png"))
                 for d in os.listdir(str(tmp_path)) if d.startswith(".run.tmp-"))
    _wait_for(first_grid_written, job)
  finally:
    job.send_signal(signal.SIGTERM)
    job.wait(60)
  # The old run is untouched, byte for byte; nothing that looks like a complete run appeared.
  files.verify_checksums(previous, manifest["files"], "previous run")
  assert set(os.listdir(previous)) == set(manifest["files"]) | {files.MANIFEST}
  assert [d for d in os.listdir(str(tmp_path)) if not d.startswith(".")] == ["run"]


def test_outdir_with_results_is_refused_unless_overwrite(tiny_runs, tmp_path):
  cfg = load_config("quantize")
  cfg.checkpoint = tiny_runs["model"]
  outdir, _ = tiny_runs["main"]
  with pytest.raises(FileExistsError, match="--overwrite"):
    pipeline.run(cfg, outdir, verbose=False)
  f = tmp_path / "a_file"
  f.write_text("x")
  for bad, match in (("", "empty"), (str(f), "is a file"), (str(f / "sub"), "is a file")):
    with pytest.raises(ValueError, match=match):
      files.check_output_dir(bad, overwrite=True)


def test_leaderboard_reads_the_main_job_output(tiny_runs, tmp_path):
  out, _, res = _results(tiny_runs)
  page = str(tmp_path / "leaderboard.md")
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "leaderboard.py"),
                         f"--dirs={out}", f"--out={page}", "--resamples=200"],
                        capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  text = open(page).read()
  runs = {(r["setting"], r["method"]): r for r in res["runs"]}
  for setting in ("W4A4",):
    best = max((m for s, m in runs if s == setting), key=lambda m: runs[(setting, m)]["psnr_fake"]["mean"])
    line = next(l for l in text.splitlines() if l.startswith(f"| {setting} | minmax |"))
    assert f"**{runs[(setting, best)]['psnr_fake']['mean']:.2f}**" in line   # the best, bold
  assert "rows; within the bar of plain PTQ" in text and "Generated by" in text
