"""Checks of PTQ calibration batches, (x, t) or (x, t, *cond): shapes, finiteness, one
kind of condition inputs in every batch, timesteps inside the schedule."""

from __future__ import annotations

from typing import List, Optional, Sequence

import jax
import numpy as np

from tac_jax.quant import observers


def _as_batch(batch, i: int) -> tuple:
  if not isinstance(batch, (tuple, list)) or len(batch) < 2:
    what = f"length {len(batch)}" if isinstance(batch, (tuple, list)) else type(batch).__name__
    raise ValueError(f"calibration batch {i} must be a tuple (x, t) or (x, t, *cond), got {what}.")
  return tuple(batch)


def _check_conditions(x, cond, i: int, structure) -> None:
  """Every batch has batch 0's kind of conditions, each array one row per sample."""
  if jax.tree.structure(cond) != structure:
    raise ValueError(f"calibration batch {i} has conditions {jax.tree.structure(cond)} but batch "
                     f"0 has {structure}: every batch must be (x, t) or every one (x, t, *cond) "
                     "with the same condition inputs.")
  b = np.shape(x)[0]
  rows = [np.shape(v) for v in jax.tree.leaves(cond) if np.ndim(v) and np.shape(v)[0] != b]
  if rows:
    raise ValueError(f"calibration batch {i}: x has {b} samples but a condition array has shape "
                     f"{list(rows[0])}; conditions need one row per sample (leading dim {b}; "
                     "for guidance, x twice and concat([cond, null])).")


def check_calibration(calib: Sequence[tuple],
                      num_timesteps: Optional[int] = None) -> List[tuple]:
  """The batches as tuples, each checked; ValueError naming the batch and the fix."""
  calib = [_as_batch(b, i) for i, b in enumerate(calib)]
  if not calib:
    raise ValueError("no calibration data: pass at least one (x, t) or (x, t, *cond) batch.")
  structure = jax.tree.structure(calib[0][2:])
  for i, (x, t, *cond) in enumerate(calib):
    observers.check_calibration_data(x, f"calibration batch {i}")
    _check_conditions(x, tuple(cond), i, structure)
    if t is not None and num_timesteps is not None:
      bad = [v for v in np.ravel(t) if not 0 <= v < num_timesteps]
      if bad:
        raise ValueError(f"calibration batch {i} has timestep {bad[0]} outside the schedule "
                         f"[0, {num_timesteps - 1}]; pass num_timesteps matching the model's "
                         "schedule.")
  return calib
