"""The leaderboard: every method of main-job result folders side by side, with paired
bootstrap intervals on each method's difference to the best, so that "beats" means
outside noise (experiments/leaderboard.py writes docs/leaderboard.md from it).

Per (folder, setting, PTQ preset) the evaluation seeds are shared by every method (same
noise), so differences are paired: a resample draws seeds with replacement and every
method's mean PSNR, and its Frechet distance to the float samples (from the classifier
features the main job keeps in features.npz), is recomputed on the same draw. A method is
"within" the best when the `confidence` interval of its difference to the best contains 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from tac_jax.app import report
from tac_jax.metrics import frechet

BAR_DB, BAR_FD = 0.2, 0.05     # the default may not lose more than this to plain PTQ
FAILURES = {"psnr_ok": "PSNR beaten beyond noise", "fd_ok": "FD beaten beyond noise",
            "bar_psnr": "more than the bar below plain PTQ's PSNR",
            "bar_fd": "FD more than the bar above plain PTQ's"}


@dataclasses.dataclass(frozen=True)
class Score:
  """One method in one row: its value, its difference to the row's best and that
  difference's interval (None where the data for it are missing)."""
  value: float
  diff: float
  lo: float
  hi: float

  @property
  def within(self) -> bool:
    """Best, or not distinguishable from the best (lower is better for FD: see `Row`)."""
    return self.lo <= 0.0 <= self.hi or self.diff == 0.0


@dataclasses.dataclass(frozen=True)
class Row:
  folder: str
  model: str                              # the checkpoint's folder name
  setting: str
  ptq: str
  methods: Tuple[str, ...]
  psnr: Dict[str, Score]
  fd: Dict[str, Score]                    # FD vs float (empty without features)
  entries: Dict[str, Dict[str, Any]]      # the results.json entries


def load_folder(directory: str):
  """(results.json, features dict or None) of a main-job folder."""
  with open(os.path.join(directory, "results.json")) as f:
    res = json.load(f)
  path = os.path.join(directory, "features.npz")
  feats = dict(np.load(path)) if os.path.exists(path) else None
  return res, feats


def _interval(samples: np.ndarray, confidence: float) -> Tuple[float, float]:
  a = (1.0 - confidence) / 2
  return float(np.quantile(samples, a)), float(np.quantile(samples, 1 - a))


def psnr_scores(per_sample: Dict[str, np.ndarray], idx: np.ndarray, confidence: float):
  """Score per method: mean PSNR, difference to the best mean, paired interval."""
  means = {m: float(v.mean()) for m, v in per_sample.items()}
  best = max(means, key=means.get)
  out = {}
  for m, v in per_sample.items():
    d = v[idx].mean(axis=1) - per_sample[best][idx].mean(axis=1)
    out[m] = Score(means[m], means[m] - means[best], *_interval(d, confidence))
  return out


def fd_scores(feats: Dict[str, np.ndarray], ref: np.ndarray, idx: np.ndarray, confidence: float):
  """Score per method: FD vs float, difference to the lowest, paired interval."""
  point = {m: frechet.frechet_distance(f, ref) for m, f in feats.items()}
  resampled = {m: frechet.resampled_distances(f, ref, idx) for m, f in feats.items()}
  best = min(point, key=point.get)
  return {m: Score(point[m], point[m] - point[best],
                   *_interval(resampled[m] - resampled[best], confidence)) for m in feats}


def rows_of(directory: str, resamples: int = 1000, confidence: float = 0.9) -> List[Row]:
  res, feats = load_folder(directory)
  groups = report.group(res["runs"], ("setting", "ptq"))
  rows = []
  for (setting, ptq), entries in groups.items():
    by = {e["method"]: e for e in entries}
    if not all("psnr_samples" in e for e in entries):
      raise ValueError(f"{directory}: results.json has no per-sample PSNR (psnr_samples); "
                       "rerun the main job with this version.")
    per = {m: np.asarray(e["psnr_samples"], np.float64) for m, e in by.items()}
    idx = frechet.bootstrap_indices(len(next(iter(per.values()))), resamples)
    fd = {}
    if feats is not None and "float" in feats:
      fd = fd_scores({m: feats[f"{setting}/{ptq}/{m}"] for m in by}, feats["float"], idx,
                     confidence)
    model = os.path.basename(os.path.normpath(res.get("checkpoint") or directory))
    rows.append(Row(os.path.normpath(directory), model, setting, ptq, tuple(by),
                    psnr_scores(per, idx, confidence), fd, by))
  return rows


def _cell(s: Optional[Score], fmt: str) -> str:
  if s is None:
    return "-"
  mark = "**" if s.diff == 0 else ""
  return f"{mark}{s.value:{fmt}}{mark}" + ("" if s.within else " ✗")


def default_verdict(row: Row, method: str) -> Dict[str, Any]:
  """Whether `method` is best or within the interval of the best (PSNR, FD vs float), and
  whether it stays within the bar of plain PTQ."""
  p, none = row.psnr[method], row.psnr["none"]
  out = {"psnr_ok": p.within, "fd_ok": (not row.fd) or row.fd[method].within,
         "bar_psnr": p.value >= none.value - BAR_DB, "bar_fd": True}
  if row.fd:
    out["bar_fd"] = row.fd[method].value <= row.fd["none"].value * (1 + BAR_FD)
  return out


