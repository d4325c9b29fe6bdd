"""The main job: quantize a diffusion UNet, calibrate compensation, evaluate against float.

For every PTQ observer x setting (W8A8, W4A8, W4A4):
  1. PTQ: quantize the model, with activation ranges from the float sampler's
     trajectories on the calibration seeds (uniform over the sampler's timesteps).
  2. Propagation: a joint float / quantized run; channel gains phi are fitted on the
     calibration seeds, the first-order model is checked on the evaluation seeds.
  3. Compensation: fit each variant (ptqd, per_step, tcec) on the calibration seeds.
  4. Evaluation on held-out seeds with noise shared with the float run: PSNR / SSIM of
     the final samples against the float samples, fake-quant and integer path.
  5. Overhead: sampling time with and without compensation, measured side by side.
Writes results.json, results.md, PNG grids and per-step error plots into `outdir`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tac_jax import checkpoint as ckpt_lib
from tac_jax import errors, metrics, parallel, quant, viz
from tac_jax.diffusion import samplers
from tac_jax.diffusion.schedules import make_schedule
from tac_jax.errors import propagation

SETTINGS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4)}


class Progress:
  def __init__(self, verbose: bool = True):
    self.t0 = time.time()
    self.verbose = verbose

  def __call__(self, msg: str):
    if self.verbose:
      print(f"[{time.time() - self.t0:7.1f}s] {msg}", flush=True)


def parse_list(value, allowed=None, what="value") -> List[str]:
  items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
  if not items:
    raise ValueError(f"empty list of {what}s.")
  if allowed is not None:
    bad = [v for v in items if v not in allowed]
    if bad:
      raise ValueError(f"unknown {what} {bad}; choose from {sorted(allowed)}.")
  return items


class Jitted:
  """The job's jitted functions, keyed on the (static) network apply function, so models
  that share one (same bits, different observers) share the compiled code."""

  def __init__(self, apply_fp, sampler: samplers.Sampler):
    self.sampler = sampler

    def run(apply_fn, variables, params, x_T, key):
      state, traj = samplers.sample(apply_fn, variables, errors.compensate(sampler, params), x_T,
                                    key, return_trajectory=True)
      return state.x, traj, state.error.e_hat

    def joint(apply_q, var_fp, var_q, x_T, key):
      return propagation.joint_run(apply_fp, var_fp, apply_q, var_q, sampler, x_T, key)

    def calibrate(apply_q, fit, var_fp, var_q, x_T, key, phi):
      return errors.calibrate(apply_fp, var_fp, apply_q, var_q, sampler, x_T, key, fit, phi=phi,
                              check_finite=False)

    self.run = jax.jit(run, static_argnums=0)
    self.joint = jax.jit(joint, static_argnums=0)
    self.calibrate = jax.jit(calibrate, static_argnums=(0, 1))


def make_final_runner(apply_fn, sampler: samplers.Sampler, compensated: bool):
  """Jitted (variables, params, x_T, key) -> x_0 only (for timing; plain ignores params)."""

  @jax.jit
  def run(variables, params, x_T, key):
    s = errors.compensate(sampler, params) if compensated else sampler
    return samplers.sample(apply_fn, variables, s, x_T, key)[0].x

  return run


def make_compensation_only(sampler: samplers.Sampler):
  """The compensator's own work for a whole run (correction + ErrorState), no network."""
  c = sampler.coeffs

  @jax.jit
  def run(params, eps_seq, x_T):
    def body(carry, inputs):
      x, e_hat = carry
      i, eps = inputs
      d_hat = params.K[i] * eps + params.beta[i]
      if params.G is not None:
        d_hat = d_hat + params.G[i] * e_hat
      return (x - c.b[i] * d_hat, params.phi[i] * e_hat + c.b[i] * d_hat), None
    (x, e_hat), _ = jax.lax.scan(body, (x_T, jnp.zeros_like(x_T)),
                                 (jnp.arange(c.num_steps), eps_seq))
    return x, e_hat

  return run


def _time(fn, *args, repeats: int) -> List[float]:
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    out.append(time.perf_counter() - t0)
  return out


