"""PyTorch state dict -> Flax params, for any model: a key map plus the layout transposes.

    params = map_state_dict(state_dict, module_params, key_map={
        "time_mlp.weight": "time/kernel",            # nn.Linear  [O, I] -> [I, O]
        "conv1.weight": "conv_in/kernel",            # nn.Conv2d  [O, I, kh, kw] -> [kh, kw, I, O]
        "up.weight": ("up/kernel", "conv_transpose"),  # nn.ConvTranspose2d, see TRANSFORMS
        ...})

`module_params` is what the Flax model expects (its init params, or `jax.eval_shape` of
init): every leaf must be filled, with its exact shape. A key map entry is a Flax path
('a/b/kernel') or a (path, transform) pair; without an entry a torch key maps by the default
rule (`default_path`: `down.0.conv.weight` -> `down_0/conv/<kernel|scale|embedding>`), and a
key mapped to None is skipped (e.g. BatchNorm's num_batches_tracked). Any missing leaf,
unexpected key or shape mismatch raises one ValueError that names them all.

Transforms (chosen from the leaf when not given): `linear` [O, I] -> [I, O] and `conv`
[O, I, kh, kw] -> [kh, kw, I, O] for kernels by rank, `none` for everything else.
`conv_transpose`: torch's ConvTranspose2d weight [I, O, kh, kw] -> [kh, kw, I, O],
spatially flipped, for Flax's `nn.ConvTranspose(transpose_kernel=False)`; torch's padding p
becomes Flax's explicit padding (k - 1 - p, k - 1 - p + output_padding) per axis.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Path = Tuple[str, ...]
KeyMap = Union[None, Mapping[str, Any], Callable[[str], Any]]


def torch_to_flax(w: np.ndarray) -> np.ndarray:
  """A torch Linear / Conv2d weight in Flax's kernel layout (other ranks unchanged)."""
  if w.ndim == 4:
    return w.transpose(2, 3, 1, 0)     # [O, I, kh, kw] -> [kh, kw, I, O]
  if w.ndim == 2:
    return w.T                         # [O, I] -> [I, O]
  return w


TRANSFORMS: Dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": lambda w: w,
    "linear": lambda w: w.T,
    "conv": lambda w: w.transpose(2, 3, 1, 0),
    "conv_transpose": lambda w: w.transpose(2, 3, 0, 1)[::-1, ::-1],
    "kernel": torch_to_flax,
}


def flax_to_torch(w: np.ndarray) -> np.ndarray:
  """The inverse of `torch_to_flax`."""
  if w.ndim == 4:
    return w.transpose(3, 2, 0, 1)
  if w.ndim == 2:
    return w.T
  return w


def default_path(torch_key: str) -> Path:
  """`down.0.conv.weight` -> (down_0, conv, weight): list indices join the name before them
  (Flax's `name_i` convention); the leaf is resolved against the model by `map_state_dict`."""
  parts: list = []
  for tok in torch_key.split("."):
    if tok.isdigit() and parts:
      parts[-1] = f"{parts[-1]}_{tok}"
    else:
      parts.append(tok)
  return tuple(parts)


def _resolve_leaf(path: Path, want: Mapping[Path, Any]) -> Path:
  """torch's `weight` is Flax's kernel (Dense, Conv), scale (norms) or embedding (Embed)."""
  if path and path[-1] == "weight":
    for leaf in ("kernel", "scale", "embedding"):
      if path[:-1] + (leaf,) in want:
        return path[:-1] + (leaf,)
  return path


def _target(key: str, key_map: KeyMap, want) -> Optional[Tuple[Path, str]]:
  if callable(key_map):
    entry = key_map(key)
  elif key_map is not None and key in key_map:
    entry = key_map[key]
  else:
    entry = "/".join(default_path(key))
  if entry is None:
    return None
  if isinstance(entry, str):
    path, transform = tuple(entry.split("/")), ""
  elif isinstance(entry, tuple) and len(entry) == 2 and all(isinstance(e, str) for e in entry):
    path, transform = tuple(entry[0].split("/")), entry[1]
    if transform not in TRANSFORMS:
      raise ValueError(f"key_map[{key!r}]: unknown transform {transform!r}; choose one of "
                       f"{sorted(TRANSFORMS)}.")
  else:
    raise ValueError(f"key_map[{key!r}] = {entry!r}: expected 'flax/path', "
                     "('flax/path', transform) or None.")
  path = _resolve_leaf(path, want)
  if not transform:
    transform = "kernel" if path[-1] == "kernel" else "none"
  return path, transform


def _few(items, n: int = 6) -> str:
  items = list(items)
  return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def map_state_dict(state_dict: Mapping[str, Any], module_params, key_map: KeyMap = None,
                   dtype=np.float32, what: str = "the model") -> Dict[str, Any]:
  """Maps a PyTorch state dict onto params shaped like `module_params` (module docstring).

  Args:
    state_dict: torch key -> array (numpy, or torch tensors: anything np.asarray takes).
    module_params: the Flax params tree to fill (arrays or ShapeDtypeStructs).
    key_map: dict or callable: torch key -> Flax path, (path, transform), or None to skip.
    dtype: dtype of the returned arrays.
    what: named in the error message.
  Returns:
    The params tree, every leaf filled.
  Raises:
    ValueError naming every missing leaf, unexpected key, unknown transform and shape
    mismatch at once.
  """
  want = traverse_util.flatten_dict(module_params)
  got: Dict[Path, np.ndarray] = {}
  unexpected, mismatched, seen = [], [], set()
  for key, value in state_dict.items():
    target = _target(key, key_map, want)
    if target is None:
      continue
    path, transform = target
    if path not in want:
      unexpected.append(f"{key} (-> {'/'.join(path)})")
      continue
    seen.add(path)
    w = np.ascontiguousarray(TRANSFORMS[transform](np.asarray(value)))
    if w.shape != tuple(want[path].shape):
      mismatched.append(f"{key}: {tuple(np.shape(value))} -> {w.shape} ({transform}), "
                        f"{what} expects {tuple(want[path].shape)} at {'/'.join(path)}")
      continue
    got[path] = np.asarray(w, dtype)
  missing = sorted("/".join(p) for p in set(want) - seen)
  problems = []
  if missing:
    problems.append(f"{len(missing)} parameters missing from the checkpoint: {_few(missing)}")
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected checkpoint keys: {_few(sorted(unexpected))}")
  if mismatched:
    problems.append(f"{len(mismatched)} shape mismatches: {_few(mismatched)}")
  if problems:
    raise ValueError(f"checkpoint does not match {what}: " + "; ".join(problems) +
                     ". Map keys with key_map (torch key -> 'flax/path' or None to skip).")
  return traverse_util.unflatten_dict({p: jnp.asarray(v) for p, v in got.items()})
