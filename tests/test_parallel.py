"""Sharded sampling, calibration and the main job on 4 forced CPU devices equal the
single-device run.

XLA_FLAGS must be set before JAX starts, so the checks run in a child process.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

from configs_loader import launcher_cmd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import chex, jax, jax.numpy as jnp, numpy as np
    from tac_jax import errors, parallel, quant
    from tac_jax.diffusion import make_schedule, samplers

    assert jax.device_count() == 4, jax.devices()
    mesh = parallel.data_mesh()
    sched = make_schedule("linear", 1000)
    W = {"w": jnp.array([0.9, 1.1, 1.3])}

    def fp(v, x, t):
        g = 0.5 + 0.4 * jnp.cos(t.astype(jnp.float32) / 1000.0)
        return jnp.tanh(g[:, None, None, None] * v["w"] * x * 1.5)

    def fq(v, x, t):
        return quant.fake_quant(fp(v, x, t), quant.params_from_range(-1.0, 1.0, 3, symmetric=False))

    x = jax.random.normal(jax.random.key(0), (16, 4, 4, 3))
    key = jax.random.key(1)
    for sampler in [samplers.ddim(sched, 6), samplers.ddpm(sched, 6)]:
        single = samplers.sample(fq, W, sampler, x, key)[0].x
        sharded = parallel.sharded_sample(fq, W, sampler, x, key, mesh)
        assert len(sharded.sharding.device_set) == 4
        np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5)
        p1 = errors.calibrate(fp, W, fq, W, sampler, x, key, "tcec")
        p4 = parallel.sharded_calibrate(fp, W, fq, W, sampler, x, key, mesh, "tcec")
        chex.assert_trees_all_equal_shapes_and_dtypes(p4, p1)   # every field, incl. optional
        chex.assert_trees_all_close(p4, p1, rtol=1e-4, atol=1e-5)
    try:
        parallel.sharded_sample(fq, W, sampler, x[:6], key, mesh)
    except ValueError as e:
        assert "does not divide over 4 devices" in str(e), e
    else:
        raise AssertionError("a batch of 6 on 4 devices was accepted")
    print("SHARDED_OK")
""")


def test_sharded_sampling_and_calibration_match_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                        timeout=600, cwd=ROOT, env=env)
  assert proc.returncode == 0 and "SHARDED_OK" in proc.stdout, proc.stderr[-3000:]


PIPELINE_SCRIPT = textwrap.dedent("""
    import json, sys, jax, numpy as np
    sys.path.insert(0, "tests")
    from conftest import load_config
    from tac_jax import pipeline

    assert jax.device_count() == 4, jax.devices()
    model, single, out = sys.argv[1], sys.argv[2], sys.argv[3]
    config = load_config("quantize")
    # The shared tiny run's config (tests/conftest.py), restricted to W4A4 and none / tcec.
    config.update(dict(checkpoint=model, num_steps=3, num_calib=8, num_eval=8,
                       settings="W4A4", ptq="minmax", methods="none,tcec",
                       int_path=False, timing_repeats=0, data_parallel=True))
    runs = pipeline.run(config, out + "/dp", verbose=True)["runs"]
    with open(single) as f:
        ref = {r["method"]: r for r in json.load(f)["runs"] if r["setting"] == "W4A4"}
    for b in runs:
        a = ref[b["method"]]
        np.testing.assert_allclose(b["psnr_fake"]["mean"], a["psnr_fake"]["mean"], atol=1e-2)
        np.testing.assert_allclose(b["error_rms_per_step"], a["error_rms_per_step"], rtol=1e-3)
    config.num_eval = 6
    try:
        pipeline.run(config, out + "/bad", verbose=False)
    except ValueError as e:
        assert "num_eval=6 does not divide over 4 devices" in str(e), e
    else:
        raise AssertionError("num_eval=6 on 4 devices was accepted")
    print("PIPELINE_SHARDED_OK")
""")


def test_main_job_data_parallel_matches_single_device(tiny_runs, tmp_path):
  """The shared single-device tiny run, repeated with its seeds split over 4 devices."""
  outdir, proc = tiny_runs["main"]
  assert proc.returncode == 0, proc.stderr[-2000:]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", PIPELINE_SCRIPT, tiny_runs["model"],
                         os.path.join(outdir, "results.json"), str(tmp_path)],
                        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
  assert proc.returncode == 0 and "PIPELINE_SHARDED_OK" in proc.stdout, (
      proc.stdout[-2000:] + proc.stderr[-3000:])
  assert "data parallel over 4 devices" in proc.stdout


def _free_port() -> int:
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_main_job_on_two_processes(tiny_runs, tmp_path):
  """--distributed: two processes x two CPU devices each, one global mesh (as on a pod); the
  numbers equal the shared single-device tiny run's (W8A8, plain PTQ)."""
  single_dir, single = tiny_runs["main"]
  assert single.returncode == 0, single.stderr[-2000:]
  out = str(tmp_path / "run")
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  cmd = launcher_cmd("quantize", "quantize",
         f"--config.checkpoint={tiny_runs['model']}", f"--outdir={out}",
         "--config.num_steps=3", "--config.num_calib=8", "--config.num_eval=8",
         "--config.settings=W8A8", "--config.ptq=minmax", "--config.methods=none",
         "--config.timing_repeats=0", "--config.int_path=False", "--distributed",
         f"--coordinator_address=localhost:{port}", "--num_processes=2")
  procs = [subprocess.Popen([*cmd, f"--process_id={i}"], cwd=ROOT, env=env, text=True,
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
  got = res["runs"][0]
  want = ref[("W8A8", "none")]
  np.testing.assert_allclose(got["psnr_fake"]["mean"], want["psnr_fake"]["mean"], atol=1e-2)
  np.testing.assert_allclose(got["error_rms_per_step"], want["error_rms_per_step"], rtol=1e-3)


def test_distributed_flags_need_distributed():
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "quantize.py"), "--num_processes=2"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert proc.returncode != 0 and "without --distributed" in proc.stderr
