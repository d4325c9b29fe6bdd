"""Saving and loading fitted `CorrectionParams` (an orbax tree + a JSON record with
checksums, written as a whole)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional

import jax.numpy as jnp

from tac_jax import files
from tac_jax.compensation.params import (OPTIONAL_FIELDS, CorrectionParams, check_params,
                                         check_params_finite, check_shapes)
from tac_jax.diffusion.samplers import Sampler

PARAMS_JSON = "tcec.json"


def save_params(directory: str, params: CorrectionParams,
                meta: Optional[Dict[str, Any]] = None) -> str:
  """Saves fitted parameters as the directory `directory` (tcec/ orbax tree + tcec.json with
  checksums), written as a whole: a previous save there survives until this one is complete."""
  check_shapes(params)
  check_params_finite(params, "save_params")
  tree = {k: v for k, v in dataclasses.asdict(params).items() if v is not None}
  with files.staged_directory(directory, PARAMS_JSON, "correction params") as tmp:
    files.save_tree(os.path.join(tmp, "tcec"), tree)
    files.write_json_atomic(os.path.join(tmp, PARAMS_JSON), {
        "num_steps": params.num_steps, "channels": params.num_channels, **(meta or {}),
        "checksums": files.tree_checksums(os.path.join(tmp, "tcec"))})
  return os.path.abspath(directory)


def load_params(directory: str, sampler: Optional[Sampler] = None,
                channels: Optional[int] = None) -> CorrectionParams:
  """Loads CorrectionParams; verifies checksums, shapes, finiteness, and `sampler` /
  `channels` if given."""
  directory = os.path.abspath(directory)
  path = os.path.join(directory, "tcec")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no correction params at {directory} (missing tcec/); run "
                            "calibration first.")
  record = files.read_json(os.path.join(directory, PARAMS_JSON), "correction params")
  files.verify_checksums(path, record.get("checksums", {}), f"correction params at {directory}")
  tree = files.restore_tree(path, "correction params")
  required = {"K", "beta", "phi", "timesteps"}
  if not required <= set(tree) <= required | set(OPTIONAL_FIELDS):
    raise ValueError(f"corrupt correction params at {path}: keys {sorted(tree)}.")
  params = CorrectionParams(**{k: jnp.asarray(v) for k, v in tree.items()})
  try:
    check_shapes(params)
  except ValueError as e:
    raise ValueError(f"corrupt correction params at {path}: {e}") from None
  check_params_finite(params, f"correction params at {path}")
  if sampler is not None:
    check_params(params, sampler, channels)
  elif channels is not None and params.num_channels != channels:
    raise ValueError(f"correction params have {params.num_channels} channels, expected {channels}.")
  return params
