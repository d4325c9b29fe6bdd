"""Checks the safe-compensation bar on main-job result folders and prints one table.

For every (setting, PTQ preset) of every folder: the default method (`tcec_safe`) against
plain PTQ (`none`) -- PSNR no more than `--psnr_tol` dB below, FD (vs float and vs data)
no more than `--fd_tol` above -- and against every other method it was run with (how
many it beats on PSNR and on FD vs data).

  python experiments/acceptance.py                      # the docs/results* folders
  python experiments/acceptance.py --dirs=runs/a,runs/b --method=tcec
"""

import glob
import json
import os
from typing import Any, Dict, List

from absl import flags

from tac_jax.app import launch, report

_DIRS = flags.DEFINE_list("dirs", None, "result folders (default: docs/results*)")
_METHOD = flags.DEFINE_string("method", "tcec_safe", "the method checked against the bar")
_PSNR_TOL = flags.DEFINE_float("psnr_tol", 0.2, "dB the method may lose to plain PTQ")
_FD_TOL = flags.DEFINE_float("fd_tol", 0.05, "relative FD increase over plain PTQ allowed")


def rows_of(results: Dict[str, Any], method: str, psnr_tol: float, fd_tol: float) -> List[Dict]:
  """One row per (setting, preset) holding `method` and `none`."""
  cfg = results["config"]
  model = os.path.basename(os.path.normpath(results["checkpoint"]))
  sampler = f"{cfg['sampler']} {cfg['num_steps']}"
  groups: Dict[tuple, Dict[str, Dict]] = {}
  for r in results["runs"]:
    # ("observer", "variant": the names in result folders written before the PTQ presets)
    groups.setdefault((r["setting"], r.get("ptq", r.get("observer"))), {})[
        r.get("method", r.get("variant"))] = r
  out = []
  for (setting, obs), runs in groups.items():
    if method not in runs or "none" not in runs:
      continue
    m, n = runs[method], runs["none"]
    others = {k: v for k, v in runs.items() if k not in (method, "none")}
    psnr = lambda r: r["psnr_fake"]["mean"]
    row = {"model": model, "sampler": sampler, "setting": setting, "ptq": obs,
           "psnr_none": psnr(n), "psnr": psnr(m), "fd_float_none": n.get("fd_vs_float"),
           "fd_float": m.get("fd_vs_float"), "fd_data_none": n.get("fd_vs_data"),
           "fd_data": m.get("fd_vs_data"), "safe": m.get("safe"), "others": len(others),
           # per other method: (higher PSNR, lower FD vs float, lower FD vs data)
           "versus": {k: (psnr(m) > psnr(o), m.get("fd_vs_float", 0) < o.get("fd_vs_float", 0),
                          m.get("fd_vs_data", 0) < o.get("fd_vs_data", 0))
                      for k, o in others.items()}}
    row["beats_psnr"] = sum(v[0] for v in row["versus"].values())
    row["beats_fd"] = sum(v[2] for v in row["versus"].values())
    row["psnr_ok"] = row["psnr"] >= row["psnr_none"] - psnr_tol
    row["fd_ok"] = all(v is None or v <= v0 * (1 + fd_tol) for v, v0 in
                       ((row["fd_float"], row["fd_float_none"]), (row["fd_data"], row["fd_data_none"])))
    out.append(row)
  return out


def _strength(safe) -> str:
  if not safe:
    return "-"
  return "fell back" if safe["fell_back"] else \
      f"{report.strength_label(safe['gain'])} / {report.strength_label(safe['offset'])}"


def _fd(v, v0) -> str:
  return "-" if v is None else f"{v0:.0f} -> {v:.0f} ({100 * (v / v0 - 1):+.0f} %)"


def table(rows: List[Dict], method: str) -> str:
  lines = [f"| model | sampler | PTQ | setting | PSNR none -> {method} (dB) | FD vs float | "
           "FD vs data | strength (gain / offset) | bar | beats on PSNR | beats on FD vs data |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    bar = "ok" if r["psnr_ok"] and r["fd_ok"] else ("PSNR " if not r["psnr_ok"] else "") + \
        ("FD" if not r["fd_ok"] else "")
    lines.append(
        f"| {r['model']} | {r['sampler']} | {r['ptq']} | {r['setting']} | "
        f"{r['psnr_none']:.2f} -> {r['psnr']:.2f} ({r['psnr'] - r['psnr_none']:+.2f}) | "
        f"{_fd(r['fd_float'], r['fd_float_none'])} | {_fd(r['fd_data'], r['fd_data_none'])} | "
        f"{_strength(r['safe'])} | {bar.strip()} | "
        + (f"{r['beats_psnr']} of {r['others']} | {r['beats_fd']} of {r['others']} |"
           if r["others"] else "- | - |"))
  return "\n".join(lines)


def versus(rows: List[Dict], method: str) -> str:
  """Per other method: in how many rows `method` has the higher PSNR / the lower FDs."""
  names = sorted({k for r in rows for k in r["versus"]})
  lines = [f"| {method} vs | rows | higher PSNR | lower FD vs float | lower FD vs data |",
           "|---|---|---|---|---|"]
  for k in names:
    v = [r["versus"][k] for r in rows if k in r["versus"]]
    lines.append(f"| {k} | {len(v)} | " + " | ".join(str(sum(x[j] for x in v)) for j in range(3))
                 + " |")
  return "\n".join(lines)


def main():
  dirs = _DIRS.value or sorted(d for d in glob.glob("docs/results*") if os.path.isdir(d))
  rows = []
  for d in dirs:
    path = os.path.join(d, "results.json")
    if not os.path.exists(path):
      raise SystemExit(f"{path} not found: give main-job output folders (experiments/quantize.py).")
    with open(path) as f:
      rows += rows_of(json.load(f), _METHOD.value, _PSNR_TOL.value, _FD_TOL.value)
  if not rows:
    raise SystemExit(f"no folder holds both 'none' and {_METHOD.value!r}.")
  print(table(rows, _METHOD.value))
  if any(r["versus"] for r in rows):
    print("\n" + versus(rows, _METHOD.value))
  ok = sum(r["psnr_ok"] and r["fd_ok"] for r in rows)
  compared = [r for r in rows if r["others"]]
  print(f"\n{_METHOD.value}: bar met in {ok} of {len(rows)} rows (PSNR >= none - {_PSNR_TOL.value} dB, "
        f"FD <= none x {1 + _FD_TOL.value:g}); fell back in "
        f"{sum(bool(r['safe'] and r['safe']['fell_back']) for r in rows)}; best PSNR of all methods "
        f"in {sum(r['beats_psnr'] == r['others'] for r in compared)} of {len(compared)} rows with "
        f"other methods, best FD vs data in {sum(r['beats_fd'] == r['others'] for r in compared)}.")


if __name__ == "__main__":
  launch.main(main)
