"""Markdown tables of the main job's and the sweep's results (pure: records in, text out).

Figures are drawn by `viz`; files are written by the launchers' `write_*` functions.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> List[str]:
  """Lines of a markdown table."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return lines


def mean_std(values) -> str:
  """'mean ± std' over seeds; a single value alone (one seed has no spread)."""
  v = np.asarray(values, np.float64)
  if v.size == 1:
    return f"{v[0]:.2f}"
  return f"{v.mean():.2f} ± {v.std():.2f}" if v.size else "-"


def group(records, keys) -> Dict[Any, List[Dict[str, Any]]]:
  groups: Dict[Any, List[Dict[str, Any]]] = {}
  for r in records:
    groups.setdefault(tuple(r[k] for k in keys), []).append(r)
  return groups


def unique(values) -> List[Any]:
  return list(dict.fromkeys(values))


# ----------------------------------------------------------------------------- main job

def best_baseline(entries: List[Dict[str, Any]], default: str) -> Optional[str]:
  """The method other than none and the default with the highest PSNR."""
  others = [e for e in entries if e["method"] not in ("none", default)]
  return max(others, key=lambda e: e["psnr_fake"]["mean"])["method"] if others else None


def strength_label(v) -> str:
  """A tcec_safe strength: `0.5`, or per segment of steps `0.25/1`."""
  return "/".join(f"{x:g}" for x in v) if isinstance(v, (list, tuple)) else f"{v:g}"


def _method_label(r: Dict[str, Any]) -> str:
  name = r["method"]
  if "safe" in r:
    sf = r["safe"]
    name += " (fell back)" if sf["fell_back"] else \
        f" (gain {strength_label(sf['gain'])}, offset {strength_label(sf['offset'])})"
  elif "threshold" in r.get("selection", {}):
    name += f" (threshold {r['selection']['threshold']:g})"
  return name + (" **diverged**" if r.get("diverged") else "")


def _main_row(r: Dict[str, Any], base_psnr: float, has_fd: bool, has_acc: bool) -> List[str]:
  pf, plain = r["psnr_fake"], r["method"] == "none"
  cells = [r["setting"], r["ptq"], _method_label(r), f"{pf['mean']:.2f} ± {pf['std']:.2f}",
           "-" if plain else f"{pf['mean'] - base_psnr:+.2f}", f"{r['ssim_fake']['mean']:.3f}",
           f"{r['std_ratio']:.3f}", f"{r['sharpness_ratio']:.3f}"]
  if has_fd:
    cells += [f"{r['fd_vs_float']:.1f}", f"{r['fd_vs_data']:.1f}"]
  if has_acc:
    cells.append(f"{100 * r['label_accuracy']:.1f}%" if "label_accuracy" in r else "-")
  t, mem = r.get("timing"), r["memory_bytes"]
  cells += [f"{r['psnr_int']['mean']:.2f}" if "psnr_int" in r else "-",
            "-" if plain else f"{r['calibration_s']:.1f}",
            f"{100 * t['overhead_ab']:+.2f}%, {100 * t['overhead_ops']:.3f}%" if t else "-",
            _weights_cell(mem)]
  return cells


def _weights_cell(mem: Dict[str, int]) -> str:
  """float -> stored integer weights (+ scales etc., + the float low-rank branch), MB."""
  cell = f"{mem['layers_float32'] / 1e6:.2f} -> {mem['layers_stored'] / 1e6:.2f}"
  if mem.get("layers_overhead"):
    cell += f" + {mem['layers_overhead'] / 1e6:.2f} scales"
  if mem.get("low_rank_float32"):
    cell += f" + {mem['low_rank_float32'] / 1e6:.2f} low-rank"
  return cell


