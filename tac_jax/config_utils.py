"""Helpers for the frozen dataclasses that describe models and quantization, and for
config files."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Mapping, Type, TypeVar

T = TypeVar("T")


def from_dict(cls: Type[T], d: Mapping[str, Any]) -> T:
  """Builds dataclass `cls` from a mapping, naming unknown fields in the error."""
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = set(d) - names
  if unknown:
    raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; known: {sorted(names)}.")
  return cls(**dict(d))


def sibling_config(file: str, name: str):
  """get_config() of the config file `name` next to `file` (a config's __file__), for
  configs that start from another one (configs/ is a folder of files, not a package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(file)), name)
  spec = importlib.util.spec_from_file_location(f"configs_{os.path.splitext(name)[0]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