def measure_overhead(apply_fn, sampler, variables, params, x_T, key, repeats: int,
                     comp_only: Optional[Callable] = None) -> Dict[str, float]:
  """Median times of plain vs compensated sampling, interleaved to share machine noise,
  and of the compensation ops alone (same shapes, no network).

  `overhead_ab` is the honest end-to-end figure but on a busy CPU its noise (a few %)
  exceeds the effect; `overhead_ops` times the extra work in isolation.
  """
  plain = make_final_runner(apply_fn, sampler, compensated=False)
  compensated = make_final_runner(apply_fn, sampler, compensated=True)
  comp_only = comp_only or make_compensation_only(sampler)
  eps_seq = jax.random.normal(jax.random.key(0), (sampler.coeffs.num_steps,) + x_T.shape)
  jax.block_until_ready(plain(variables, params, x_T, key))
  jax.block_until_ready(compensated(variables, params, x_T, key))
  jax.block_until_ready(comp_only(params, eps_seq, x_T))
  t_plain, t_comp, t_ops = [], [], []
  for r in range(repeats):  # ABBA order, so drifts in machine speed cancel
    for which in ((0, 1) if r % 2 == 0 else (1, 0)):
      if which == 0:
        t_plain += _time(plain, variables, params, x_T, key, repeats=1)
      else:
        t_comp += _time(compensated, variables, params, x_T, key, repeats=1)
    t_ops += _time(comp_only, params, eps_seq, x_T, repeats=3)
  med = lambda v: float(np.median(v))
  return {"plain_s": med(t_plain), "compensated_s": med(t_comp), "compensation_ops_s": med(t_ops),
          "overhead_ab": med(t_comp) / med(t_plain) - 1.0,
          "overhead_ops": med(t_ops) / med(t_plain)}


def _stats(v) -> Dict[str, float]:
  v = parallel.to_host(v).astype(np.float64)
  return {"mean": float(v.mean()), "std": float(v.std())}


def load(config) -> Dict[str, Any]:
  directory = config.checkpoint or ckpt_lib.default_model_dir()
  module, params, meta = ckpt_lib.load_model(directory)
  schedule = make_schedule(**meta.get("schedule", {}))  # make_schedule's defaults otherwise
  return {"module": module, "params": params, "meta": meta, "schedule": schedule,
          "checkpoint": directory}


def seed_noise(seed: int, num_calib: int, num_eval: int, shape):
  """(x_cal, key_cal, x_eval, key_eval): the starting noise and step-noise keys of the
  calibration and evaluation seeds derived from `seed` (disjoint streams)."""
  k_cal, k_eval = jax.random.split(jax.random.key(seed))
  x_cal = jax.random.normal(jax.random.fold_in(k_cal, 0), (num_calib,) + tuple(shape))
  x_eval = jax.random.normal(jax.random.fold_in(k_eval, 0), (num_eval,) + tuple(shape))
  return x_cal, jax.random.fold_in(k_cal, 1), x_eval, jax.random.fold_in(k_eval, 1)


def quant_config(config, w_bits: int, a_bits: int, observer: str) -> quant.QuantConfig:
  q = config.quant
  return quant.QuantConfig(w_bits=w_bits, a_bits=a_bits, w_per_channel=q.w_per_channel,
                           w_observer=observer, a_observer=observer, a_symmetric=q.a_symmetric,
                           time_groups=q.time_groups, keep_8bit=q.keep_8bit, exclude=q.exclude)


@dataclasses.dataclass
class _Context:
  """What every setting of one run shares (model, sampler, seeds, float reference)."""
  config: Any
  log: Progress
  module: Any
  params: Any
  sampler: samplers.Sampler
  jitted: Jitted
  comp_only: Callable
  calib: List[Any]
  x_cal: jax.Array
  key_cal: jax.Array
  x_eval: jax.Array
  key_eval: jax.Array
  x_fp: jax.Array
  fp_out: jax.Array
  num_timesteps: int
  variants: List[str]
  best: str
  samples: Dict[str, Any] = dataclasses.field(default_factory=dict)


