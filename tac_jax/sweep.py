"""The evaluation sweep: settings x methods x samplers x seeds, PTQ options, ablations,
Frechet distance and error analysis, written as a markdown report with plots and grids.

Everything for one seed shares its calibration and evaluation noise (drawn as in the
main job), and every quantized run is compared with the float model on the same noise.

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
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tac_jax import data, errors, metrics, quant, viz
from tac_jax.diffusion import samplers
from tac_jax.errors import propagation
from tac_jax.metrics import frechet
from tac_jax.pipeline import (SETTINGS, Jitted, Progress, load, parse_list, quant_config,
                              seed_noise)

# Ablations: name -> FitConfig (or a calibration-size / step-count change of `tcec`).
ABLATIONS = {
    "tcec (cumulative, sequential, per channel, intercept)": errors.VARIANTS["tcec"],
    "same-input target": dataclasses.replace(errors.VARIANTS["tcec"], target="same_input"),
    "one-shot (not sequential)": dataclasses.replace(errors.VARIANTS["tcec"], sequential=False),
    "per tensor": dataclasses.replace(errors.VARIANTS["tcec"], per_channel=False),
    "no intercept": dataclasses.replace(errors.VARIANTS["tcec"], intercept=False),
    "+ e_hat regressor": errors.VARIANTS["tcec_ehat"],
}


def parse_sampler(name: str):
  """'ddim25' -> ('ddim', 25)."""
  for kind in ("ddim", "ddpm"):
    if name.startswith(kind) and name[len(kind):].isdigit():
      return kind, int(name[len(kind):])
  raise ValueError(f"sampler {name!r}: use ddim<steps> or ddpm<steps>, e.g. ddim25.")


def ptq_option(name: str):
  """'minmax', 'mse', 'minmax_tg4' (4 timestep groups of activation ranges)."""
  obs, _, tg = name.partition("_tg")
  if obs not in quant.observers.OBSERVERS or (tg and not tg.isdigit()):
    raise ValueError(f"PTQ option {name!r}: use <observer>[_tg<groups>] with an observer in "
                     f"{sorted(quant.observers.OBSERVERS)}.")
  return obs, int(tg) if tg else 1


class _Seed:
  """Noise of one seed and the float model's results on it, per sampler."""

  def __init__(self, sw: "Sweep", seed: int):
    self.value = seed
    self.x_cal, self.key_cal, self.x_eval, self.key_eval = seed_noise(
        seed, sw.cfg.num_calib, sw.cfg.num_eval, sw.shape)
    self.fp = {}
    for name, (sampler, jitted) in sw.samplers.items():
      x_fp, traj, _ = jitted.run(sw.fp, sw.var_fp, sw.none[name], self.x_eval, self.key_eval)
      _, traj_cal, _ = jitted.run(sw.fp, sw.var_fp, sw.none[name], self.x_cal, self.key_cal)
      self.fp[name] = {"x": x_fp, "out": samplers.step_outputs(traj, x_fp),
                       "traj_cal": traj_cal}


