"""A pytree of many small arrays as one compressed .npz of two members: every leaf's bytes
back to back, and a JSON index [key, dtype, shape, offset, size].

For artifacts whose leaves are many and small (a 4-bit model's ~400 weights, scales and
ranges), where orbax's per-leaf metadata would outweigh the data. Write it inside a
`files.staged_directory` and checksum it (`files.tree_checksums`) like any other file:
this module only packs and unpacks. No pickles: any numpy or ml_dtypes dtype by name.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from flax import traverse_util


def save_arrays(path: str, tree) -> None:
  """Writes an array pytree (nested dicts, string keys) to `path` (.npz, compressed): the
  leaves' bytes concatenated in key order, and an index [key, dtype, shape, offset, size]."""
  flat = traverse_util.flatten_dict(jax.device_get(tree), sep="/")
  index, chunks, offset = [], [], 0
  for key in sorted(flat):
    a = np.ascontiguousarray(flat[key])
    index.append([key, a.dtype.name, list(a.shape), offset, a.nbytes])
    chunks.append(a.tobytes())
    offset += a.nbytes
  with open(path, "wb") as f:
    np.savez_compressed(f, data=np.frombuffer(b"".join(chunks), np.uint8),
                        index=np.frombuffer(json.dumps(index).encode(), np.uint8))


def load_arrays(path: str, what: str):
  """The pytree `save_arrays` wrote (numpy arrays); ValueError naming `what` if the file is
  not one (verify its checksum first for a clear 'damaged' error)."""
  try:
    with np.load(path, allow_pickle=False) as npz:
      data, index = npz["data"], json.loads(npz["index"].tobytes().decode())
    flat = {}
    for key, dtype, shape, offset, size in index:
      raw = data[offset:offset + size]
      if raw.size != size:
        raise ValueError(f"{key} is truncated")
      flat[key] = raw.view(np.dtype(jax.numpy.dtype(dtype))).reshape(shape).copy()
  except FileNotFoundError:
    raise FileNotFoundError(f"{what}: {path} is missing.") from None
  except Exception as e:  # zip, JSON, dtype and shape errors of a damaged file
    raise ValueError(f"corrupt {what}: {path} is not a tac_jax array file "
                     f"({type(e).__name__}: {e}).") from None
  return traverse_util.unflatten_dict(flat, sep="/")
