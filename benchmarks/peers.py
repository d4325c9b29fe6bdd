"""Peers, side by side in one run: the same network sampled by tac_jax and by diffusers.

  python benchmarks/peers.py [--batches 1,32] [--steps 20] [--setting W8A8] [--repeats 5]
                             [--peers jax-float,...,torch-int8] [--outdir DIR]

The embedded default model is written as a diffusers `UNet2DModel` folder
(`convert.export_diffusers`) and quantized once (min-max PTQ at `--setting`, TCEC fitted
on 32 calibration seeds, saved as a tac_jax artifact). Then each peer runs in a process
of its own, so its peak memory is its own, on the same held-out seeds and the same
sampler: 20 DDIM steps, eta 0, leading spacing (diffusers' default), no clipping (tac_jax's `ddim`; diffusers'
`DDIMScheduler` configured to equal it, which the parity line checks).

  jax-float       tac_jax, float32, the whole sampling loop one jitted lax.scan
  jax-bf16        tac_jax, bfloat16 matmuls and convs (float32 between layers and in the
                  sampler): the float baseline accelerators are run with
  jax-fake        tac_jax, fake-quant (quantize-dequantize, float matmuls and convs)
  jax-int         tac_jax, integer kernels (int8 x int8 -> int32 dots and convs)
  jax-int+tcec    the same with the fitted TCEC correction applied at each step
  torch-eager     diffusers UNet2DModel + DDIMScheduler in PyTorch, float32, eager
  torch-compile   the same UNet through torch.compile (inductor; compile time excluded)
  torch-int8      torch.ao.quantization.quantize_dynamic (int8 weights, dynamic int8
                  activations; PyTorch's built-in dynamic quantization covers nn.Linear only,
                  so the convolutions stay float)
  torchao-int8    torchao's Int8DynamicActivationInt8WeightConfig, if torchao is installed
                  (not a dependency of the project: skipped otherwise)

Per peer and batch: milliseconds per sample (median over repeats of a whole sampling run,
divided by the batch; warm-up and compilation excluded), the ratio to jax-float at the
same batch (< 1: faster), the process's peak resident memory, the share of the network's
weights the peer runs in int8, and each quantized peer's PSNR against its own
framework's float samples. Peers run one after another, not interleaved: run it on an
otherwise idle machine.
"""

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

PEERS = ("jax-float", "jax-bf16", "jax-fake", "jax-int", "jax-int+tcec", "torch-eager",
         "torch-compile", "torch-int8", "torchao-int8")
FLOAT_OF = {"jax": "jax-float", "torch": "torch-eager", "torchao": "torch-eager"}
NUM_CALIB, NUM_EVAL = 32, 32   # held-out seeds: at least NUM_EVAL, at least the largest batch


def _peak_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # kB on Linux


# ----------------------------------------------------------------------------- preparation
def prepare(workdir: str, setting: str, steps: int, num_eval: int) -> None:
  """The diffusers folder, the quantized artifact and the evaluation noise, in `workdir`."""
  from tac_jax import files
  from tac_jax.app import artifact, stages
  from tac_jax.app.settings import SETTINGS, SamplerSpec
  from tac_jax.models import convert
  from tac_jax.quant import presets

  model = stages.load_model("default")
  convert.export_diffusers(os.path.join(workdir, "diffusers"), model.params, model.module.config)
  spec = SamplerSpec("ddim", steps, spacing="leading")
  jit = stages.Compiled(model, spec.build(model.schedule))
  noise = stages.seed_noise(0, NUM_CALIB, num_eval, model.shape)
  qm = stages.quantize(model, stages.calibration_batches(jit, model, noise),
                       presets.quant_config(presets.quant_defaults(), *SETTINGS[setting],
                                            "minmax"))
  cal = stages.fit_method("tcec", model, jit, qm, noise)
  artifact.export(os.path.join(workdir, "artifact"), model, qm, spec, cal)
  kernels = {"/".join(p[:-1]): int(np.size(v)) for p, v in _flat(model.params).items()
             if p[-1] == "kernel"}
  share = sum(n for p, n in kernels.items() if p in qm.specs) / sum(kernels.values())
  files.write_json_atomic(os.path.join(workdir, "prep.json"),
                          {"schedule": model.meta["schedule"], "int8_share": share})
  np.save(os.path.join(workdir, "noise.npy"), np.asarray(noise.x_eval))


def _flat(tree):
  from flax import traverse_util
  return traverse_util.flatten_dict(dict(tree))