def evaluate_setting(ctx: _Context, setting: str, obs: str, timed: bool) -> List[Dict[str, Any]]:
  """PTQ, propagation analysis, calibration of every variant and evaluation of one setting."""
  config, sampler, log = ctx.config, ctx.sampler, ctx.log
  c = sampler.coeffs
  N, C = c.num_steps, ctx.x_eval.shape[-1]
  var_fp = {"params": ctx.params}
  w_bits, a_bits = SETTINGS[setting]
  tag = f"{setting}_{obs}"
  qm = quant.quantize_model(ctx.module, ctx.params, ctx.calib,
                            quant_config(config, w_bits, a_bits, obs), ctx.num_timesteps)
  mem = qm.memory_report(ctx.params)
  fq = qm.apply_fn("fake")
  log(f"{tag}: PTQ done ({len(qm.specs)} layers, weights {mem['layers_float32'] / 1e6:.2f} MB"
      f" float -> {mem['layers_stored'] / 1e6:.2f} MB)")

  trace_cal = ctx.jitted.joint(fq, var_fp, qm.variables, ctx.x_cal, ctx.key_cal)
  phi = propagation.fit_channel_gains(trace_cal, c.a, c.b)
  trace = ctx.jitted.joint(fq, var_fp, qm.variables, ctx.x_eval, ctx.key_eval)
  report = propagation.propagation_report(trace, c.a, c.b, phi)
  log(f"{tag}: propagation model: final error RMS {report['measured_rms'][-1]:.4f}, closed "
      f"form corr {np.mean(report['closed_form_corr'][1:]):.3f}")

  fitted = {}
  for v in ctx.variants:
    fit = errors.get_fit_config(v)
    if fit is None:
      fitted[v] = errors.zero_params(N, C, c.t, phi)
      continue
    fitted[v] = errors.compensation.check_params_finite(
        ctx.jitted.calibrate(fq, fit, var_fp, qm.variables, ctx.x_cal, ctx.key_cal, phi),
        f"{tag}/{v} calibration")
  log(f"{tag}: calibrated {', '.join(v for v in ctx.variants if v != 'none')}")

  modes = ["fake", "int"] if config.int_path else ["fake"]
  entries = []
  for v in ctx.variants:
    entry = {"setting": setting, "observer": obs, "variant": v, "memory_bytes": mem}
    for mode in modes:
      x_q, traj_q, _ = ctx.jitted.run(qm.apply_fn(mode), qm.variables, fitted[v], ctx.x_eval,
                                      ctx.key_eval)
      entry[f"psnr_{mode}"] = _stats(metrics.psnr(x_q, ctx.x_fp))
      entry[f"ssim_{mode}"] = _stats(metrics.ssim(x_q, ctx.x_fp))
      if mode == "fake":
        ctx.samples[(tag, v)] = parallel.to_host(x_q)
        entry["error_rms_per_step"] = parallel.to_host(propagation.rms_per_step(
            samplers.step_outputs(traj_q, x_q) - ctx.fp_out)).tolist()
    if v == "none":
      entry["propagation"] = {k: parallel.to_host(a).tolist() for k, a in report.items()}
    entries.append(entry)
  by_variant = {e["variant"]: e for e in entries}
  if timed and config.timing_repeats > 0:
    timing = measure_overhead(qm.apply_fn(modes[-1]), sampler, qm.variables, fitted[ctx.best],
                              ctx.x_eval, ctx.key_eval, config.timing_repeats, ctx.comp_only)
    timing["mode"] = modes[-1]
    by_variant[ctx.best]["timing"] = timing  # the shown variant; others do as much or less
    log(f"{tag}: overhead {100 * timing['overhead_ab']:+.2f}% (A/B), "
        f"{100 * timing['overhead_ops']:.3f}% (compensation ops alone), {modes[-1]} path")
  line = ", ".join(f"{v} {by_variant[v]['psnr_fake']['mean']:.2f}" for v in ctx.variants)
  log(f"{tag}: PSNR vs float (dB): {line}")
  return entries


def save_figures(ctx: _Context, entries: List[Dict[str, Any]], outdir: str) -> None:
  """Sample grid (float / PTQ / PTQ + best variant) and the per-step error plot."""
  by_variant = {e["variant"]: e for e in entries}
  setting, obs = entries[0]["setting"], entries[0]["observer"]
  tag, best = f"{setting}_{obs}", ctx.best
  viz.save_comparison(
      os.path.join(outdir, f"grid_{tag}.png"),
      {"float": np.clip(ctx.samples["float"], -1, 1),
       f"PTQ {setting}": np.clip(ctx.samples[(tag, "none")], -1, 1),
       f"+{best.upper()}": np.clip(ctx.samples[(tag, best)], -1, 1)})
  report = by_variant["none"]["propagation"]
  curves = {"measured, no compensation": report["measured_rms"],
            "closed form (diag phi), predicted": report["closed_form_rms"],
            f"measured, {best}": by_variant[best]["error_rms_per_step"]}
  viz.save_error_plot(os.path.join(outdir, f"errors_{tag}.png"), curves,
                      np.asarray(ctx.sampler.coeffs.t),
                      f"{setting} ({obs} PTQ): cumulative error per step")


