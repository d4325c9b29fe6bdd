"""Compensation overhead: sampling time with and without TCEC, measured side by side.

  python benchmarks/overhead.py [--setting W8A8] [--mode int] [--repeats 30] [--batch 64]

Quantizes the embedded default model, calibrates TCEC, then times many interleaved
(ABBA order) runs of the plain and the compensated sampler, and the compensation ops
alone. Prints medians and the ratios.
"""

import argparse
import time

import jax
import numpy as np

import common  # benchmarks/common.py
from tac_jax.app import stages
from tac_jax.app.settings import SETTINGS


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--setting", default="W8A8", choices=sorted(SETTINGS))
  ap.add_argument("--mode", default="int", choices=["fake", "int"])
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=30)
  args = ap.parse_args()

  s = common.quantized_default_model(args.setting, args.steps, args.batch)
  qm, tcec, x, key, sampler = s.qmodel, s.tcec, s.x, s.key, s.sampler
  apply_fn = qm.apply_fn(args.mode)
  plain = stages.final_sampler_run(apply_fn, sampler, None)
  comp = stages.final_sampler_run(apply_fn, sampler, "tcec")
  ops = stages.compensation_only(sampler)
  eps_seq = jax.random.normal(jax.random.key(2), (args.steps,) + x.shape)
  for f, a_ in [(plain, (qm.variables, tcec, x, key)), (comp, (qm.variables, tcec, x, key)),
                (ops, (tcec, eps_seq, x))]:
    jax.block_until_ready(f(*a_))

  def timed(f, *a_):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*a_))
    return time.perf_counter() - t0

  tp, tc, to = [], [], []
  for r in range(args.repeats):
    order = [(plain, tp), (comp, tc)] if r % 2 == 0 else [(comp, tc), (plain, tp)]
    for f, acc in order:
      acc.append(timed(f, qm.variables, tcec, x, key))
    to.append(timed(ops, tcec, eps_seq, x))
  mp, mc_, mo = (float(np.median(v)) for v in (tp, tc, to))
  dev = jax.devices()[0]
  print(f"device: {dev.platform} ({dev.device_kind}); {args.setting} {args.mode} path, "
        f"DDIM {args.steps} steps, batch {args.batch}, {args.repeats} interleaved repeats")
  print(f"plain sampling        {1e3 * mp:9.2f} ms (median; IQR {1e3 * np.subtract(*np.percentile(tp, [75, 25])):.2f} ms)")
  print(f"with TCEC             {1e3 * mc_:9.2f} ms (median; IQR {1e3 * np.subtract(*np.percentile(tc, [75, 25])):.2f} ms)")
  print(f"compensation ops only {1e3 * mo:9.3f} ms")
  print(f"overhead end to end (TCEC / plain - 1): {100 * (mc_ / mp - 1):+.2f} % (medians), "
        f"{100 * (min(tc) / min(tp) - 1):+.2f} % (fastest runs)")
  print(f"overhead of the ops alone (ops / plain): {100 * mo / mp:.3f} %")


if __name__ == "__main__":
  main()
