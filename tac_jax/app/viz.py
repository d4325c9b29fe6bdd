"""PNG sample grids and error plots (matplotlib, headless)."""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Sequence

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8 in [0, 255]."""
  return np.clip((np.asarray(images, np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def tile(images, cols: int, pad: int = 1) -> np.ndarray:
  """[N, H, W, C] -> one [rows*(H+pad)+pad, cols*(W+pad)+pad, C] uint8 image."""
  imgs = to_uint8(images)
  if imgs.shape[-1] == 1:
    imgs = np.repeat(imgs, 3, -1)
  n, h, w, c = imgs.shape
  rows = -(-n // cols)
  out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, q = divmod(i, cols)
    out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = imgs[i]
  return out


def save_grid(path: str, images, cols: int = 8, scale: int = 4) -> str:
  img = tile(images, cols)
  img = np.kron(img, np.ones((scale, scale, 1), np.uint8))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  plt.imsave(path, img)
  return path


def save_comparison(path: str, rows: Dict[str, np.ndarray], n: int = 8, scale: int = 4) -> str:
  """One labelled row of `n` samples per entry (e.g. float / PTQ / PTQ+TCEC)."""
  fig, axes = plt.subplots(len(rows), 1, figsize=(n * 0.9, len(rows) * 1.05 + 0.2))
  axes = np.atleast_1d(axes)
  for ax, (label, imgs) in zip(axes, rows.items()):
    ax.imshow(tile(imgs[:n], n), interpolation="nearest")
    ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def save_error_plot(path: str, curves: Dict[str, Sequence[float]], timesteps: Sequence[int],
                    title: str, ylabel: str = "||e_k|| (RMS per pixel)") -> str:
  fig, ax = plt.subplots(figsize=(5.5, 3.4))
  for label, y in curves.items():
    style = "--" if "predicted" in label else "-"
    ax.plot(np.arange(len(y)), y, style, label=label, marker="o", markersize=2.5)
  ticks = np.linspace(0, len(timesteps) - 1, min(6, len(timesteps))).astype(int)
  ax.set_xticks(ticks)
  ax.set_xticklabels([str(int(timesteps[i])) for i in ticks])
  ax.set_xlabel("sampler step (timestep t_k at the step's input)")
  ax.set_ylabel(ylabel)
  ax.set_yscale("log")
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def save_setting_panels(path: str, settings: Sequence[str], draw: Callable[[Any, str], None],
                        xlabel: str, ylabel: str, log: bool = False) -> str:
  """One panel per setting side by side; `draw(ax, setting)` plots that panel's curves."""
  fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.4), squeeze=False)
  for ax, s in zip(axes[0], settings):
    draw(ax, s)
    ax.set(title=s, xlabel=xlabel, ylabel=ylabel, yscale="log" if log else "linear")
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def save_psnr_vs_steps(path: str, settings: Sequence[str], methods: Sequence[str],
                       psnr: Callable[[str, str, int], Sequence[float]],
                       steps: Sequence[int]) -> str:
  """PSNR (mean +- std over seeds) against the number of sampler steps, per method;
  `psnr(setting, method, steps)` gives the per-seed values."""

  def draw(ax, s):
    for m in methods:
      vals = [psnr(s, m, n) for n in steps]
      ax.errorbar(list(steps), [np.mean(v) for v in vals], yerr=[np.std(v) for v in vals],
                  marker="o", label=m, capsize=3)

  return save_setting_panels(path, settings, draw, "sampler steps", "PSNR vs float (dB)")


def save_error_curves(path: str, settings: Sequence[str], curves: Callable[[str], Dict[str, Any]],
                      xlabel: str) -> str:
  """Cumulative error RMS per step; `curves(setting)` gives {label: values}; labels that
  start with "closed form" are dashed."""

  def draw(ax, s):
    for label, y in curves(s).items():
      ax.plot(y, "k--" if label.startswith("closed form") else "-", label=label)

  return save_setting_panels(path, settings, draw, xlabel, "cumulative error RMS", log=True)
