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
from tac_jax import data, errors, metrics, parallel, quant, viz
from tac_jax.diffusion import samplers
from tac_jax.diffusion.schedules import make_schedule
from tac_jax.errors import propagation
from tac_jax.metrics import frechet

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

  def __init__(self, apply_fp, sampler: samplers.Sampler, schedule=None):
    self.sampler = sampler

    def run(apply_fn, variables, params, x_T, key):
      state, traj = samplers.sample(apply_fn, variables, errors.compensate(sampler, params), x_T,
                                    key, return_trajectory=True)
      return state.x, traj, state.error.e_hat

    def joint(apply_q, var_fp, var_q, x_T, key):
      return propagation.joint_run(apply_fp, var_fp, apply_q, var_q, sampler, x_T, key)

    def calibrate(apply_q, fit, var_fp, var_q, x_T, key, phi):
      return errors.calibrate(apply_fp, var_fp, apply_q, var_q, sampler, x_T, key, fit, phi=phi,
                              check_finite=False, schedule=schedule)

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
  """The compensated sampler's steps for a whole run with given network outputs, no
  network: the correction, the error-state update and the step itself (an upper bound of
  the compensation's own work), through the same `errors.compensate` as sampling."""

  @jax.jit
  def run(params, eps_seq, x_T):
    comp = errors.compensate(sampler, params)
    def body(state, inputs):
      i, eps = inputs
      return comp.step(state, eps, i), None
    state, _ = jax.lax.scan(body, comp.init(x_T, jax.random.key(0)),
                            (jnp.arange(sampler.coeffs.num_steps), eps_seq))
    return state.x, state.error.e_hat

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
  best: str                        # the default method: shown in grids and timed
  schedule: Any = None
  safe_config: Any = None
  fd: Optional[Dict[str, Any]] = None   # feature extractor and float / data features
  samples: Dict[str, Any] = dataclasses.field(default_factory=dict)


def fit_methods(ctx: _Context, tag: str, fq, var_q, phi) -> Dict[str, Any]:
  """Fits every method on the calibration seeds: {method: (params, seconds, safe report)}."""
  c, C = ctx.sampler.coeffs, ctx.x_eval.shape[-1]
  var_fp = {"params": ctx.params}
  fitted = {}
  for v in ctx.variants:
    t0, report = time.perf_counter(), None
    if v == errors.SAFE_METHOD:
      p, report = errors.calibrate_safe(ctx.module.apply, var_fp, fq, var_q, ctx.sampler,
                                        ctx.x_cal, ctx.key_cal, ctx.safe_config, phi=phi,
                                        schedule=ctx.schedule, log=lambda m: ctx.log(f"{tag}: {m}"))
      report = {k: val for k, val in report.items() if k != "candidates"}
    elif v == "none":
      p = errors.zero_params(c.num_steps, C, c.t, phi)
    else:  # errors.calibrate resolves the name (a FitConfig preset or a reference method)
      p = ctx.jitted.calibrate(fq, v, var_fp, var_q, ctx.x_cal, ctx.key_cal, phi)
    p = errors.compensation.check_params_finite(jax.block_until_ready(p), f"{tag}/{v} calibration")
    fitted[v] = (p, time.perf_counter() - t0, report)
  return fitted


def sample_metrics(ctx: _Context, x_q) -> Dict[str, Any]:
  """PSNR / SSIM against float, contrast and sharpness ratios, Frechet distances."""
  q = metrics.quality_ratios(x_q, ctx.x_fp)
  out = {"psnr": _stats(metrics.psnr(x_q, ctx.x_fp)), "ssim": _stats(metrics.ssim(x_q, ctx.x_fp)),
         "std_ratio": float(q["std_ratio"]), "sharpness_ratio": float(q["sharpness_ratio"])}
  if ctx.fd is not None:
    f = ctx.fd["extractor"](np.clip(parallel.to_host(x_q), -1, 1))
    out["fd_vs_float"] = frechet.frechet_distance(f, ctx.fd["float"])
    out["fd_vs_data"] = frechet.frechet_distance(f, ctx.fd["data"])
  return out


