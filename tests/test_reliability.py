"""Reliability: nothing half-written, nothing silently corrupt, bad input fails early and
clearly. One test per fault found by probing the library as a hostile user would."""

import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs_loader import ROOT, launcher_cmd
from tac_jax import compensation, files, quant
from tac_jax.app import pipeline
from tac_jax.diffusion import samplers, schedules
from tac_jax.models import checkpoint


EXPORT_SCRIPT = textwrap.dedent("""
    import sys, time, jax, numpy as np
    from tac_jax import files
    from tac_jax.models import checkpoint
    original = files.save_tree
    def slow(path, tree):
        original(path, tree)
        print("WROTE", flush=True)
        time.sleep(120)   # killed here: params written, model.json not yet
    files.save_tree = slow
    checkpoint.save_model(sys.argv[1], {"w": np.full((64, 64), 2.0, np.float32)},
                          {"model": {"kind": "toy"}})
""")


def test_killed_model_export_leaves_the_previous_model_intact(tmp_path):
  d = str(tmp_path / "model")
  checkpoint.save_model(d, {"w": np.ones((64, 64), np.float32)}, {"model": {"kind": "toy"}})
  job = subprocess.Popen([sys.executable, "-c", EXPORT_SCRIPT, d], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
  try:
    assert job.stdout.readline().strip() == "WROTE"
  finally:
    job.kill()
    job.wait(60)
  meta = files.load_meta(d)
  abstract = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32)}
  np.testing.assert_array_equal(files.restore_params(d, abstract, meta)["w"], 1.0)


def _damage(path, offset=0, n=4096):
  with open(path, "r+b") as fh:
    fh.seek(offset)
    fh.write(b"\xff" * min(n, os.path.getsize(path) - offset))


def test_corrupt_param_file_fails_with_one_clear_error(tiny_model_dir, tmp_path):
  d = str(tmp_path / "model")
  shutil.copytree(tiny_model_dir(8), d)
  params_dir = os.path.join(d, "params")
  biggest = max((os.path.join(r, n) for r, _, ns in os.walk(params_dir) for n in ns),
                key=os.path.getsize)
  _damage(biggest)
  with pytest.raises(ValueError, match="does not match the checksum") as e:
    checkpoint.load_model(d)
  assert os.path.basename(biggest) in str(e.value)
  # Through the launcher: one short error, not pages of asynchronous-I/O tracebacks.
  cmd = launcher_cmd("quantize", "quantize", f"--config.checkpoint={d}",
                     f"--outdir={tmp_path / 'run'}", "--config.num_steps=2")
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode != 0 and "does not match the checksum" in proc.stderr
  assert proc.stderr.count("Traceback") <= 1 and "Event loop is closed" not in proc.stderr


def test_model_json_that_disagrees_with_params_fails_at_load(tiny_model_dir, tmp_path):
  d = str(tmp_path / "model")
  shutil.copytree(tiny_model_dir(8), d)
  meta = files.read_json(os.path.join(d, "model.json"), "model")
  meta["model"]["block_out_channels"] = [8, 32]
  files.write_json_atomic(os.path.join(d, "model.json"), meta)
  with pytest.raises(ValueError, match="does not match its model config: param"):
    checkpoint.load_model(d)


def test_non_finite_correction_params_are_refused_everywhere(tmp_path):
  sampler = samplers.ddim(schedules.make_schedule("linear", 1000), 4)
  p = compensation.zero_params(4, 3, sampler.coeffs.t)
  bad = p.replace(beta=p.beta.at[1, 0].set(jnp.nan))
  with pytest.raises(ValueError, match="NaN/inf"):
    compensation.compensate(sampler, bad)
  with pytest.raises(ValueError, match="NaN/inf"):
    compensation.save_params(str(tmp_path / "bad"), bad)
  assert not os.path.exists(tmp_path / "bad")
  compensation.save_params(str(tmp_path / "ok"), p)
  tree = os.path.join(str(tmp_path / "ok"), "tcec")
  target = max((os.path.join(r, n) for r, _, ns in os.walk(tree) for n in ns), key=os.path.getsize)
  _damage(target, n=64)
  with pytest.raises(ValueError, match="does not match the checksum"):
    compensation.load_params(str(tmp_path / "ok"), sampler)
  compensation.save_params(str(tmp_path / "ok2"), p)
  os.remove(os.path.join(str(tmp_path / "ok2"), "tcec.json"))   # the completion marker
  with pytest.raises(FileNotFoundError, match="tcec.json is missing"):
    compensation.load_params(str(tmp_path / "ok2"), sampler)


def test_wrong_phi_shape_is_named(tmp_path):
  sampler = samplers.ddim(schedules.make_schedule("linear", 1000), 4)
  p = compensation.zero_params(4, 3, sampler.coeffs.t)
  with pytest.raises(ValueError, match="phi has shape"):
    compensation.compensate(sampler, p.replace(phi=jnp.ones((4, 5))))


def test_one_step_sampler_denoises_from_pure_noise():
  sch = schedules.make_schedule("linear", 1000)
  for spacing in ("uniform", "quadratic", "leading", "trailing"):
    ts = samplers.ddim(sch, 1, spacing=spacing).coeffs.t
    assert ts.shape == (1,)
    assert int(ts[0]) >= 900, (spacing, ts)


def test_sampler_and_schedule_ranges():
  sch = schedules.make_schedule("linear", 1000)
  with pytest.raises(ValueError, match="applies to DDIM only"):
    samplers.make_sampler("ddpm", sch, 10, eta=0.5)
  with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
    samplers.make_sampler("ddim", sch, 10, eta=-0.1)
  with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\)"):
    schedules.make_schedule("linear", 1000, beta_end=2.0)
  with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\)"):
    schedules.make_schedule("linear", 1000, beta_start=0.0)


def test_int4_packing_and_quant_params_refuse_bad_values():
  with pytest.raises(ValueError, match=r"\[-8, 7\]"):
    quant.pack_int4(jnp.array([9, -9, 100, 7], jnp.int8))
  for scale in (0.0, -1.0, np.nan):
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
      quant.QuantParams(jnp.array([scale, 1.0]), jnp.zeros(2, jnp.int32))


def test_divergence_is_flagged_in_results():
  entries = [{"method": "none", "error_rms_per_step": [0.1, 0.3]},
             {"method": "tcec", "error_rms_per_step": [0.1, 34.0]},
             {"method": "ptqd", "error_rms_per_step": [0.1, float("nan")]}]
  warned = []
  pipeline._flag_divergence(entries, warned.append)  # pylint: disable=protected-access
  assert [e.get("diverged", False) for e in entries] == [False, True, True]
  assert len(warned) == 1 and "tcec (34)" in warned[0] and "ptqd" in warned[0]
