"""Model checkpoints: a `files` checkpoint directory whose model.json describes the model.

A model directory holds
    params/      orbax StandardCheckpointer tree
    model.json   {"model": UNetConfig or DiTConfig fields, "architecture": "unet" (default)
                  or "dit", "objective": "epsilon" (default) or "flow", "schedule": {...}
                  (epsilon: make_schedule keywords) or "flow": {...} (flow.FlowConfig),
                  "checksums": {...}, "param_shapes": {...}, ...}
and is written as a whole (`files.staged_directory`): an interrupted export leaves the
previous model in place. Loading verifies checksums and shapes before reading params.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp

from tac_jax import files
from tac_jax.models.dit import DiT, dummy_inputs
from tac_jax.models.dit_config import DiTConfig
from tac_jax.models.unet import UNet, UNetConfig

MODEL_JSON = files.META_JSON
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
# The models the package ships, by name (`load_pretrained`).
SHIPPED = {"default": "default_model", "gray28": "gray28_model", "dit_flow": "dit_flow_model"}
# meta["architecture"] -> (config class, module class, dummy (x, t, *cond) for shapes).
_ARCHITECTURES = {
    "unet": (UNetConfig, UNet, lambda c: (
        jnp.zeros((1, c.sample_size, c.sample_size, c.in_channels)), jnp.zeros((1,), jnp.int32))),
    "dit": (DiTConfig, DiT, dummy_inputs)}


def save_model(directory: str, params, meta: Dict[str, Any]) -> str:
  """Saves float params and `meta` (must contain 'model') as one atomic directory; an
  existing model at `directory` is replaced only once the new one is complete."""
  return files.save_checkpoint(directory, params, meta)


def build_module(meta: Dict[str, Any], where: str, abstract: bool = True) -> Tuple[Any, Any]:
  """(module, abstract params or None) of the model a model.json record describes, no
  weights read (`where` names the record in errors)."""
  arch = meta.get("architecture", "unet")
  if arch not in _ARCHITECTURES:
    raise ValueError(f"{where}: {MODEL_JSON} names architecture {arch!r}; this "
                     f"version of tac_jax reads {sorted(_ARCHITECTURES)}.")
  config_cls, module_cls, dummy = _ARCHITECTURES[arch]
  try:
    config = config_cls.from_dict(meta["model"])
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{where}: the 'model' section of {MODEL_JSON} is not a "
                     f"{config_cls.__name__} ({e}).") from None
  module = module_cls(config)
  if not abstract:
    return module, None
  return module, jax.eval_shape(module.init, jax.random.key(0), *dummy(config))["params"]


def load_model(directory: str) -> Tuple[Any, Any, Dict[str, Any]]:
  """Returns (module, params, meta): a UNet or a DiT (bare: a class-conditional DiT takes
  labels as its third input). Clear errors for missing / corrupt / mismatched files."""
  meta = files.load_meta(directory)
  module, abstract = build_module(meta, f"checkpoint {directory}")
  return module, files.restore_params(directory, abstract, meta), meta


def default_model_dir() -> str:
  """The small trained model shipped with the package."""
  return os.path.join(ASSETS, SHIPPED["default"])


def pretrained_dir(name: str) -> str:
  """The directory of a shipped model by name, or `name` itself if it is a directory."""
  if name in SHIPPED:
    return os.path.join(ASSETS, SHIPPED[name])
  if os.path.exists(name):  # a file: files.py names it ("is a file")
    return name
  raise ValueError(f"no model {name!r}: that directory does not exist and it is not a shipped "
                   f"model ({', '.join(SHIPPED)}); name one of those or a model directory "
                   "(experiments/train.py or experiments/import_diffusers.py write one).")


def load_pretrained(name: str = "default") -> Tuple[UNet, Any, Dict[str, Any]]:
  """(module, params, meta) of a shipped model ("default", "gray28", "dit_flow") or a model
  directory; `meta["schedule"]` holds its `make_schedule` keywords (`meta["flow"]` its
  FlowConfig for a flow model)."""
  return load_model(pretrained_dir(name))