def evaluate_setting(ctx: _Context, setting: str, obs: str, timed: bool) -> List[Dict[str, Any]]:
  """PTQ, propagation analysis, calibration of every method and evaluation of one setting."""
  config, sampler, log = ctx.config, ctx.sampler, ctx.log
  c = sampler.coeffs
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
  fitted = fit_methods(ctx, tag, fq, qm.variables, phi)
  log(f"{tag}: calibrated " + ", ".join(f"{v} {sec:.1f}s" for v, (_, sec, _) in fitted.items()
                                        if v != "none"))

  entries = []
  for v in ctx.variants:
    params, seconds, safe = fitted[v]
    entry = {"setting": setting, "observer": obs, "variant": v, "memory_bytes": mem,
             "calibration_s": seconds}
    if safe is not None:
      entry["safe"] = safe
    x_q, traj_q, _ = ctx.jitted.run(fq, qm.variables, params, ctx.x_eval, ctx.key_eval)
    m = sample_metrics(ctx, x_q)
    entry.update({"psnr_fake": m.pop("psnr"), "ssim_fake": m.pop("ssim"), **m})
    ctx.samples[(tag, v)] = parallel.to_host(x_q)
    entry["error_rms_per_step"] = parallel.to_host(propagation.rms_per_step(
        samplers.step_outputs(traj_q, x_q) - ctx.fp_out)).tolist()
    if config.int_path and v in ("none", ctx.best):
      x_i, _, _ = ctx.jitted.run(qm.apply_fn("int"), qm.variables, params, ctx.x_eval, ctx.key_eval)
      entry["psnr_int"] = _stats(metrics.psnr(x_i, ctx.x_fp))
    if v == "none":
      entry["propagation"] = {k: parallel.to_host(a).tolist() for k, a in report.items()}
    entries.append(entry)
  by_variant = {e["variant"]: e for e in entries}
  mode = "int" if config.int_path else "fake"
  if timed and config.timing_repeats > 0:
    timing = measure_overhead(qm.apply_fn(mode), sampler, qm.variables, fitted[ctx.best][0],
                              ctx.x_eval, ctx.key_eval, config.timing_repeats, ctx.comp_only)
    timing["mode"] = mode
    by_variant[ctx.best]["timing"] = timing  # the default method; others do as much or less
    log(f"{tag}: overhead {100 * timing['overhead_ab']:+.2f}% (A/B), "
        f"{100 * timing['overhead_ops']:.3f}% (compensation ops alone), {mode} path")
  line = ", ".join(f"{v} {by_variant[v]['psnr_fake']['mean']:.2f}" for v in ctx.variants)
  log(f"{tag}: PSNR vs float (dB): {line}")
  return entries


def best_baseline(entries: List[Dict[str, Any]], default: str) -> Optional[str]:
  """The method other than none and the default with the highest PSNR."""
  others = [e for e in entries if e["variant"] not in ("none", default)]
  return max(others, key=lambda e: e["psnr_fake"]["mean"])["variant"] if others else None


def save_figures(ctx: _Context, entries: List[Dict[str, Any]], outdir: str) -> None:
  """Sample grid (float / PTQ / best baseline / default) and the per-step error plot."""
  by_variant = {e["variant"]: e for e in entries}
  setting, obs = entries[0]["setting"], entries[0]["observer"]
  tag, best = f"{setting}_{obs}", ctx.best
  rows = {"float": ctx.samples["float"], f"PTQ {setting}": ctx.samples[(tag, "none")]}
  base = best_baseline(entries, best)
  if base is not None:
    rows[f"+{base}"] = ctx.samples[(tag, base)]
  rows[f"+{best}"] = ctx.samples[(tag, best)]
  viz.save_comparison(os.path.join(outdir, f"grid_{tag}.png"),
                      {k: np.clip(v, -1, 1) for k, v in rows.items()})
  report = by_variant["none"]["propagation"]
  curves = {"measured, no compensation": report["measured_rms"],
            "closed form (diag phi), predicted": report["closed_form_rms"],
            f"measured, {best}": by_variant[best]["error_rms_per_step"]}
  viz.save_error_plot(os.path.join(outdir, f"errors_{tag}.png"), curves,
                      np.asarray(ctx.sampler.coeffs.t),
                      f"{setting} ({obs} PTQ): cumulative error per step")