# ----------------------------------------------------------------------------- the peers
def jax_runner(peer: str, workdir: str, steps: int, x: np.ndarray):
  """() -> samples [B, H, W, C] for a tac_jax peer, and the int8 share of its weights."""
  import jax
  import jax.numpy as jnp
  from tac_jax.app import artifact, stages
  from tac_jax.app.settings import SamplerSpec

  key = jax.random.key(1)
  if peer in ("jax-float", "jax-bf16"):
    model = stages.load_model("default")
    sampler = SamplerSpec("ddim", steps, spacing="leading").build(model.schedule)
    params, apply = model.params, model.module.apply
    if peer == "jax-bf16":
      params = jax.tree_util.tree_map_with_path(
          lambda p, v: v.astype(jnp.bfloat16) if p[-1].key == "kernel" else v, params)
      apply = functools.partial(_bf16_apply, model.module.apply)
    run = stages.final_sampler_run(apply, sampler, None)
    args, share = ({"params": params}, None, x, key), 0.0
  else:
    art = artifact.load(os.path.join(workdir, "artifact"))
    mode = "fake" if peer == "jax-fake" else "int"
    run = stages.final_sampler_run(art.apply_fn(mode), art.sampler,
                                   art.calibration.method if peer.endswith("+tcec") else None)
    args = (art.qmodel.variables, art.calibration.params, x, key)
    share = _read(workdir)["int8_share"] if mode == "int" else 0.0
  return (lambda: np.asarray(jax.block_until_ready(run(*args)))), share


def _bf16_apply(apply, variables, x, t, *cond):
  """`apply` with every Dense / Conv call in bfloat16 (its input cast; its params are), the
  rest (norms, activations, attention softmax) in float32."""
  import flax.linen as nn
  import jax.numpy as jnp

  def cast(next_fun, args, kwargs, context):
    if isinstance(context.module, (nn.Dense, nn.Conv)) and context.method_name == "__call__":
      return next_fun(args[0].astype(jnp.bfloat16), *args[1:], **kwargs).astype(jnp.float32)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(cast):
    return apply(variables, x, t, *cond)


def ddim_scheduler(schedule, steps: int):
  """diffusers' DDIMScheduler equal to tac_jax's `ddim(schedule, steps, spacing="leading")`
  (eta 0, the last step onto abar = 1, no clipping). Not "linspace": diffusers' DDIM step
  always goes to t - T // steps, which is not the next linspace timestep."""
  import diffusers
  if schedule["name"] != "linear":
    raise ValueError(f"peers: schedule {schedule['name']!r} is not mapped to diffusers here.")
  s = diffusers.DDIMScheduler(num_train_timesteps=schedule["num_timesteps"],
                              beta_start=schedule["beta_start"], beta_end=schedule["beta_end"],
                              beta_schedule="linear", clip_sample=False, set_alpha_to_one=True,
                              steps_offset=0, timestep_spacing="leading")
  s.set_timesteps(steps)
  return s


def torch_runner(peer: str, workdir: str, steps: int, x: np.ndarray):
  """() -> samples [B, H, W, C] for a PyTorch peer, and the int8 share of its weights."""
  import diffusers
  import torch

  unet = diffusers.UNet2DModel.from_pretrained(os.path.join(workdir, "diffusers")).eval()
  weights = {n: m.weight.numel() for n, m in unet.named_modules()
             if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
  share = 0.0
  if peer in ("torch-int8", "torchao-int8"):
    linear = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)]
    share = sum(weights[n] for n in linear) / sum(weights.values())
  if peer == "torch-int8":
    unet = torch.ao.quantization.quantize_dynamic(unet, {torch.nn.Linear}, dtype=torch.qint8)
  elif peer == "torchao-int8":
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    quantize_(unet, Int8DynamicActivationInt8WeightConfig())
  elif peer == "torch-compile":
    unet = torch.compile(unet)
  sched = ddim_scheduler(_read(workdir)["schedule"], steps)
  x_T = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))

  def run():
    with torch.inference_mode():
      s = x_T
      for t in sched.timesteps:
        s = sched.step(unet(s, t).sample, t, s, eta=0.0).prev_sample
    return np.transpose(s.numpy(), (0, 2, 3, 1))

  return run, share


def _read(workdir):
  with open(os.path.join(workdir, "prep.json")) as f:
    return json.load(f)


def worker(peer: str, workdir: str, batch: int, steps: int, repeats: int) -> dict:
  x = np.load(os.path.join(workdir, "noise.npy"))[:batch]
  make = jax_runner if peer.startswith("jax") else torch_runner
  run, share = make(peer, workdir, steps, x)
  t0 = time.perf_counter()
  out = run()                           # compiles (jax, torch.compile) / warms up
  first_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = run()
    times.append(time.perf_counter() - t0)
  np.save(os.path.join(workdir, f"{peer}_{batch}.npy"), out)
  return {"ms_per_sample": 1e3 * float(np.median(times)) / batch, "first_s": first_s,
          "peak_mb": _peak_mb(), "int8_share": share}


# ----------------------------------------------------------------------------- the table
def _spawn(args, workdir, *extra):
  cmd = [sys.executable, os.path.abspath(__file__), "--workdir", workdir, "--steps",
         str(args.steps), "--setting", args.setting, "--repeats", str(args.repeats), *extra]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return None, tail
  return json.loads(proc.stdout.strip().splitlines()[-1]), None