def run(config: ml_collections.ConfigDict, outdir: str, verbose: bool = True) -> Dict[str, Any]:
  log = Progress(verbose)
  settings = parse_list(config.settings, SETTINGS, "setting")
  observer_names = parse_list(config.observers, quant.observers.OBSERVERS, "observer")
  variants = parse_list(config.variants, errors.VARIANTS, "variant")
  if "none" not in variants:
    variants = ["none"] + variants
  if config.num_calib < 1 or config.num_eval < 1:
    raise ValueError("num_calib and num_eval must be >= 1.")
  writer = jax.process_index() == 0   # multi-host: one process writes the files
  if writer:
    os.makedirs(outdir, exist_ok=True)

  m = load(config)
  module, params, schedule = m["module"], m["params"], m["schedule"]
  mc = module.config
  log(f"model {m['checkpoint']}: {sum(x.size for x in jax.tree.leaves(params)):,} params, "
      f"{mc.sample_size}x{mc.sample_size}x{mc.in_channels}")
  sampler = samplers.make_sampler(config.sampler, schedule, config.num_steps, config.eta,
                                  config.spacing)
  N = sampler.coeffs.num_steps
  shape = (mc.sample_size, mc.sample_size, mc.in_channels)
  x_cal, key_cal, x_eval, key_eval = seed_noise(config.seed, config.num_calib,
                                                 config.num_eval, shape)
  mesh = parallel.auto_mesh(config.get("data_parallel", True))
  if mesh is not None:  # data parallel: seeds split over devices, everything else replicated
    n = mesh.shape[parallel.DATA_AXIS]
    for name in ("num_calib", "num_eval"):
      parallel.check_divisible(config[name], mesh, f"config.{name}={config[name]}",
                               " or --config.data_parallel=False")
    x_cal, x_eval = parallel.shard_batch(x_cal, mesh), parallel.shard_batch(x_eval, mesh)
    params = parallel.replicate(params, mesh)
    log(f"data parallel over {n} devices ({jax.process_count()} process(es)): "
        f"{config.num_calib // n} calibration + {config.num_eval // n} evaluation seeds each")

  fp = module.apply
  var_fp = {"params": params}
  none_params = errors.zero_params(N, mc.out_channels, sampler.coeffs.t)
  jitted = Jitted(fp, sampler)
  comp_only = make_compensation_only(sampler)
  x_fp_cal, traj_fp_cal, _ = jitted.run(fp, var_fp, none_params, x_cal, key_cal)
  x_fp, traj_fp, _ = jitted.run(fp, var_fp, none_params, x_eval, key_eval)
  fp_out = samplers.step_outputs(traj_fp, x_fp)
  calib = samplers.calibration_batches(traj_fp_cal, sampler.coeffs)
  log(f"float samples: {config.num_calib} calibration + {config.num_eval} evaluation seeds, "
      f"{config.sampler} {N} steps")

  ctx = _Context(config=config, log=log, module=module, params=params, sampler=sampler,
                 jitted=jitted, comp_only=comp_only, calib=calib, x_cal=x_cal, key_cal=key_cal,
                 x_eval=x_eval, key_eval=key_eval, x_fp=x_fp, fp_out=fp_out,
                 num_timesteps=schedule.num_timesteps, variants=variants,
                 best=variants[-1])
  # Every process gathers what the writer needs (a gather is a collective: all must call it).
  ctx.samples["float"] = parallel.to_host(x_fp)
  results: Dict[str, Any] = {"config": config.to_dict(), "checkpoint": m["checkpoint"],
                             "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
                             "processes": jax.process_count(),
                             "runs": []}
  grids: Dict[str, str] = {}
  for obs in observer_names:
    for setting in settings:
      entries = evaluate_setting(ctx, setting, obs, timed=obs == observer_names[0])
      results["runs"] += entries
      grids[f"{setting}_{obs}"] = os.path.join(outdir, f"grid_{setting}_{obs}.png")
      if writer:
        save_figures(ctx, entries, outdir)

  results["grids"] = grids
  if not writer:
    return results
  table = results_table(results)
  with open(os.path.join(outdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(outdir, "results.md"), "w") as f:
    f.write(table)
  log(f"wrote {outdir}/results.json, results.md, {len(grids)} grids and error plots")
  if verbose:
    print(table)
  return results


def results_table(results: Dict[str, Any]) -> str:
  runs = results["runs"]
  has_int = any("psnr_int" in r for r in runs)
  head = "| setting | PTQ | compensation | PSNR fake-quant (dB) | SSIM |"
  head += " PSNR int path (dB) |" if has_int else ""
  head += " gain over PTQ (dB) | overhead (A/B, ops only) | layer weights (MB) |"
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  base = {(r["setting"], r["observer"]): r["psnr_fake"]["mean"] for r in runs if r["variant"] == "none"}
  for r in runs:
    pf = r["psnr_fake"]
    row = f"| {r['setting']} | {r['observer']} | {r['variant']} | {pf['mean']:.2f} ± {pf['std']:.2f} |"
    row += f" {r['ssim_fake']['mean']:.4f} |"
    if has_int:
      row += f" {r['psnr_int']['mean']:.2f} |" if "psnr_int" in r else " - |"
    gain = pf["mean"] - base[(r["setting"], r["observer"])]
    row += f" {gain:+.2f} |" if r["variant"] != "none" else " - |"
    t = r.get("timing")
    if t:
      row += f" {100 * t['overhead_ab']:+.2f}%, {100 * t['overhead_ops']:.3f}% |"
    else:
      row += " - |"
    mem = r["memory_bytes"]
    row += f" {mem['layers_float32'] / 1e6:.2f} -> {mem['layers_stored'] / 1e6:.2f} |"
    lines.append(row)
  return "\n".join(lines) + "\n"
