"""Sharded sampling and calibration on 4 forced CPU devices equal the single-device run (the
main job on two processes: tests/test_launchers.py).

XLA_FLAGS must be set before JAX starts, so the checks run in a child process.
"""

import os
import subprocess
import sys
import textwrap

from configs_loader import ROOT, xla_env

SCRIPT = textwrap.dedent("""
    import chex, jax, jax.numpy as jnp, numpy as np
    from tac_jax import compensation, parallel, quant
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
        nets = compensation.Net(fp, W), compensation.Net(fq, W)
        p1 = compensation.calibrate(*nets, sampler, x, key, "tcec").params
        cal4 = parallel.sharded_calibrate(*nets, sampler, x, key, mesh, "tcec")
        assert cal4.method == "tcec"
        p4 = cal4.params
        chex.assert_trees_all_equal_shapes_and_dtypes(p4, p1)   # every field, incl. optional
        chex.assert_trees_all_close(p4, p1, rtol=1e-4, atol=1e-5)
    # FSDP-style params: the large weight split over the devices, samples unchanged.
    big = {"w": jax.random.normal(jax.random.key(2), (48, 48)) / 7, "b": jnp.ones(3)}
    dense = lambda v, x, t: jnp.tanh((x.reshape(x.shape[0], -1) @ v["w"]).reshape(x.shape)
                                     + v["b"] * jnp.cos(t.astype(jnp.float32) / 1000)[:, None, None, None])
    placed = parallel.shard_params(big, mesh, min_size=1024)
    assert placed["w"].sharding.spec == jax.sharding.PartitionSpec("data", None)
    assert placed["b"].sharding.spec == jax.sharding.PartitionSpec()
    assert placed["w"].addressable_shards[0].data.shape == (12, 48)
    run = parallel.make_sharded_sampler(dense, sampler, mesh)
    np.testing.assert_allclose(run(placed, parallel.shard_batch(x, mesh), key),
                               samplers.sample(dense, big, sampler, x, key)[0].x,
                               rtol=1e-5, atol=1e-5)
    try:
        parallel.sharded_sample(fq, W, sampler, x[:6], key, mesh)
    except ValueError as e:
        assert "does not divide over 4 devices" in str(e), e
    else:
        raise AssertionError("a batch of 6 on 4 devices was accepted")
    import sys
    sys.path.insert(0, "tests")
    from configs_loader import load_config
    from tac_jax.app import pipeline
    config = load_config("quantize")
    config.update(dict(checkpoint=sys.argv[1], num_calib=8, num_eval=6, data_parallel=True))
    try:
        pipeline.run(config, sys.argv[2], verbose=False)
    except ValueError as e:
        assert "config.num_eval=6 does not divide over 4 devices" in str(e), e
    else:
        raise AssertionError("num_eval=6 on 4 devices was accepted")
    print("SHARDED_OK")
""")


def test_sharded_sampling_and_calibration_match_single_device(tiny_model_dir, tmp_path):
  """Sampling and calibration sharded over 4 devices equal one device; the main job refuses
  a seed count that does not divide over them, before it writes anything."""
  env = xla_env(xla_force_host_platform_device_count=4)
  proc = subprocess.run([sys.executable, "-c", SCRIPT, tiny_model_dir(8), str(tmp_path / "run")],
                        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
  assert proc.returncode == 0 and "SHARDED_OK" in proc.stdout, proc.stderr[-3000:]
  assert not os.path.exists(tmp_path / "run")


def test_distributed_flags_need_distributed():
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "quantize.py"), "--num_processes=2"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert proc.returncode != 0 and "without --distributed" in proc.stderr