def psnr(x: np.ndarray, ref: np.ndarray) -> float:
  """Mean per-sample PSNR in dB of images in [-1, 1] (tac_jax.metrics.psnr)."""
  from tac_jax import metrics
  return float(np.mean(metrics.psnr(x, ref)))


def available(peer: str) -> bool:
  if peer == "torchao-int8":
    import importlib.util
    return importlib.util.find_spec("torchao") is not None
  return True


def machine() -> str:
  """The CPU and the frameworks' versions."""
  from importlib import metadata
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from int_ops import cpu_name   # benchmarks/int_ops.py
  versions = []
  for dist in ("jax", "torch", "diffusers"):
    try:
      versions.append(f"{dist} {metadata.version(dist)}")
    except metadata.PackageNotFoundError:
      pass
  return f"{cpu_name()}, {os.cpu_count()} cores; {', '.join(versions)}"


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--batches", default="1,32")
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--setting", default="W8A8")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--peers", default=",".join(PEERS))
  ap.add_argument("--outdir", default="", help="also write results.md + manifest.json there")
  ap.add_argument("--overwrite", action="store_true", help="replace an earlier --outdir")
  ap.add_argument("--workdir", default="", help=argparse.SUPPRESS)
  ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
  ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker == "prepare":
    prepare(args.workdir, args.setting, args.steps, max(args.batch, NUM_EVAL))
    print("{}")
    return
  if args.worker:
    print(json.dumps(worker(args.worker, args.workdir, args.batch, args.steps, args.repeats)))
    return

  peers = [p.strip() for p in args.peers.split(",") if p.strip()]
  unknown = sorted(set(peers) - set(PEERS))
  if unknown:
    ap.error(f"unknown peers {unknown}; choose from {', '.join(PEERS)}")
  if args.outdir:
    from tac_jax import files
    files.check_output_dir(args.outdir, args.overwrite)
  batches = [int(b) for b in args.batches.split(",")]
  if min(batches) < 1:
    ap.error("--batches must be positive")
  with tempfile.TemporaryDirectory() as workdir:
    print(f"preparing (export to diffusers, {args.setting} min-max PTQ, TCEC fit) ...",
          flush=True)
    _, err = _spawn(args, workdir, "--worker", "prepare", "--batch", str(max(batches)))
    if err:
      sys.exit(f"preparation failed: {err}")
    notes = [f"{p}: skipped (torchao is not installed)" for p in peers if not available(p)]
    peers = [p for p in peers if available(p)]
    rows = []
    for batch in batches:
      base = None
      for peer in peers:
        print(f"  batch {batch:>2}  {peer} ...", flush=True)
        r, err = _spawn(args, workdir, "--worker", peer, "--batch", str(batch))
        if err:
          notes.append(f"{peer} at batch {batch}: failed: {err}")
          continue
        out = np.load(os.path.join(workdir, f"{peer}_{batch}.npy"))
        ref_peer = FLOAT_OF[peer.split("-")[0]]
        ref_file = os.path.join(workdir, f"{ref_peer}_{batch}.npy")
        r["psnr"] = (psnr(out, np.load(ref_file)) if peer != ref_peer and os.path.exists(ref_file)
                     else None)
        base = r["ms_per_sample"] if peer == "jax-float" else base
        r["ratio"] = r["ms_per_sample"] / base if base else None
        rows.append((peer, batch, r))
      a, b = (os.path.join(workdir, f"{p}_{batch}.npy") for p in ("jax-float", "torch-eager"))
      if os.path.exists(a) and os.path.exists(b):
        fa, fb = np.load(a), np.load(b)
        notes.append(f"parity at batch {batch}: tac_jax float vs diffusers float samples "
                     f"{psnr(fa, fb):.1f} dB, max |diff| {np.max(np.abs(fa - fb)):.1e}")
  lines = [f"Default model (16x16x3 UNet), {args.steps} DDIM steps, {args.setting} min-max; "
           f"{machine()}; repeats {args.repeats}.", "",
           "| peer | batch | ms / sample | vs jax-float | first call s | peak RSS MB "
           "| weights in int8 | PSNR vs own float dB |", "|---|---|---|---|---|---|---|---|"]
  for peer, batch, r in rows:
    ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
    p = f"{r['psnr']:.2f}" if r["psnr"] is not None else "-"
    lines.append(f"| {peer} | {batch} | {r['ms_per_sample']:.1f} | {ratio} | {r['first_s']:.1f} "
                 f"| {r['peak_mb']:.0f} | {100 * r['int8_share']:.0f} % | {p} |")
  text = "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"
  print(text)
  if args.outdir:
    config = {k: getattr(args, k) for k in ("batches", "steps", "setting", "repeats", "peers")}
    print(f"wrote {files.write_report(args.outdir, text, config)}")


if __name__ == "__main__":
  main()