def results_table(results: Dict[str, Any]) -> str:
  """Markdown: every setting x PTQ preset x method with fidelity, quality and cost columns."""
  runs = results["runs"]
  has_fd = any("fd_vs_data" in r for r in runs)
  has_acc = any("label_accuracy" in r for r in runs)
  header = (["setting", "PTQ", "method", "PSNR (dB)", "gain (dB)", "SSIM", "std ratio",
             "sharpness ratio"] + (["FD vs float", "FD vs data"] if has_fd else [])
            + (["label acc."] if has_acc else [])
            + ["PSNR int (dB)", "calib. (s)", "overhead (A/B, ops)", "weights (MB)"])
  base = {(r["setting"], r["ptq"]): r["psnr_fake"]["mean"] for r in runs
          if r["method"] == "none"}
  lines = markdown_table(header, (_main_row(r, base[(r["setting"], r["ptq"])], has_fd, has_acc)
                                  for r in runs))
  if results.get("fd_float_vs_data") is not None:
    lines.append(f"\nFloat model's own FD vs data: {results['fd_float_vs_data']:.1f}.")
  if results.get("label_accuracy_float") is not None:
    lines.append(f"Float model's label accuracy (the shipped classifier's class = the "
                 f"requested one): {100 * results['label_accuracy_float']:.1f}%.")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- sweep

def sweep_intro(out: Dict[str, Any], outdir: str) -> List[str]:
  cfg, seeds = out["config"], sorted({r["seed"] for r in out["records"]})
  command = out.get("command") or f"python experiments/sweep.py --outdir={outdir}"
  return ["# Sweep report\n",
          f"`{command}` on the embedded default model; "
          f"seeds {seeds}; {cfg['num_calib']} calibration and {cfg['num_eval']} evaluation "
          f"samples per seed; PSNR / SSIM of final samples against the float model's samples "
          f"from the same noise, fake-quant path; "
          + ("mean ± std over seeds of each seed's mean. " if len(seeds) > 1 else
             "one seed: means over its samples, no spread over seeds. ") +
          f"Device: {out['device']}.\n"]


def sweep_main_tables(out: Dict[str, Any]) -> List[str]:
  """PSNR by setting x method x sampler, then SSIM / contrast / sharpness at the reference."""
  ref, main = out["config"]["ref_sampler"], [r for r in out["records"] if r["kind"] == "main"]
  settings, methods = unique(r["setting"] for r in main), unique(r["method"] for r in main)
  snames, g = unique(r["sampler"] for r in main), group(main, ("setting", "method", "sampler"))
  lines = ["## PSNR (dB) by setting, method and sampler\n"]
  lines += markdown_table(["setting", "method"] + snames, (
      [s, m] + [mean_std([r["psnr"] for r in g.get((s, m, n), [])]) for n in snames]
      for s in settings for m in methods))
  lines.append("")
  for field, title in (("ssim", "SSIM"), ("std_ratio", "pixel std / float's"),
                       ("sharpness_ratio", "mean |Laplacian| / float's")):
    lines.append(f"### {title} at {ref}\n")
    lines += markdown_table(["setting"] + methods, (
        [s] + [mean_std([r[field] for r in g.get((s, m, ref), [])]) for m in methods]
        for s in settings))
    lines.append("")
  return lines


def sweep_ptq_table(out: Dict[str, Any]) -> List[str]:
  ref = out["config"]["ref_sampler"]
  ptq = [r for r in out["records"] if r["sampler"] == ref and r["method"] in ("none", "tcec")]
  gp, rows = group(ptq, ("setting", "ptq", "method")), []
  for s in unique(r["setting"] for r in ptq):
    for o in unique(r["ptq"] for r in ptq):
      a, b = gp.get((s, o, "none")), gp.get((s, o, "tcec"))
      if a and b:
        gain = np.mean([r["psnr"] for r in b]) - np.mean([r["psnr"] for r in a])
        rows.append([s, o, mean_std([r["psnr"] for r in a]), mean_std([r["psnr"] for r in b]),
                     f"{gain:+.2f}"])
  return ([f"## PTQ options, with and without TCEC ({ref}, PSNR dB)\n",
           "PTQ ranges come from the float sampler's trajectories at all timesteps "
           "(uniform over timesteps, as Q-Diffusion); `_tg4` keeps 4 timestep groups of "
           "activation ranges; `mse` searches the clipping range that minimises MSE.\n"]
          + markdown_table(["setting", "PTQ", "none", "tcec", "gain"], rows) + [""])