class Sweep:
  def __init__(self, cfg: ml_collections.ConfigDict, outdir: str, verbose: bool = True):
    self.cfg, self.outdir, self.log = cfg, outdir, Progress(verbose)
    self.settings = parse_list(cfg.settings, SETTINGS, "setting")
    self.methods = list(dict.fromkeys(parse_list(cfg.methods, errors.METHODS, "method")))
    if "none" not in self.methods:
      self.methods = ["none"] + self.methods
    self.sampler_names = parse_list(cfg.samplers, None, "sampler")
    if cfg.ref_sampler not in self.sampler_names:
      raise ValueError(f"ref_sampler {cfg.ref_sampler!r} must be one of samplers "
                       f"{self.sampler_names}.")
    self.seeds = [int(s) for s in parse_list(str(cfg.seeds), None, "seed")]
    self.ptq_options = parse_list(cfg.ptq_options, None, "PTQ option")
    for p in self.ptq_options:
      ptq_option(p)
    self.ablation_settings = parse_list(cfg.ablation_settings, SETTINGS, "setting")
    m = load(cfg)
    self.module, self.params, self.schedule = m["module"], m["params"], m["schedule"]
    mc = self.module.config
    self.shape = (mc.sample_size, mc.sample_size, mc.in_channels)
    self.fp, self.var_fp = self.module.apply, {"params": self.params}
    self.samplers, self.none = {}, {}
    for name in self.sampler_names:
      kind, steps = parse_sampler(name)
      s = samplers.make_sampler(kind, self.schedule, steps)
      self.samplers[name] = (s, Jitted(self.fp, s, self.schedule))
      self.none[name] = errors.zero_params(steps, mc.out_channels, s.coeffs.t)
    self.records: List[Dict[str, Any]] = []
    self.extra: Dict[str, Any] = {"fd": [], "ablations": [], "analysis": []}
    # Fitted params and evaluations of the current quantized model, so the FD and ablation
    # stages re-use what the main grid already computed (cleared by `quantize`).
    self._memo: Dict[Any, Any] = {}

  # --------------------------------------------------------------------------- pieces

  def quantize(self, seed: _Seed, setting: str, option: str):
    obs, groups = ptq_option(option)
    w, a = SETTINGS[setting]
    qc = quant_config(self.cfg, w, a, obs)
    qc = dataclasses.replace(qc, time_groups=groups)
    ref = self.cfg.ref_sampler
    calib = samplers.calibration_batches(seed.fp[ref]["traj_cal"], self.samplers[ref][0].coeffs)
    self._memo.clear()
    return quant.quantize_model(self.module, self.params, calib, qc, self.schedule.num_timesteps)

  def fit(self, qm, seed: _Seed, sampler_name: str, method, x_cal=None):
    """Fitted params for `method` (a variant name or a FitConfig), on `x_cal` (default: the
    seed's calibration noise)."""
    fit = (errors.get_fit_config(method) if method in errors.VARIANTS else method) \
        if isinstance(method, str) else method
    if fit is None:
      return self.none[sampler_name]
    key = ("fit", sampler_name, fit)
    if x_cal is None and key in self._memo:  # only fits on the seed's own noise are memoised
      return self._memo[key]
    x = seed.x_cal if x_cal is None else x_cal
    if fit == errors.SAFE_METHOD:
      p, _ = errors.calibrate_safe(self.fp, self.var_fp, qm.apply_fn("fake"), qm.variables,
                                   self.samplers[sampler_name][0], x, seed.key_cal,
                                   schedule=self.schedule)
    else:
      p = self.samplers[sampler_name][1].calibrate(qm.apply_fn("fake"), fit, self.var_fp,
                                                   qm.variables, x, seed.key_cal, None)
    p = errors.compensation.check_params_finite(p, f"{sampler_name} calibration")
    if x_cal is None:
      self._memo[key] = p
    return p

  def evaluate(self, qm, seed: _Seed, sampler_name: str, params) -> Dict[str, Any]:
    """PSNR / SSIM / per-step error RMS against float on the seed's evaluation noise."""
    key = ("eval", sampler_name, id(params))
    if key in self._memo:
      return self._memo[key][1]
    x_q, traj, _ = self.samplers[sampler_name][1].run(qm.apply_fn("fake"), qm.variables, params,
                                                       seed.x_eval, seed.key_eval)
    fp = seed.fp[sampler_name]
    q = metrics.quality_ratios(x_q, fp["x"])
    out = {"psnr": float(jnp.mean(metrics.psnr(x_q, fp["x"]))),
           "ssim": float(jnp.mean(metrics.ssim(x_q, fp["x"]))), "x": x_q,
           "std_ratio": float(q["std_ratio"]), "sharpness_ratio": float(q["sharpness_ratio"]),
           "error_rms_per_step": np.asarray(propagation.rms_per_step(
               samplers.step_outputs(traj, x_q) - fp["out"])).tolist()}
    self._memo[key] = (params, out)  # holding params keeps its id unique while memoised
    return out

  def record(self, **kw):
    kw.pop("x", None)
    self.records.append(kw)

  # --------------------------------------------------------------------------- stages

  def run(self) -> Dict[str, Any]:
    os.makedirs(self.outdir, exist_ok=True)
    cfg = self.cfg
    fx = frechet.FeatureExtractor() if cfg.num_fd > 0 else None
    self.grid_samples: Dict[str, Dict[str, np.ndarray]] = {}
    for si, seed_value in enumerate(self.seeds):
      seed = _Seed(self, seed_value)
      self.log(f"seed {seed_value}: float samples for {', '.join(self.sampler_names)}")
      for setting in self.settings:
        for option in self.ptq_options:
          qm = self.quantize(seed, setting, option)
          main = option == self.ptq_options[0]
          names = self.sampler_names if main else [cfg.ref_sampler]
          methods = self.methods if main else ["none", "tcec"]
          for sname in names:
            for method in methods:
              params = self.fit(qm, seed, sname, method)
              ev = self.evaluate(qm, seed, sname, params)
              if main and sname == cfg.ref_sampler and si == 0:
                self.grid_samples.setdefault(setting, {"float": seed.fp[sname]["x"]})[method] = ev["x"]
              self.record(kind="main" if main else "ptq", seed=seed_value, setting=setting,
                          ptq=option, sampler=sname, method=method, **ev)
          line = ", ".join(f"{r['method']} {r['psnr']:.2f}" for r in self.records
                           if r["seed"] == seed_value and r["setting"] == setting
                           and r["ptq"] == option and r["sampler"] == cfg.ref_sampler)
          self.log(f"seed {seed_value} {setting} {option}: PSNR at {cfg.ref_sampler}: {line}")
          if main:
            if si == 0:
              self.analysis(qm, seed, setting)
              if fx is not None:
                self.frechet(qm, seed, setting, fx)
            if setting in self.ablation_settings:
              self.ablations(qm, seed, setting)
      self.save(report=True)  # a complete report after every seed
    return self.save(report=True)

  def analysis(self, qm, seed: _Seed, setting: str):
    s, jitted = self.samplers[self.cfg.ref_sampler]
    fq = qm.apply_fn("fake")
    trace_cal = jitted.joint(fq, self.var_fp, qm.variables, seed.x_cal, seed.key_cal)
    phi = propagation.fit_channel_gains(trace_cal, s.coeffs.a, s.coeffs.b)
    trace = jitted.joint(fq, self.var_fp, qm.variables, seed.x_eval, seed.key_eval)
    rep = propagation.propagation_report(trace, s.coeffs.a, s.coeffs.b, phi)
    m, p = rep["measured_rms"], rep["closed_form_rms"]
    self.extra["analysis"].append({
        "setting": setting, "sampler": self.cfg.ref_sampler,
        "measured_rms": m.tolist(), "closed_form_rms": p.tolist(),
        "per_step_corr": rep["closed_form_corr"].tolist(),
        "rms_curve_corr": float(np.corrcoef(m, p)[0, 1]),
        "final_rel_err": float(rep["closed_form_rel_err"][-1])})
    self.log(f"{setting}: closed form vs measured, per-step corr "
             f"{np.mean(rep['closed_form_corr'][1:]):.3f}")

  def frechet(self, qm, seed: _Seed, setting: str, fx):
    cfg, sname = self.cfg, self.cfg.ref_sampler
    _, jitted = self.samplers[sname]
    key = jax.random.key(10_000 + self.seeds[0])
    x = jax.random.normal(key, (cfg.num_fd,) + self.shape)
    if not hasattr(self, "_fd_ref"):
      x_fp, _, _ = jitted.run(self.fp, self.var_fp, self.none[sname], x, key)
      real = data.load(self.cfg.fd_data, size=self.shape[0], seed=cfg.fd_data_seed)[:cfg.num_fd]
      self._fd_ref = {"float": fx(x_fp), "data": fx(real)}
      floor = frechet.frechet_distance(self._fd_ref["float"], self._fd_ref["data"])
      self.extra["fd"].append({"setting": "float", "method": "-", "fd_vs_float": 0.0,
                               "fd_vs_data": floor, "n": int(cfg.num_fd)})
      self.log(f"Frechet distance, float model vs data ({cfg.num_fd} samples): {floor:.3f}")
    for method in parse_list(cfg.fd_methods, self.methods, "FD method"):
      params = self.fit(qm, seed, sname, method)
      x_q, _, _ = jitted.run(qm.apply_fn("fake"), qm.variables, params, x, key)
      f = fx(np.clip(np.asarray(x_q), -1, 1))
      self.extra["fd"].append({
          "setting": setting, "method": method, "n": int(cfg.num_fd),
          "fd_vs_float": frechet.frechet_distance(f, self._fd_ref["float"]),
          "fd_vs_data": frechet.frechet_distance(f, self._fd_ref["data"])})
    self.log(f"{setting}: Frechet distance done")

  def ablations(self, qm, seed: _Seed, setting: str):
    ref = self.cfg.ref_sampler
    rows = []
    for name, fit in ABLATIONS.items():
      rows.append((name, self.evaluate(qm, seed, ref, self.fit(qm, seed, ref, fit))))
    for n in (int(v) for v in parse_list(str(self.cfg.calib_sizes), None, "size")):
      x_cal = jax.random.normal(jax.random.fold_in(seed.key_cal, 7), (n,) + self.shape)
      rows.append((f"calibration samples = {n}",
                   self.evaluate(qm, seed, ref, self.fit(qm, seed, ref, "tcec", x_cal=x_cal))))
    for other in self.sampler_names:
      if other != ref and other.startswith(ref[:4]):
        p = errors.resample_params(self.fit(qm, seed, other, "tcec"), self.samplers[ref][0])
        rows.append((f"calibrated at {other}, sampled at {ref}", self.evaluate(qm, seed, ref, p)))
    for name, ev in rows:
      self.extra["ablations"].append({"seed": seed.value, "setting": setting, "ablation": name,
                                      "psnr": ev["psnr"], "ssim": ev["ssim"]})
    self.log(f"seed {seed.value} {setting}: {len(rows)} ablations")

  # --------------------------------------------------------------------------- output

  def save(self, report: bool = False) -> Dict[str, Any]:
    out = {"config": self.cfg.to_dict(), "records": self.records, **self.extra,
           "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}"}
    with open(os.path.join(self.outdir, "sweep.json"), "w") as f:
      json.dump(out, f, indent=1)
    if report:
      report = write_report(out, self.outdir, self.samplers, self.grid_samples)
      self.log(f"wrote {self.outdir}/sweep.json, report.md and figures")
      out["report"] = report
    return out