def markdown(rows: Sequence[Row], method: str, command: str, confidence: float) -> str:
  """The leaderboard page: one table per folder, then the default's verdict row by row."""
  methods = report.unique(m for r in rows for m in r.methods)
  lines = [f"# Leaderboard\n\nGenerated by `{command}`. Per row: mean PSNR vs float (dB) and "
           "FD vs float (shipped classifier features, lower is better) on the evaluation "
           f"seeds; **bold** is the best, ✗ marks a method whose {confidence:.0%} paired "
           "bootstrap interval of the difference to the best excludes 0 (it is beaten "
           "beyond noise).\n"]
  for folder in report.unique(r.folder for r in rows):
    sub = [r for r in rows if r.folder == folder]
    lines += [f"## {folder}\n", "PSNR (dB):\n"]
    lines += report.markdown_table(["setting", "PTQ"] + methods, [
        [r.setting, r.ptq] + [_cell(r.psnr.get(m), ".2f") for m in methods] for r in sub])
    if any(r.fd for r in sub):
      lines += ["", "FD vs float:\n"]
      lines += report.markdown_table(["setting", "PTQ"] + methods, [
          [r.setting, r.ptq] + [_cell(r.fd.get(m), ".1f") for m in methods] for r in sub])
    lines += ["", "Calibration seconds / extra network calls per sampling step:\n"]
    lines += report.markdown_table(["setting", "PTQ"] + methods, [
        [r.setting, r.ptq] + [f"{r.entries[m]['calibration_s']:.1f} / "
                              f"{r.entries[m].get('extra_calls_per_step', 0):g}"
                              if m in r.entries else "-" for m in methods] for r in sub])
    lines.append("")
  lines += verdict_lines(rows, method)
  return "\n".join(lines) + "\n"


def verdict_lines(rows: Sequence[Row], method: str) -> List[str]:
  verdicts = [(r, default_verdict(r, method)) for r in rows if method in r.psnr]
  both = sum(v["psnr_ok"] and v["fd_ok"] for _, v in verdicts)
  bar = sum(v["bar_psnr"] and v["bar_fd"] for _, v in verdicts)
  lines = [f"## {method}\n", f"Best or within the interval of the best in PSNR and in FD vs "
           f"float: {both} of {len(verdicts)} rows; within the bar of plain PTQ ({BAR_DB} dB, "
           f"FD +{BAR_FD:.0%}): {bar} of {len(verdicts)} rows.\n"]
  for r, v in verdicts:
    if not all(v.values()):
      best_p = max(r.psnr, key=lambda m: r.psnr[m].value)
      what = [f"PSNR {r.psnr[method].value:.2f} vs {best_p} {r.psnr[best_p].value:.2f} dB"]
      if r.fd:
        best_f = min(r.fd, key=lambda m: r.fd[m].value)
        what.append(f"FD {r.fd[method].value:.1f} vs {best_f} {r.fd[best_f].value:.1f}")
      fails = [FAILURES[k] for k, ok in v.items() if not ok]
      lines.append(f"- {r.folder} {r.setting} {r.ptq}: {', '.join(what)} ({', '.join(fails)})")
  return lines


def headline(rows: Sequence[Row], method: str, command: str) -> str:
  """The README's table: per model and setting, plain PTQ, `method` and the best other
  method by PSNR (PSNR, FD vs float), ✗ where a method is beaten beyond noise."""
  table = []
  for r in rows:
    others = [m for m in r.methods if m not in ("none", method)]
    best = max(others, key=lambda m: r.psnr[m].value) if others else None
    cell = lambda m: (f"{_cell(r.psnr[m], '.2f')} / {_cell(r.fd.get(m), '.1f')}"
                      if m is not None else "-")
    table.append([r.model, r.setting, r.ptq, cell("none"), cell(method), best or "-", cell(best)])
  lines = report.markdown_table(["model", "setting", "PTQ", "plain PTQ", method, "best other",
                                 "its PSNR / FD"], table)
  return "\n".join([f"PSNR vs float (dB) / FD vs float, held-out seeds; **bold** best, ✗ beaten "
                    f"beyond the 90 % paired-bootstrap interval. Generated by `{command}`.", ""]
                   + lines) + "\n"


# The published folders and the command that regenerates docs/leaderboard.md and the
# README's table from them (tests/test_published.py checks both are up to date).
PUBLISHED = ("docs/results", "docs/results_svdquant", "docs/results_gray28",
             "docs/results_dit_flow", "docs/results_dit_flow_svdquant")
RESAMPLES = 200
COMMAND = "python experiments/leaderboard.py --out=docs/leaderboard.md --readme=README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def publish(dirs: Sequence[str], method: str = "tcec_safe", resamples: int = RESAMPLES,
            confidence: float = 0.9, command: str = COMMAND) -> Tuple[str, str]:
  """(leaderboard page, README table) of the folders `dirs`; `command` is named as what
  produced them."""
  rows = [r for d in dirs for r in rows_of(d, resamples, confidence)]
  return markdown(rows, method, command, confidence), headline(rows, method, command)


def replace_block(text: str, table: str) -> str:
  """`text` with the part between the results markers replaced by `table`."""
  if BEGIN not in text or END not in text:
    raise ValueError(f"the README has no {BEGIN} ... {END} block to fill.")
  head, rest = text.split(BEGIN, 1)
  return head + BEGIN + "\n" + table + END + rest.split(END, 1)[1]
