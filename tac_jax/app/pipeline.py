"""The main job: quantize a diffusion model, calibrate compensation, evaluate against float.

For every base-PTQ preset x setting (W8A8, W4A8, W4A4), through the shared `stages`:
  1. PTQ: quantize the model, with activation ranges from the float sampler's
     trajectories on the calibration seeds (uniform over the sampler's timesteps).
  2. Propagation: a joint float / quantized run; channel gains phi are fitted on the
     calibration seeds, the first-order model is checked on the evaluation seeds.
  3. Compensation: fit each method on the calibration seeds.
  4. Evaluation on held-out seeds with noise shared with the float run: PSNR / SSIM,
     contrast, sharpness and Frechet distances of the final samples; fake-quant and the
     integer path.
  5. Overhead: sampling time with and without compensation, measured side by side.

`run` is validate -> set up -> loop over settings -> write. Everything is validated before
any file is created; the run folder is built in a hidden sibling and swapped in when
complete (with manifest.json: config, git revision, versions, file checksums), so an
interrupted run never leaves a folder that looks complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any, Dict, List, Optional

import jax
import ml_collections
import numpy as np

from tac_jax import compensation, files, quant
from tac_jax.app import artifact, report, stages, viz
from tac_jax.app.settings import SETTINGS, JobSpec, job_spec, method_options
from tac_jax.app.stages import Compiled, FrechetReference, Model, Noise, Progress, measure_overhead
from tac_jax.diffusion import samplers
from tac_jax.host import to_host
from tac_jax.quant import presets

DIVERGENCE_RMS = 2.0   # final error RMS above the data range [-1, 1]: the samples diverged


def validate(config: ml_collections.ConfigDict) -> JobSpec:
  """Checks every field before anything runs or is written; raises ValueError saying what
  to change."""
  return job_spec(config)


@dataclasses.dataclass
class _Context:
  """What every setting of one run shares (model, sampler, seeds, float reference)."""
  job: JobSpec
  log: Progress
  model: Model
  jit: Compiled
  noise: Noise
  calib: List[Any]
  ref: stages.FloatReference
  comp_only: Any
  fd: Optional[FrechetReference]
  labels: Optional[np.ndarray] = None      # the evaluation samples' requested classes
  float_label_accuracy: Optional[float] = None
  samples: Dict[Any, np.ndarray] = dataclasses.field(default_factory=dict)
  features: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def _sampler(job: JobSpec, model: Model, noise: Noise, log) -> samplers.Sampler:
  sampler = job.sampler.build(model.schedule)
  if not sampler.affine and job.sampler.linearise:
    affine_a = np.asarray(sampler.coeffs.a)
    sampler = samplers.linearise(sampler, model.module.apply, model.variables, noise.x_cal,
                                 noise.key_cal)
    log("x0 bound: the error model uses the step's mean derivatives, a_i x " +
        " ".join(f"{r:.2f}" for r in np.asarray(sampler.coeffs.a) / affine_a))
  return sampler


def set_up(job: JobSpec, log: Progress) -> _Context:
  """Model, sampler, seeds (sharded when data parallel) and the float reference."""
  common = job.common
  spec = common.model
  model = stages.load_model(spec.checkpoint, spec.factory, spec.guidance_scale, spec.labels,
                            spec.conditions)
  log(f"model {model.checkpoint}: {sum(x.size for x in jax.tree.leaves(model.params)):,} params, "
      f"{'x'.join(map(str, model.shape))}, {model.prediction} prediction"
      + (f", classes {list(model.labels)}" if model.labels is not None else "")
      + (f" guided at w = {model.guidance_scale:g}" if model.guidance_scale is not None else ""))
  noise = stages.seed_noise(job.seed, common.num_calib, common.num_eval, model.shape)
  model, noise = stages.shard_noise(common, model, noise, log)
  sampler = _sampler(job, model, noise, log)
  jit = Compiled(model, sampler)
  ref = stages.float_reference(jit, model, noise.x_eval, noise.key_eval)
  calib = stages.calibration_batches(jit, model, noise)
  log(f"float samples: {common.num_calib} calibration + {common.num_eval} evaluation seeds, "
      f"{job.sampler.kind} {sampler.coeffs.num_steps} steps")
  data_name = model.meta.get("data", {}).get("name")
  fd = (FrechetReference.build(ref.x, data_name, common.fd_data_seed)
        if job.frechet and data_name is not None else None)
  labels = model.requested_labels(common.num_eval)
  if fd is not None:
    log(f"Frechet distance of the float model's samples to data: {fd.floor:.1f}")
  ctx = _Context(job, log, model, jit, noise, calib, ref, stages.compensation_only(sampler), fd,
                 labels)
  if fd is not None and labels is not None:
    ctx.float_label_accuracy = fd.label_accuracy(ref.x, labels)
    log(f"label accuracy of the float model's samples: {100 * ctx.float_label_accuracy:.1f}%")
  ctx.samples["float"] = to_host(ref.images)  # a gather: every process calls it
  return ctx


def _method_entry(ctx: _Context, qm, where, cal: compensation.Calibration, mem) -> Dict[str, Any]:
  """Evaluation of one fitted method: metrics, samples kept for the grids, int path."""
  noise, (setting, obs) = ctx.noise, where
  m = stages.evaluate(ctx.jit, qm, cal, noise.x_eval, noise.key_eval, ctx.ref, ctx.fd,
                      ctx.labels, ctx.model.decode)
  ctx.samples[(setting, obs, cal.method)] = m.pop("x")
  if "features" in m:   # kept for paired bootstrap intervals (experiments/leaderboard.py)
    ctx.features[f"{setting}/{obs}/{cal.method}"] = m.pop("features")
  method = compensation.get(cal.method)
  entry = {"setting": setting, "ptq": obs, "method": cal.method, "memory_bytes": mem,
           "calibration_s": cal.seconds, "extra_calls_per_step": method.extra_calls,
           "psnr_fake": m.pop("psnr"), "ssim_fake": m.pop("ssim"), **m}
  if isinstance(cal.report, compensation.SafeReport):
    entry["safe"] = cal.report.to_json()
  elif cal.report is not None:   # a method's own choice of its options (tac's threshold)
    entry["selection"] = cal.report.to_json()
  if ctx.job.int_path and cal.method in ("none", ctx.job.default):
    x_i, _, _ = ctx.jit.sample(qm.apply_fn("int"), qm.variables, cal, noise.x_eval, noise.key_eval)
    entry["psnr_int"] = stages.psnr_stats(ctx.model.image(x_i), ctx.ref.images)
  return entry


def _timing(ctx: _Context, qm, cal: compensation.Calibration) -> Dict[str, Any]:
  mode = "int" if ctx.job.int_path else "fake"
  t = measure_overhead(stages.qnet(qm, mode), ctx.jit.sampler, cal, ctx.noise.x_eval,
                       ctx.noise.key_eval, ctx.job.timing_repeats, ctx.comp_only)
  return {**t, "mode": mode}


def _fit_all(ctx: _Context, qm, tag: str, phi) -> Dict[str, compensation.Calibration]:
  features = ctx.fd.extractor if ctx.fd is not None else None
  fitted = {}
  for m in ctx.job.common.methods:
    fitted[m] = stages.fit_method(m, ctx.model, ctx.jit, qm, ctx.noise, phi,
                                  method_options(m, ctx.job.common, features))
    if fitted[m].report is not None:
      ctx.log(f"{tag}: {fitted[m].report.summary()}")
  ctx.log(f"{tag}: calibrated " + ", ".join(f"{m} {f.seconds:.1f}s" for m, f in fitted.items()
                                            if m != "none"))
  return fitted


def evaluate_setting(ctx: _Context, setting: str, obs: str, timed: bool) -> List[Dict[str, Any]]:
  """PTQ (preset `obs`), propagation analysis, calibration of every method and evaluation
  of one setting."""
  log, job, tag = ctx.log, ctx.job, f"{setting}_{obs}"
  qm = stages.quantize(ctx.model, ctx.calib,
                       presets.quant_config(job.common.quant, *SETTINGS[setting], obs), obs)
  mem = qm.memory_report(ctx.model.params)
  log(f"{tag}: PTQ done ({len(qm.specs)} layers, weights {mem['layers_float32'] / 1e6:.2f} MB"
      f" float -> {mem['layers_stored'] / 1e6:.2f} MB)")
  if qm.float_layers:
    log(f"{tag}: left in float: " + report.group_reasons(qm.float_layers))
  phi, prop = stages.analyse_propagation(ctx.jit, ctx.model, qm, ctx.noise)
  log(f"{tag}: propagation model: final error RMS {prop['measured_rms'][-1]:.4f}, closed "
      f"form corr {np.mean(prop['closed_form_corr'][1:]):.3f}")
  fitted = _fit_all(ctx, qm, tag, phi)
  entries = [_method_entry(ctx, qm, (setting, obs), fitted[m], mem) for m in job.common.methods]
  entries[0]["float_layers"] = qm.float_layers
  entries[0]["propagation"] = {k: to_host(a).tolist() for k, a in prop.items()}
  by_method = {e["method"]: e for e in entries}
  if timed and job.timing_repeats > 0:
    t = by_method[job.default]["timing"] = _timing(ctx, qm, fitted[job.default])
    log(f"{tag}: overhead {100 * t['overhead_ab']:+.2f}% (A/B), "
        f"{100 * t['overhead_ops']:.3f}% (compensation ops alone), {t['mode']} path")
  if job.export:
    by_method[job.default]["artifact"] = _export(ctx, qm, fitted[job.default], tag)
  _flag_divergence(entries, lambda m: log(f"WARNING {tag}: {m}"))
  log(f"{tag}: PSNR vs float (dB): " + ", ".join(
      f"{m} {by_method[m]['psnr_fake']['mean']:.2f}" for m in job.common.methods))
  if "label_accuracy" in entries[0]:
    log(f"{tag}: label accuracy: " + ", ".join(
        f"{m} {100 * by_method[m]['label_accuracy']:.1f}%" for m in job.common.methods))
  return entries


def _export(ctx: _Context, qm, cal: compensation.Calibration, tag: str) -> Dict[str, Any]:
  """Writes the setting's artifact (the default method) below config.export; its size."""
  path = os.path.join(ctx.job.export, tag)
  if not isinstance(qm, quant.QuantizedModel):
    raise ValueError(f"config.export: {tag} was quantized by an external base "
                     f"({type(qm).__name__}); the artifact stores tac_jax's own PTQ only. "
                     "Leave config.export empty for that preset.")
  if jax.process_index() != 0:
    return {"path": path}
  rec = artifact.export(path, ctx.model, qm, ctx.job.sampler, cal, ctx.jit.sampler)
  size = {"path": os.path.abspath(path), "bytes": rec["bytes"],
          "float_checkpoint_bytes": rec["float_checkpoint_bytes"]}
  ratio = (f" ({rec['float_checkpoint_bytes'] / rec['bytes']:.1f}x smaller than the float "
           "checkpoint)" if rec["float_checkpoint_bytes"] else "")
  ctx.log(f"{tag}: exported {cal.method} to {path}: {rec['bytes'] / 1e3:.0f} kB{ratio}")
  return size