# ----------------------------------------------------------------------------- report

def _mean_std(values) -> str:
  v = np.asarray(values, np.float64)
  return f"{v.mean():.2f} ± {v.std():.2f}"


def _group(records, keys):
  groups: Dict[Any, List[Dict[str, Any]]] = {}
  for r in records:
    groups.setdefault(tuple(r[k] for k in keys), []).append(r)
  return groups


def write_report(out: Dict[str, Any], outdir: str, sampler_map=None, grid_samples=None) -> str:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  cfg = out["config"]
  recs = out["records"]
  main = [r for r in recs if r["kind"] == "main"]
  seeds = sorted({r["seed"] for r in recs})
  settings = list(dict.fromkeys(r["setting"] for r in main))
  methods = list(dict.fromkeys(r["method"] for r in main))
  snames = list(dict.fromkeys(r["sampler"] for r in main))
  lines = ["# Sweep report\n",
           f"`python experiments/sweep.py --outdir={outdir}` on the embedded default model; "
           f"seeds {seeds}; {cfg['num_calib']} calibration and {cfg['num_eval']} evaluation "
           f"samples per seed; PSNR / SSIM of final samples against the float model's samples "
           f"from the same noise, fake-quant path; mean ± std over seeds of each seed's mean. "
           f"Device: {out['device']}.\n"]

  # Main table: rows setting x method, columns samplers.
  g = _group(main, ("setting", "method", "sampler"))
  lines.append("## PSNR (dB) by setting, method and sampler\n")
  lines.append("| setting | method | " + " | ".join(snames) + " |")
  lines.append("|---|---|" + "---|" * len(snames))
  for s in settings:
    for m in methods:
      cells = [_mean_std([r["psnr"] for r in g.get((s, m, n), [])]) if g.get((s, m, n)) else "-"
               for n in snames]
      lines.append(f"| {s} | {m} | " + " | ".join(cells) + " |")
  lines.append("")
  for field, title in (("ssim", "SSIM"), ("std_ratio", "pixel std / float's"),
                       ("sharpness_ratio", "mean |Laplacian| / float's")):
    lines.append(f"### {title} at {cfg['ref_sampler']}\n")
    lines.append("| setting | " + " | ".join(methods) + " |")
    lines.append("|---|" + "---|" * len(methods))
    for s in settings:
      cells = [_mean_std([r.get(field, np.nan) for r in g.get((s, m, cfg["ref_sampler"]), [])])
               for m in methods]
      lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines.append("")

  # PTQ options.
  ptq = [r for r in recs if r["sampler"] == cfg["ref_sampler"] and r["method"] in ("none", "tcec")]
  gp = _group(ptq, ("setting", "ptq", "method"))
  options = list(dict.fromkeys(r["ptq"] for r in ptq))
  lines.append(f"## PTQ options, with and without TCEC ({cfg['ref_sampler']}, PSNR dB)\n")
  lines.append("PTQ ranges come from the float sampler's trajectories at all timesteps "
               "(uniform over timesteps, as Q-Diffusion); `_tg4` keeps 4 timestep groups of "
               "activation ranges; `mse` searches the clipping range that minimises MSE.\n")
  lines.append("| setting | PTQ | none | tcec | gain |")
  lines.append("|---|---|---|---|---|")
  for s in settings:
    for o in options:
      a, b = gp.get((s, o, "none")), gp.get((s, o, "tcec"))
      if a and b:
        gain = np.mean([r["psnr"] for r in b]) - np.mean([r["psnr"] for r in a])
        lines.append(f"| {s} | {o} | {_mean_std([r['psnr'] for r in a])} | "
                     f"{_mean_std([r['psnr'] for r in b])} | {gain:+.2f} |")
  lines.append("")

  # Frechet distance.
  if out["fd"]:
    n = out["fd"][0]["n"]
    lines.append(f"## Frechet distance ({n} samples, {cfg['ref_sampler']}, seed {seeds[0]})\n")
    lines.append("In the 64-d feature space of the small digit classifier shipped in "
                 "`tac_jax/assets/classifier` (an FID-style distance for this data set, "
                 "not Inception FID). `vs float`: against the float model's samples from the "
                 "same noise; `vs data`: against real colored digits; the float row is the floor.\n")
    lines.append("| setting | method | FD vs float | FD vs data |")
    lines.append("|---|---|---|---|")
    for r in out["fd"]:
      lines.append(f"| {r['setting']} | {r['method']} | {r['fd_vs_float']:.3f} | {r['fd_vs_data']:.3f} |")
    lines.append("")

  # Ablations.
  if out["ablations"]:
    ga = _group(out["ablations"], ("setting", "ablation"))
    abl_settings = list(dict.fromkeys(r["setting"] for r in out["ablations"]))
    names = list(dict.fromkeys(r["ablation"] for r in out["ablations"]))
    lines.append(f"## Ablations of TCEC ({cfg['ref_sampler']}, PSNR dB, mean ± std over seeds)\n")
    lines.append("| ablation | " + " | ".join(abl_settings) + " |")
    lines.append("|---|" + "---|" * len(abl_settings))
    for name in names:
      lines.append(f"| {name} | " + " | ".join(
          _mean_std([r["psnr"] for r in ga.get((s, name), [])]) if ga.get((s, name)) else "-"
          for s in abl_settings) + " |")
    lines.append("")

  # Error analysis.
  if out["analysis"]:
    lines.append(f"## Error analysis ({cfg['ref_sampler']}, seed {seeds[0]}, no compensation)\n")
    lines.append("Per-step cumulative error measured on the evaluation seeds vs predicted by the "
                 "closed form (diagonal phi fitted on the calibration seeds, driven by the "
                 "measured per-step errors).\n")
    lines.append("| setting | final RMS measured | final RMS predicted | corr of RMS curves | "
                 "mean per-step corr | final rel. error |")
    lines.append("|---|---|---|---|---|---|")
    for r in out["analysis"]:
      lines.append(f"| {r['setting']} | {r['measured_rms'][-1]:.4f} | {r['closed_form_rms'][-1]:.4f} | "
                   f"{r['rms_curve_corr']:.3f} | {np.mean(r['per_step_corr'][1:]):.3f} | "
                   f"{r['final_rel_err']:.3f} |")
    lines.append("")

  # Plots.
  steps_of = {n: parse_sampler(n) for n in snames}
  ddim = sorted([n for n in snames if steps_of[n][0] == "ddim"], key=lambda n: steps_of[n][1])
  figs = []
  def panels(path, draw, xlabel, ylabel, log=False):
    """One panel per setting; draw(ax, setting) plots the curves."""
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.4), squeeze=False)
    for ax, s in zip(axes[0], settings):
      draw(ax, s)
      ax.set(title=s, xlabel=xlabel, ylabel=ylabel, yscale="log" if log else "linear")
      ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(outdir, path), dpi=110)
    plt.close(fig)

  def psnr_curves(ax, s):
    for m in methods:
      vals = [[r["psnr"] for r in g.get((s, m, n), [])] for n in ddim]
      ax.errorbar([steps_of[n][1] for n in ddim], [np.mean(v) for v in vals],
                  yerr=[np.std(v) for v in vals], marker="o", label=m, capsize=3)

  ref = cfg["ref_sampler"]

  def error_curves(ax, s):
    for m in methods:
      curves = [r["error_rms_per_step"] for r in g.get((s, m, ref), []) if "error_rms_per_step" in r]
      if curves:
        ax.plot(np.mean(curves, 0), label=m)
    an = [r for r in out["analysis"] if r["setting"] == s]
    if an:
      ax.plot(an[0]["closed_form_rms"], "k--", label="closed form (none)")

  if len(ddim) > 1:
    panels("psnr_vs_steps.png", psnr_curves, "DDIM steps", "PSNR vs float (dB)")
    figs.append(("PSNR vs sampling steps", "psnr_vs_steps.png"))
  panels("error_vs_step.png", error_curves, f"step ({ref})", "cumulative error RMS", log=True)
  figs.append(("Cumulative error per step (mean over seeds)", "error_vs_step.png"))
  for s in settings:
    path = f"grid_{s}.png"
    if grid_samples and s in grid_samples:
      viz.save_comparison(os.path.join(outdir, path),
                          {k: np.clip(np.asarray(v), -1, 1) for k, v in grid_samples[s].items()})
    if os.path.exists(os.path.join(outdir, path)):  # re-rendered reports keep earlier grids
      figs.append((f"{s} samples at {ref}, seed {seeds[0]}: float, then each method", path))
  lines.append("## Figures\n")
  for title, path in figs:
    lines.append(f"{title}:\n\n![{title}]({path})\n")
  report = "\n".join(lines)
  with open(os.path.join(outdir, "report.md"), "w") as f:
    f.write(report)
  with open(os.path.join(outdir, "headline.md"), "w") as f:
    f.write(headline_table(out))
  return report


