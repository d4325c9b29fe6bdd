"""Model checkpoints: float params (orbax, written atomically) + a JSON description.

A model directory holds
    params/      orbax StandardCheckpointer tree (written to a temp dir, then renamed)
    model.json   {"model": UNetConfig fields, "schedule": {...}, ...}, written after params
                 with an atomic rename, so its presence marks a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from tac_jax.models.unet import UNet, UNetConfig

MODEL_JSON = "model.json"
PARAMS_DIR = "params"


def write_json_atomic(path: str, obj: Dict[str, Any]) -> None:
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=".json")
  with os.fdopen(fd, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def save_model(directory: str, params, meta: Dict[str, Any]) -> str:
  """Saves float params and `meta` (must contain 'model': UNetConfig dict). Overwrites."""
  if "model" not in meta:
    raise ValueError("meta must contain the 'model' config dict.")
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  marker = os.path.join(directory, MODEL_JSON)
  if os.path.exists(marker):
    os.remove(marker)  # the directory is incomplete until the new marker lands
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(directory, PARAMS_DIR), jax.device_get(params), force=True)
  ckptr.wait_until_finished()
  write_json_atomic(marker, meta)
  return directory


def load_meta(directory: str) -> Dict[str, Any]:
  directory = os.path.abspath(directory)
  marker = os.path.join(directory, MODEL_JSON)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no model checkpoint at {directory}: the directory does not exist. "
                            "Train one with experiments/train.py or pass --checkpoint.")
  if not os.path.exists(marker):
    raise FileNotFoundError(f"{directory} is not a complete model checkpoint: {MODEL_JSON} is "
                            "missing (an interrupted save?). Re-export or retrain the model.")
  try:
    with open(marker) as f:
      meta = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"corrupt checkpoint: {marker} is not valid JSON ({e}).") from None
  if "model" not in meta:
    raise ValueError(f"corrupt checkpoint: {marker} has no 'model' section.")
  return meta


def load_model(directory: str) -> Tuple[Any, Any, Dict[str, Any]]:
  """Returns (module, params, meta). Clear errors for missing / corrupt / mismatched files."""
  meta = load_meta(directory)
  config = UNetConfig.from_dict(meta["model"])
  module = UNet(config)
  x = jnp.zeros((1, config.sample_size, config.sample_size, config.in_channels))
  abstract = jax.eval_shape(module.init, jax.random.key(0), x, jnp.zeros((1,), jnp.int32))["params"]
  return module, restore_params(directory, abstract), meta


def restore_params(directory: str, abstract):
  """The params/ tree of a model directory, restored against `abstract` (shapes, dtypes)."""
  path = os.path.join(os.path.abspath(directory), PARAMS_DIR)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"corrupt checkpoint: {path} is missing.")
  try:
    return ocp.StandardCheckpointer().restore(path, abstract)
  except Exception as e:  # orbax raises several types for truncated / mismatched trees
    raise ValueError(f"could not restore params from {path}: the files are corrupt or do not "
                     f"match the model config in {MODEL_JSON} ({type(e).__name__}: {e}).") from e


def default_model_dir() -> str:
  """The small trained model shipped with the package."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "default_model")