def _flag_divergence(entries: List[Dict[str, Any]], warn) -> None:
  """Marks entries whose final error RMS exceeds the data range (or is not finite)."""
  bad = []
  for e in entries:
    final = e["error_rms_per_step"][-1]
    if not np.isfinite(final) or final > DIVERGENCE_RMS:
      e["diverged"] = True
      bad.append(f"{e['method']} ({final:.3g})")
  if bad:
    warn(f"samples diverged from float (final error RMS > {DIVERGENCE_RMS}, the data range): "
         f"{', '.join(bad)}; their metrics describe noise.")


def save_figures(ctx: _Context, entries: List[Dict[str, Any]], outdir: str) -> None:
  """Sample grid (float / PTQ / best other method / default) and the per-step error plot."""
  by_method = {e["method"]: e for e in entries}
  setting, obs, best = entries[0]["setting"], entries[0]["ptq"], ctx.job.default
  rows = {"float": ctx.samples["float"], f"PTQ {setting}": ctx.samples[(setting, obs, "none")]}
  base = report.best_baseline(entries, best)
  if base is not None:
    rows[f"+{base}"] = ctx.samples[(setting, obs, base)]
  rows[f"+{best}"] = ctx.samples[(setting, obs, best)]
  viz.save_comparison(os.path.join(outdir, f"grid_{setting}_{obs}.png"),
                      {k: np.clip(v, -1, 1) for k, v in rows.items()})
  prop = by_method["none"]["propagation"]
  curves = {"measured, no compensation": prop["measured_rms"],
            "closed form (diag phi), predicted": prop["closed_form_rms"],
            f"measured, {best}": by_method[best]["error_rms_per_step"]}
  viz.save_error_plot(os.path.join(outdir, f"errors_{setting}_{obs}.png"), curves,
                      np.asarray(ctx.jit.sampler.coeffs.t),
                      f"{setting} ({obs} PTQ): cumulative error per step")