def frechet_reference(config, meta, x_fp, shape) -> Optional[Dict[str, Any]]:
  """Feature extractor plus the float samples' and real data's features (None if off)."""
  name = meta.get("data", {}).get("name")
  if not config.get("frechet", True) or name is None:
    return None
  fx = frechet.FeatureExtractor()
  real = data.load(name, size=shape[0], seed=config.get("fd_data_seed", 1000))[:x_fp.shape[0]]
  return {"extractor": fx, "float": fx(np.clip(parallel.to_host(x_fp), -1, 1)), "data": fx(real)}


def run(config: ml_collections.ConfigDict, outdir: str, verbose: bool = True) -> Dict[str, Any]:
  log = Progress(verbose)
  settings = parse_list(config.settings, SETTINGS, "setting")
  observer_names = parse_list(config.observers, quant.observers.OBSERVERS, "observer")
  variants = list(dict.fromkeys(parse_list(config.variants, errors.METHODS, "method")))
  if "none" not in variants:
    variants = ["none"] + variants
  default = config.get("default_method", errors.SAFE_METHOD)
  if default not in variants:   # e.g. a short list of variants: show the last one
    default = variants[-1]
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
  jitted = Jitted(fp, sampler, schedule)
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
                 num_timesteps=schedule.num_timesteps, variants=variants, best=default,
                 schedule=schedule, safe_config=errors.SafeConfig(**(config.safe.to_dict() if "safe" in config else {})),
                 fd=frechet_reference(config, m["meta"], x_fp, shape))
  # Every process gathers what the writer needs (a gather is a collective: all must call it).
  ctx.samples["float"] = parallel.to_host(x_fp)
  if ctx.fd is not None:
    fd_floor = frechet.frechet_distance(ctx.fd["float"], ctx.fd["data"])
    log(f"Frechet distance of the float model's samples to data: {fd_floor:.1f}")
  results: Dict[str, Any] = {"config": config.to_dict(), "checkpoint": m["checkpoint"],
                             "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
                             "processes": jax.process_count(),
                             "fd_float_vs_data": fd_floor if ctx.fd is not None else None,
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
  """Markdown: every setting x observer x method with fidelity, quality and cost columns."""
  runs = results["runs"]
  has_fd = any("fd_vs_data" in r for r in runs)
  head = ("| setting | PTQ | method | PSNR (dB) | gain (dB) | SSIM | std ratio | sharpness ratio |"
          + (" FD vs float | FD vs data |" if has_fd else "")
          + " PSNR int (dB) | calib. (s) | overhead (A/B, ops) | weights (MB) |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  base = {(r["setting"], r["observer"]): r["psnr_fake"]["mean"] for r in runs if r["variant"] == "none"}
  for r in runs:
    pf = r["psnr_fake"]
    name = r["variant"]
    if "safe" in r:
      sf = r["safe"]
      name += " (fell back)" if sf["fell_back"] else f" (gain {sf['gain']:g}, offset {sf['offset']:g})"
    gain = pf["mean"] - base[(r["setting"], r["observer"])]
    cells = [r["setting"], r["observer"], name, f"{pf['mean']:.2f} ± {pf['std']:.2f}",
             f"{gain:+.2f}" if r["variant"] != "none" else "-", f"{r['ssim_fake']['mean']:.3f}",
             f"{r['std_ratio']:.3f}", f"{r['sharpness_ratio']:.3f}"]
    if has_fd:
      cells += [f"{r['fd_vs_float']:.1f}", f"{r['fd_vs_data']:.1f}"]
    cells.append(f"{r['psnr_int']['mean']:.2f}" if "psnr_int" in r else "-")
    cells.append(f"{r['calibration_s']:.1f}" if r["variant"] != "none" else "-")
    t = r.get("timing")
    cells.append(f"{100 * t['overhead_ab']:+.2f}%, {100 * t['overhead_ops']:.3f}%" if t else "-")
    mem = r["memory_bytes"]
    cells.append(f"{mem['layers_float32'] / 1e6:.2f} -> {mem['layers_stored'] / 1e6:.2f}")
    lines.append("| " + " | ".join(cells) + " |")
  fd_floor = results.get("fd_float_vs_data")
  if fd_floor is not None:
    lines.append(f"\nFloat model's own FD vs data: {fd_floor:.1f}.")
  return "\n".join(lines) + "\n"
