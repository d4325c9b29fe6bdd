"""int8 (int32 accumulate) vs float32 vs bfloat16 matmul and conv, measured side by side.

  python benchmarks/int_ops.py [--repeats 20]

Shapes are those of a small diffusion UNet (batch 32-64 at 8x8..32x32). Prints median
times and the ratios time(dtype) / time(float32) from one run on this machine.
"""

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

DOT_SHAPES = [(64 * 256, 32, 32), (64 * 64, 64, 64), (32 * 64, 256, 256), (64, 128, 512)]
CONV_SHAPES = [(32, 16, 16, 32, 32), (32, 8, 8, 64, 64), (16, 32, 32, 64, 64)]  # N,H,W,Cin,Cout


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _median_time(fn, *args, repeats):
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def dot_fn(dtype):
  acc = jnp.int32 if dtype == jnp.int8 else dtype
  return jax.jit(lambda a, b: lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                                              preferred_element_type=acc))


def conv_fn(dtype):
  acc = jnp.int32 if dtype == jnp.int8 else dtype
  return jax.jit(lambda x, w: lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      preferred_element_type=acc))


def operands(shape_a, shape_b, dtype, key):
  ka, kb = jax.random.split(key)
  if dtype == jnp.int8:
    return (jax.random.randint(ka, shape_a, -127, 128, jnp.int32).astype(jnp.int8),
            jax.random.randint(kb, shape_b, -127, 128, jnp.int32).astype(jnp.int8))
  return (jax.random.normal(ka, shape_a, dtype), jax.random.normal(kb, shape_b, dtype))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=50)
  args = parser.parse_args()
  dev = jax.devices()[0]
  print(f"device: {dev.platform} ({dev.device_kind}), {jax.device_count()} device(s); "
        f"host {cpu_name()}; jax {jax.__version__}")
  dtypes = [("float32", jnp.float32), ("bfloat16", jnp.bfloat16), ("int8", jnp.int8)]
  print("| op | shape | float32 (ms) | bfloat16 / float32 | int8->int32 / float32 |")
  print("|---|---|---|---|---|")
  key = jax.random.key(0)
  for m, k, n in DOT_SHAPES:
    t = {name: _median_time(dot_fn(dt), *operands((m, k), (k, n), dt, key), repeats=args.repeats)
         for name, dt in dtypes}
    print(f"| dot | {m}x{k} @ {k}x{n} | {1e3 * t['float32']:.3f} | "
          f"{t['bfloat16'] / t['float32']:.2f} | {t['int8'] / t['float32']:.2f} |")
  for nb, h, w, ci, co in CONV_SHAPES:
    t = {name: _median_time(conv_fn(dt), *operands((nb, h, w, ci), (3, 3, ci, co), dt, key),
                            repeats=args.repeats) for name, dt in dtypes}
    print(f"| conv3x3 | {nb}x{h}x{w}x{ci} -> {co} | {1e3 * t['float32']:.3f} | "
          f"{t['bfloat16'] / t['float32']:.2f} | {t['int8'] / t['float32']:.2f} |")


if __name__ == "__main__":
  main()