def write_results(config, results: Dict[str, Any], directory: str, features=None) -> str:
  """results.json, results.md, features.npz (the evaluation samples' classifier features
  and the float / data references', when there are any) and manifest.json into
  `directory`; returns the table."""
  table = report.results_table(results)
  if features:
    np.savez_compressed(os.path.join(directory, "features.npz"), **features)
  with open(os.path.join(directory, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(directory, "results.md"), "w") as f:
    f.write(table)
  files.write_json_atomic(os.path.join(directory, files.MANIFEST),
                          files.manifest(config.to_dict(), directory))
  return table


def run(config: ml_collections.ConfigDict, outdir: str, verbose: bool = True,
        overwrite: bool = False) -> Dict[str, Any]:
  """Runs the main job; writes into `outdir` (refused if it holds results, unless
  `overwrite`, which replaces the folder as a whole once the new run is complete)."""
  job = validate(config)
  writer = jax.process_index() == 0   # multi-host: one process writes the files
  if writer:
    outdir = files.check_output_dir(outdir, overwrite)
  log = Progress(verbose)
  ctx = set_up(job, log)
  results: Dict[str, Any] = {
      "config": config.to_dict(), "checkpoint": ctx.model.checkpoint,
      "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      "processes": jax.process_count(),
      "fd_float_vs_data": ctx.fd.floor if ctx.fd is not None else None,
      "label_accuracy_float": ctx.float_label_accuracy, "runs": [],
      "grids": {f"{s}_{o}": os.path.join(outdir, f"grid_{s}_{o}.png")
                for o in job.ptq for s in job.common.settings}}
  staged = files.staged_directory(outdir, files.MANIFEST, "results") if writer else contextlib.nullcontext(None)
  with staged as tmp:
    for obs in job.ptq:
      for setting in job.common.settings:
        entries = evaluate_setting(ctx, setting, obs, timed=obs == job.ptq[0])
        results["runs"] += entries
        if writer:
          save_figures(ctx, entries, tmp)
    if writer:
      refs = {} if ctx.fd is None else {"float": ctx.fd.float_features, "data": ctx.fd.data_features}
      table = write_results(config, results, tmp, {**refs, **ctx.features})
  if writer:
    log(f"wrote {outdir}: results.json, results.md, manifest.json, "
        f"{len(results['grids'])} grids and error plots")
    if verbose:
      print(table)
  return results