def headline_table(out: Dict[str, Any]) -> str:
  """Per setting and method at the reference sampler: PSNR, SSIM (mean ± std over seeds)
  and the Frechet distance to real data (first seed)."""
  ref = out["config"]["ref_sampler"]
  main = [r for r in out["records"] if r["kind"] == "main" and r["sampler"] == ref]
  g = _group(main, ("setting", "method"))
  fd = {(r["setting"], r["method"]): r["fd_vs_data"] for r in out["fd"]}
  floor = fd.get(("float", "-"))
  lines = ["| setting | method | PSNR (dB) | SSIM | std ratio | sharpness ratio | FD vs data |",
           "|---|---|---|---|---|---|---|"]
  for (s, m), rs in g.items():
    f = fd.get((s, m))
    lines.append(f"| {s} | {m} | {_mean_std([r['psnr'] for r in rs])} | "
                 f"{np.mean([r['ssim'] for r in rs]):.3f} | "
                 f"{np.mean([r.get('std_ratio', np.nan) for r in rs]):.3f} | "
                 f"{np.mean([r.get('sharpness_ratio', np.nan) for r in rs]):.3f} | "
                 f"{'-' if f is None else f'{f:.1f}'} |")
  if floor is not None:
    lines.append(f"| float | - | - | - | - | - | {floor:.1f} |")
  return "\n".join(lines) + "\n"
