"""Calibration records of layer inputs, and what static activation ranges are fitted from.

Every call of a quantizable layer during calibration leaves one `Record`: an evenly
strided sample of its input, the input channel of each sampled value, and the exact
per-channel min and max. A range for any set of channels [lo, hi) is then fitted on
[min, max, the sampled values of those channels]; the min and max keep min-max exact.

Q-Diffusion's split shortcut: a layer fed a concatenation of two tensors with different
ranges (the up blocks' skip and up-path features) gets one range per part. `choose_split`
finds the boundary from the per-channel ranges, so it needs no knowledge of the model.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence, Tuple

import numpy as np


class Record(NamedTuple):
  sample: np.ndarray    # [S] evenly strided values of the layer input
  channel: np.ndarray   # [S] the input channel of each sampled value
  cmin: np.ndarray      # [C] per-channel min
  cmax: np.ndarray      # [C] per-channel max


def part_data(rec: Record, lo: int, hi: int) -> np.ndarray:
  """[min, max, sampled values] of input channels [lo, hi)."""
  keep = (rec.channel >= lo) & (rec.channel < hi)
  return np.concatenate([[rec.cmin[lo:hi].min(), rec.cmax[lo:hi].max()], rec.sample[keep]])


def channel_range(records: Sequence[Record]) -> Tuple[np.ndarray, np.ndarray]:
  """Per-channel min and max over all records."""
  return (np.min([r.cmin for r in records], axis=0), np.max([r.cmax for r in records], axis=0))


def choose_split(cmin: np.ndarray, cmax: np.ndarray) -> int:
  """The boundary c in [1, C) minimising c r(0, c)^2 + (C - c) r(c, C)^2, where r is the
  width of a part's range (including 0): each value's rounding noise power grows as r^2.
  Returns 0 (no split) for a single channel."""
  lo, hi = np.minimum(np.asarray(cmin, np.float64), 0), np.maximum(np.asarray(cmax, np.float64), 0)
  n = lo.shape[0]
  if n < 2:
    return 0
  c = np.arange(1, n)
  front = np.maximum.accumulate(hi)[c - 1] - np.minimum.accumulate(lo)[c - 1]
  back = (np.maximum.accumulate(hi[::-1])[::-1][c] - np.minimum.accumulate(lo[::-1])[::-1][c])
  return int(c[np.argmin(c * front ** 2 + (n - c) * back ** 2)])
