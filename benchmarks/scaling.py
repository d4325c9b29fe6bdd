"""Data-parallel scaling: samples/s of float vs int8-path sampling on 1, 2 and 4 devices.

  python benchmarks/scaling.py [--devices 1,2,4] [--batch 64] [--steps 20] [--repeats 5]

On a CPU-only machine the devices are forced host devices
(XLA_FLAGS=--xla_force_host_platform_device_count, set here before JAX starts), which
share the machine's cores: the speed-up is bounded by the physical core count. On GPUs /
TPUs the same script uses the real devices. Everything is timed in one process, side by
side (the configurations take turns each repeat), and printed as ratios.
"""

import argparse
import os
import sys
import time


def parse():
  ap = argparse.ArgumentParser()
  ap.add_argument("--devices", default="1,2,4")
  ap.add_argument("--setting", default="W8A8")
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--repeats", type=int, default=5)
  return ap.parse_args()


def main():
  args = parse()
  counts = [int(c) for c in args.devices.split(",")]
  if "jax" not in sys.modules and "--xla_force_host_platform_device_count" not in os.environ.get(
      "XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={max(counts)}")
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  import common  # pylint: disable=import-outside-toplevel
  from tac_jax import parallel  # pylint: disable=import-outside-toplevel

  if max(counts) > jax.device_count():
    sys.exit(f"asked for {max(counts)} devices, only {jax.device_count()} are visible.")
  s = common.quantized_default_model(args.setting, args.steps, args.batch)
  var_fp = {"params": s.params}
  runs = {}
  for n in counts:
    mesh = parallel.data_mesh(jax.devices()[:n])
    x = parallel.shard_batch(s.x, mesh)
    for mode, fn, variables in (("float", s.module.apply, var_fp),
                                ("int8", s.qmodel.apply_fn("int"), s.qmodel.variables)):
      run = parallel.make_sharded_sampler(fn, s.sampler, mesh)
      v = parallel.replicate(variables, mesh)
      jax.block_until_ready(run(v, x, s.key))  # compile
      runs[(n, mode)] = (run, v, x, [])
  for _ in range(args.repeats):  # configurations take turns, so machine drift is shared
    for (n, mode), (run, v, x, times) in runs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(run(v, x, s.key))
      times.append(time.perf_counter() - t0)

  rate = {k: args.batch / float(np.median(r[3])) for k, r in runs.items()}
  dev = jax.devices()[0]
  print(f"device: {jax.device_count()} x {dev.platform} ({dev.device_kind}), {os.cpu_count()} "
        f"CPU cores; default model, {args.setting}, DDIM {args.steps} steps, batch {args.batch}, "
        f"median of {args.repeats}")
  print("| devices | float samples/s | int8 samples/s | int8 / float | float vs 1 device | "
        "int8 vs 1 device |")
  print("|---|---|---|---|---|---|")
  base = counts[0]
  for n in counts:
    f, i = rate[(n, "float")], rate[(n, "int8")]
    print(f"| {n} | {f:.1f} | {i:.1f} | {i / f:.2f} | {f / rate[(base, 'float')]:.2f} | "
          f"{i / rate[(base, 'int8')]:.2f} |")


if __name__ == "__main__":
  main()