def sweep_fd_table(out: Dict[str, Any]) -> List[str]:
  if not out["fd"]:
    return []
  seed = min(r["seed"] for r in out["records"])
  return ([f"## Frechet distance ({out['fd'][0]['n']} samples, {out['config']['ref_sampler']}, "
           f"seed {seed})\n",
           "In the 64-d feature space of the small digit classifier shipped in "
           "`tac_jax/assets/classifier` (an FID-style distance for this data set, not "
           "Inception FID). `vs float`: against the float model's samples from the same noise; "
           "`vs data`: against real colored digits; the float row is the floor.\n"]
          + markdown_table(["setting", "method", "FD vs float", "FD vs data"], (
              [r["setting"], r["method"], f"{r['fd_vs_float']:.3f}", f"{r['fd_vs_data']:.3f}"]
              for r in out["fd"])) + [""])


def sweep_ablation_table(out: Dict[str, Any]) -> List[str]:
  if not out["ablations"]:
    return []
  ga = group(out["ablations"], ("setting", "ablation"))
  settings = unique(r["setting"] for r in out["ablations"])
  return ([f"## Ablations of TCEC ({out['config']['ref_sampler']}, PSNR dB, mean ± std over "
           "seeds)\n"]
          + markdown_table(["ablation"] + settings, (
              [name] + [mean_std([r["psnr"] for r in ga.get((s, name), [])]) for s in settings]
              for name in unique(r["ablation"] for r in out["ablations"]))) + [""])


def sweep_analysis_table(out: Dict[str, Any]) -> List[str]:
  if not out["analysis"]:
    return []
  seed = min(r["seed"] for r in out["records"])
  return ([f"## Error analysis ({out['config']['ref_sampler']}, seed {seed}, no compensation)\n",
           "Per-step cumulative error measured on the evaluation seeds vs predicted by the "
           "closed form (diagonal phi fitted on the calibration seeds, driven by the measured "
           "per-step errors).\n"]
          + markdown_table(["setting", "final RMS measured", "final RMS predicted",
                            "corr of RMS curves", "mean per-step corr", "final rel. error"], (
              [r["setting"], f"{r['measured_rms'][-1]:.4f}", f"{r['closed_form_rms'][-1]:.4f}",
               f"{r['rms_curve_corr']:.3f}", f"{np.mean(r['per_step_corr'][1:]):.3f}",
               f"{r['final_rel_err']:.3f}"] for r in out["analysis"])) + [""])


def sweep_report(out: Dict[str, Any], outdir: str, figures: Sequence[tuple]) -> str:
  """The whole report.md: tables, then the (title, file) figures."""
  lines = (sweep_intro(out, outdir) + sweep_main_tables(out) + sweep_ptq_table(out)
           + sweep_fd_table(out) + sweep_ablation_table(out) + sweep_analysis_table(out))
  lines.append("## Figures\n")
  lines += [f"{title}:\n\n![{title}]({path})\n" for title, path in figures]
  return "\n".join(lines)


def headline_table(out: Dict[str, Any]) -> str:
  """Per setting and method at the reference sampler: PSNR, SSIM (mean ± std over seeds),
  contrast and sharpness ratios, and the Frechet distance to real data (first seed)."""
  ref = out["config"]["ref_sampler"]
  main = [r for r in out["records"] if r["kind"] == "main" and r["sampler"] == ref]
  fd = {(r["setting"], r["method"]): r["fd_vs_data"] for r in out["fd"]}
  rows = [[s, m, mean_std([r["psnr"] for r in rs]), f"{np.mean([r['ssim'] for r in rs]):.3f}",
           f"{np.mean([r['std_ratio'] for r in rs]):.3f}",
           f"{np.mean([r['sharpness_ratio'] for r in rs]):.3f}",
           "-" if fd.get((s, m)) is None else f"{fd[(s, m)]:.1f}"]
          for (s, m), rs in group(main, ("setting", "method")).items()]
  if fd.get(("float", "-")) is not None:
    rows.append(["float", "-", "-", "-", "-", "-", f"{fd[('float', '-')]:.1f}"])
  return "\n".join(markdown_table(["setting", "method", "PSNR (dB)", "SSIM", "std ratio",
                                   "sharpness ratio", "FD vs data"], rows)) + "\n"


def group_reasons(reasons: Dict[str, str]) -> str:
  """{layer: why} as one line, layers that share a reason listed once with it:
  "a, b (why); c (other)"."""
  by_reason: Dict[str, List[str]] = {}
  for name, why in reasons.items():
    by_reason.setdefault(why, []).append(name)
  return "; ".join(f"{', '.join(names)} ({why})" for why, names in by_reason.items())
