"""Helpers for the frozen dataclasses that describe models and quantization."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Type, TypeVar

T = TypeVar("T")


def from_dict(cls: Type[T], d: Mapping[str, Any]) -> T:
  """Builds dataclass `cls` from a mapping, naming unknown fields in the error."""
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = set(d) - names
  if unknown:
    raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; known: {sorted(names)}.")
  return cls(**dict(d))
