"""The evaluation sweep: settings x methods x samplers x seeds, PTQ options, ablations,
Frechet distance and error analysis, written as a markdown report with plots and grids.

A loop over the shared `stages` (the same functions as the main job). Everything for one
seed shares its calibration and evaluation noise (drawn as in the main job), and every
quantized run is compared with the float model on the same noise.

* main grid: W8A8 / W4A8 / W4A4 x `methods` x `samplers` (e.g. DDIM 10/25/50, DDPM 50)
  x seeds, PSNR / SSIM against float (mean +- std over seeds of the per-seed means);
* PTQ options (min-max, MSE, timestep-grouped ranges) with and without TCEC, on the
  reference sampler;
* Frechet distance in the shipped classifier's feature space on `num_fd` samples (first
  seed, reference sampler), against the float model's samples and against real data,
  with the float model's own distance to real data as the floor;
* ablations of the fit (target, sequential, per channel, intercept, e_hat regressor,
  calibration size, calibrating at another step count);
* error analysis: per-step cumulative error measured vs the closed form, and their
  correlation, per setting.

Calibrations here use the default propagation gains (phi = a_k) and the default
SafeConfig, as the sweep always has; the main job fits phi per setting.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, NamedTuple, Tuple

import jax
import ml_collections
import numpy as np

from tac_jax import compensation, files
from tac_jax.app import report, stages, viz
from tac_jax.app.settings import (SETTINGS, SweepSpec, method_options, parse_sampler, ptq_option,
                                  sweep_spec)
from tac_jax.app.stages import Compiled, FloatReference, FrechetReference, Memo, Progress
from tac_jax.compensation import FitConfig
from tac_jax.quant import presets

# Ablations of the fit: config name -> (report label, FitConfig of `tcec`). Calibration
# sizes and calibrating at another step count are ablations too (`calib_sizes`, samplers).
ABLATIONS = {
    "tcec": ("tcec (cumulative, sequential, per channel, intercept)", FitConfig()),
    "same_input": ("same-input target", FitConfig(target="same_input")),
    "one_shot": ("one-shot (not sequential)", FitConfig(sequential=False)),
    "per_tensor": ("per tensor", FitConfig(per_channel=False)),
    "no_intercept": ("no intercept", FitConfig(intercept=False)),
    "ehat": ("+ e_hat regressor", FitConfig(e_hat_regressor=True)),
}


def validate(cfg: ml_collections.ConfigDict) -> SweepSpec:
  """Checks every field before anything runs or is written."""
  return sweep_spec(cfg, tuple(ABLATIONS))


class _Setup(NamedTuple):
  spec: SweepSpec
  log: Progress
  model: stages.Model
  compiled: Dict[str, Compiled]     # sampler name -> its jitted runs
  memo: Memo                        # fits and evaluations of the current seed
  fd: Any                           # (x, key, float reference, FrechetReference) or None


def _fit(s: _Setup, qm, noise, sname: str, method, where: Tuple, x_cal=None):
  """A fitted Calibration, memoised by value (seed / setting / option, sampler, method or
  its (name, options), x_cal size). `method` is a name or ("tcec", FitConfig)."""
  name, options = (method, None) if isinstance(method, str) else method
  size = None if x_cal is None else int(x_cal.shape[0])
  n = noise if x_cal is None else noise._replace(x_cal=x_cal)

  def compute():
    feats = s.fd[3].extractor if s.fd is not None else None
    opts = options if options is not None else method_options(name, s.spec.common, feats)
    return stages.fit_method(name, s.model, s.compiled[sname], qm, n, None, opts)

  return s.memo(("fit",) + where + (sname, name, options, size), compute)


def _evaluate(s: _Setup, qm, noise, ref: FloatReference, sname: str, cal, key) -> Dict[str, Any]:
  return s.memo(("eval",) + key, lambda: stages.evaluate(
      s.compiled[sname], qm, cal, noise.x_eval, noise.key_eval, ref))


def _record(ev: Dict[str, Any], **kw) -> Dict[str, Any]:
  return {**kw, "psnr": ev["psnr"]["mean"], "ssim": ev["ssim"]["mean"],
          "std_ratio": ev["std_ratio"], "sharpness_ratio": ev["sharpness_ratio"],
          "error_rms_per_step": ev["error_rms_per_step"]}


def _quantize(s: _Setup, calib, setting: str, option: str):
  obs, groups = ptq_option(option)
  qc = presets.quant_config(s.spec.common.quant, *SETTINGS[setting], obs, time_groups=groups)
  return stages.quantize(s.model, calib, qc, obs)


def _setting_runs(s: _Setup, out, seed, noise, refs, calib, setting, grids) -> None:
  """Main grid and PTQ options of one seed and setting (then analysis / FD / ablations)."""
  spec = s.spec
  for option in spec.ptq_options:
    qm, where, main = _quantize(s, calib, setting, option), (seed, setting, option), \
        option == spec.ptq_options[0]
    for sname in (spec.sampler_names if main else (spec.ref,)):
      for method in (spec.common.methods if main else ("none", "tcec")):
        cal = _fit(s, qm, noise, sname, method, where)
        ev = _evaluate(s, qm, noise, refs[sname], sname, cal, where + (sname, method))
        if main and sname == spec.ref and seed == spec.seeds[0]:
          grids.setdefault(setting, {"float": refs[sname].x})[method] = ev["x"]
        out["records"].append(_record(ev, kind="main" if main else "ptq", seed=seed,
                                      setting=setting, ptq=option, sampler=sname, method=method))
    s.log(f"seed {seed} {setting} {option}: PSNR at {spec.ref}: " + ", ".join(
        f"{r['method']} {r['psnr']:.2f}" for r in out["records"] if r["seed"] == seed
        and r["setting"] == setting and r["ptq"] == option and r["sampler"] == spec.ref))
    if main:
      if seed == spec.seeds[0]:
        out["analysis"].append(_analysis(s, qm, noise, setting))
        if spec.fd_methods:
          out["fd"] += _frechet(s, qm, noise, setting, where)
      if setting in spec.ablation_settings:
        out["ablations"] += _ablations(s, qm, noise, refs, setting, where)


def _analysis(s: _Setup, qm, noise, setting: str) -> Dict[str, Any]:
  _, rep = stages.analyse_propagation(s.compiled[s.spec.ref], s.model, qm, noise)
  m, p = rep["measured_rms"], rep["closed_form_rms"]
  s.log(f"{setting}: closed form vs measured, per-step corr "
        f"{np.mean(rep['closed_form_corr'][1:]):.3f}")
  return {"setting": setting, "sampler": s.spec.ref, "measured_rms": m.tolist(),
          "closed_form_rms": p.tolist(), "per_step_corr": rep["closed_form_corr"].tolist(),
          "rms_curve_corr": float(np.corrcoef(m, p)[0, 1]),
          "final_rel_err": float(rep["closed_form_rel_err"][-1])}


def _fd_reference(s: _Setup):
  """(noise x, key, float reference, FrechetReference) of the FD sample set (first seed)."""
  key = jax.random.key(10_000 + s.spec.seeds[0])
  x = jax.random.normal(key, (s.spec.num_fd,) + s.model.shape)
  ref = stages.float_reference(s.compiled[s.spec.ref], s.model, x, key)
  fd = FrechetReference.build(ref.x, s.spec.fd_data, s.spec.common.fd_data_seed)
  s.log(f"Frechet distance, float model vs data ({s.spec.num_fd} samples): {fd.floor:.3f}")
  return x, key, ref, fd


def _frechet(s: _Setup, qm, noise, setting: str, where) -> List[Dict[str, Any]]:
  x, key, ref, fd = s.fd
  n, rows = s.spec.num_fd, []
  for method in s.spec.fd_methods:
    cal = _fit(s, qm, noise, s.spec.ref, method, where)
    m = stages.evaluate(s.compiled[s.spec.ref], qm, cal, x, key, ref, fd)
    rows.append({"setting": setting, "method": method, "n": n,
                 "fd_vs_float": m["fd_vs_float"], "fd_vs_data": m["fd_vs_data"]})
  s.log(f"{setting}: Frechet distance done")
  return rows


def _ablations(s: _Setup, qm, noise, refs, setting: str, where) -> List[Dict[str, Any]]:
  ref, rows = s.spec.ref, []
  ev = lambda p, k: _evaluate(s, qm, noise, refs[ref], ref, p, where + (ref,) + k)
  for name in s.spec.ablations:
    label, fit = ABLATIONS[name]
    rows.append((label, ev(_fit(s, qm, noise, ref, ("tcec", fit), where), (fit,))))
  for n in s.spec.calib_sizes:
    x_cal = jax.random.normal(jax.random.fold_in(noise.key_cal, 7), (n,) + s.model.shape)
    rows.append((f"calibration samples = {n}",
                 ev(_fit(s, qm, noise, ref, "tcec", where, x_cal=x_cal), ("calib_size", n))))
  for other in s.spec.sampler_names:
    if other != ref and other.startswith(ref[:4]):
      p = compensation.resample_params(_fit(s, qm, noise, other, "tcec", where).params,
                                       s.compiled[ref].sampler)
      rows.append((f"calibrated at {other}, sampled at {ref}",
                   ev(compensation.Calibration("tcec", p, 0.0), ("resampled", other))))
  s.log(f"seed {where[0]} {setting}: {len(rows)} ablations")
  return [{"seed": where[0], "setting": setting, "ablation": name, "psnr": e["psnr"]["mean"],
           "ssim": e["ssim"]["mean"]} for name, e in rows]


def _set_up(spec: SweepSpec, log: Progress) -> _Setup:
  m = spec.common.model
  model = stages.load_model(m.checkpoint, m.factory, m.guidance_scale, m.labels)
  compiled = {sp.name: Compiled(model, sp.build(model.schedule)) for sp in spec.samplers}
  s = _Setup(spec, log, model, compiled, Memo(), None)
  return s._replace(fd=_fd_reference(s)) if spec.fd_methods else s


def write_outputs(out: Dict[str, Any], directory: str, outdir: str, grids) -> str:
  """sweep.json, report.md, headline.md, figures and manifest.json into `directory`
  (`outdir`: the final folder, named in the report's command line)."""
  with open(os.path.join(directory, "sweep.json"), "w") as f:
    json.dump(out, f, indent=1)
  main = [r for r in out["records"] if r["kind"] == "main"]
  settings, methods = report.unique(r["setting"] for r in main), report.unique(r["method"] for r in main)
  ref, g = out["config"]["ref_sampler"], report.group(main, ("setting", "method", "sampler"))
  ddim = sorted((parse_sampler(n)[1], n) for n in report.unique(r["sampler"] for r in main)
                if parse_sampler(n)[0] == "ddim")
  figures = []
  if len(ddim) > 1:
    viz.save_psnr_vs_steps(os.path.join(directory, "psnr_vs_steps.png"), settings, methods,
                           lambda s, m, n: [r["psnr"] for r in g.get((s, m, f"ddim{n}"), [])],
                           [n for n, _ in ddim])
    figures.append(("PSNR vs sampling steps", "psnr_vs_steps.png"))

  def curves(s):
    c = {m: np.mean([r["error_rms_per_step"] for r in g[(s, m, ref)]], 0) for m in methods
         if g.get((s, m, ref))}
    c.update({"closed form (none)": a["closed_form_rms"] for a in out["analysis"]
              if a["setting"] == s})
    return c

  viz.save_error_curves(os.path.join(directory, "error_vs_step.png"), settings, curves,
                        f"step ({ref})")
  figures.append(("Cumulative error per step (mean over seeds)", "error_vs_step.png"))
  seed = min(r["seed"] for r in out["records"])
  for s, rows in grids.items():
    viz.save_comparison(os.path.join(directory, f"grid_{s}.png"),
                        {k: np.clip(np.asarray(v), -1, 1) for k, v in rows.items()})
    figures.append((f"{s} samples at {ref}, seed {seed}: float, then each method", f"grid_{s}.png"))
  text = report.sweep_report(out, outdir, figures)
  with open(os.path.join(directory, "report.md"), "w") as f:
    f.write(text)
  with open(os.path.join(directory, "headline.md"), "w") as f:
    f.write(report.headline_table(out))
  files.write_json_atomic(os.path.join(directory, files.MANIFEST),
                          files.manifest(out["config"], directory))
  return text


def run(cfg: ml_collections.ConfigDict, outdir: str, verbose: bool = True,
        overwrite: bool = False, command: str = "") -> Dict[str, Any]:
  """Runs the sweep; writes `outdir` as a whole when complete (refused if it holds results,
  unless `overwrite`). `command`: the command line the report names (default: the
  launcher with `--outdir` only)."""
  spec = validate(cfg)
  outdir = files.check_output_dir(outdir, overwrite)
  log = Progress(verbose)
  s = _set_up(spec, log)
  out: Dict[str, Any] = {"config": cfg.to_dict(), "command": command, "records": [], "fd": [],
                         "ablations": [], "analysis": [],
                         "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}"}
  if s.fd is not None:
    out["fd"].append({"setting": "float", "method": "-", "fd_vs_float": 0.0,
                      "fd_vs_data": s.fd[3].floor, "n": spec.num_fd})
  grids: Dict[str, Dict[str, np.ndarray]] = {}
  for seed in spec.seeds:
    s.memo.clear()
    noise = stages.seed_noise(seed, spec.common.num_calib, spec.common.num_eval, s.model.shape)
    model, noise = stages.shard_noise(spec.common, s.model, noise, log)
    s = s._replace(model=model)
    refs = {n: stages.float_reference(c, s.model, noise.x_eval, noise.key_eval)
            for n, c in s.compiled.items()}
    calib = stages.calibration_batches(s.compiled[spec.ref], s.model, noise)
    log(f"seed {seed}: float samples for {', '.join(spec.sampler_names)}")
    for setting in spec.common.settings:
      _setting_runs(s, out, seed, noise, refs, calib, setting, grids)
  with files.staged_directory(outdir, files.MANIFEST, "results") as tmp:
    out["report"] = write_outputs(out, tmp, outdir, grids)
  log(f"wrote {outdir}: sweep.json, report.md, headline.md, manifest.json and figures")
  return out
