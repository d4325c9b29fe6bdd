"""UNet checkpoints: a `files` checkpoint directory whose model.json describes a UNetConfig.

A model directory holds
    params/      orbax StandardCheckpointer tree
    model.json   {"model": UNetConfig fields, "schedule": {...}, "checksums": {...},
                  "param_shapes": {...}, ...}
and is written as a whole (`files.staged_directory`): an interrupted export leaves the
previous model in place. Loading verifies checksums and shapes before reading params.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp

from tac_jax import files
from tac_jax.models.unet import UNet, UNetConfig

MODEL_JSON = files.META_JSON
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
# The models the package ships, by name (`load_pretrained`).
SHIPPED = {"default": "default_model", "gray28": "gray28_model"}


def save_model(directory: str, params, meta: Dict[str, Any]) -> str:
  """Saves float params and `meta` (must contain 'model') as one atomic directory; an
  existing model at `directory` is replaced only once the new one is complete."""
  return files.save_checkpoint(directory, params, meta)


def load_model(directory: str) -> Tuple[UNet, Any, Dict[str, Any]]:
  """Returns (module, params, meta). Clear errors for missing / corrupt / mismatched files."""
  meta = files.load_meta(directory)
  try:
    config = UNetConfig.from_dict(meta["model"])
  except (TypeError, ValueError) as e:
    raise ValueError(f"checkpoint {directory}: the 'model' section of {MODEL_JSON} is not a "
                     f"UNet config ({e}).") from None
  module = UNet(config)
  x = jnp.zeros((1, config.sample_size, config.sample_size, config.in_channels))
  abstract = jax.eval_shape(module.init, jax.random.key(0), x, jnp.zeros((1,), jnp.int32))["params"]
  return module, files.restore_params(directory, abstract, meta), meta


def default_model_dir() -> str:
  """The small trained model shipped with the package."""
  return os.path.join(ASSETS, SHIPPED["default"])


def pretrained_dir(name: str) -> str:
  """The directory of a shipped model by name, or `name` itself if it is a directory."""
  if name in SHIPPED:
    return os.path.join(ASSETS, SHIPPED[name])
  if os.path.isdir(name):
    return name
  raise ValueError(f"no model {name!r}: name a shipped model ({', '.join(SHIPPED)}) or a model "
                   "directory (experiments/train.py or experiments/import_diffusers.py write one).")


def load_pretrained(name: str = "default") -> Tuple[UNet, Any, Dict[str, Any]]:
  """(module, params, meta) of a shipped model ("default", "gray28") or a model directory;
  `meta["schedule"]` holds its `make_schedule` keywords."""
  return load_model(pretrained_dir(name))
