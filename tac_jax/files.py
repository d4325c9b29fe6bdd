"""Model-agnostic files: atomic JSON and directories, checksums, run manifests, param trees.

Nothing here knows about UNets or diffusion. The guarantees the launchers build on:

* `write_json_atomic`: a JSON file is either the old one or the complete new one.
* `staged_directory`: a whole directory (a run's results, a model export, fitted params) is
  built in a hidden sibling and swapped in only once complete; until then the previous
  version stays untouched, and an interrupted write leaves at most a hidden `.*.tmp-*`.
* `save_checkpoint` / `restore_params`: a params/ tree (orbax) next to a JSON description
  that records a SHA-256 per file and every leaf's shape; loading verifies both before
  orbax reads anything, and names the file that fails.
* `array_file.save_arrays` / `load_arrays`: many small arrays in one file (artifacts).
"""

from __future__ import annotations

import contextlib
import hashlib
from importlib import metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

META_JSON = "model.json"
PARAMS_DIR = "params"
MANIFEST = "manifest.json"


# ----------------------------------------------------------------------------- JSON

def write_atomic(path: str, write: Callable[[Any], Any], binary: bool = False) -> None:
  """Calls `write(f)` on a temporary file next to `path`, then renames it onto `path`."""
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=os.path.splitext(path)[1])
  try:
    with os.fdopen(fd, "wb" if binary else "w") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file and a rename."""
  write_atomic(path, lambda f: f.write(text))


def write_json_atomic(path: str, obj: Mapping[str, Any]) -> None:
  """Writes `obj` as JSON to `path` through a temporary file and a rename."""
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def read_json(path: str, what: str) -> Dict[str, Any]:
  """The JSON object at `path`; clear errors for a missing or corrupt file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what}: {path} is missing.")
  try:
    with open(path) as f:
      obj = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"corrupt {what}: {path} is not valid JSON ({e}).") from None
  if not isinstance(obj, dict):
    raise ValueError(f"corrupt {what}: {path} holds {type(obj).__name__}, not an object.")
  return obj


# ----------------------------------------------------------------------------- checksums

def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def tree_checksums(directory: str) -> Dict[str, str]:
  """{path relative to `directory`: sha256} for every file below it."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      full = os.path.join(root, name)
      out[os.path.relpath(full, directory)] = sha256_file(full)
  return dict(sorted(out.items()))


UNVERIFIED_ENV = "TAC_JAX_ALLOW_UNVERIFIED"


def verify_checksums(directory: str, expected: Mapping[str, str], what: str) -> None:
  """Raises ValueError naming the first file under `directory` that is missing or whose
  SHA-256 differs from `expected`. A record without checksums is refused unless the
  environment sets TAC_JAX_ALLOW_UNVERIFIED=1 (files written before checksums existed)."""
  if not expected:
    if os.environ.get(UNVERIFIED_ENV) == "1":
      return
    raise ValueError(f"{what}: the record holds no checksums, so its files cannot be verified "
                     "(written by an old version, or the record was edited); re-export it, or "
                     f"set {UNVERIFIED_ENV}=1 to load it unverified.")
  for rel, digest in expected.items():
    path = os.path.join(directory, rel)
    if not os.path.isfile(path):
      raise ValueError(f"corrupt {what}: {path} is missing (recorded at save time).")
    if sha256_file(path) != digest:
      raise ValueError(f"corrupt {what}: {path} does not match the checksum recorded at save "
                       "time (the file was changed or damaged); restore or re-export it.")


# ----------------------------------------------------------------------------- directories

def _check_ours(path: str, marker: Optional[str], what: str, hint: str) -> bool:
  """Whether `path` is a non-empty directory; refuses a file, and (with `marker`) a
  non-empty directory without the marker file that our writer puts in every folder."""
  if os.path.lexists(path) and not os.path.isdir(path):
    raise ValueError(f"{path} is a file, not a folder; {hint}.")
  if not os.path.isdir(path) or not os.listdir(path):
    return False
  if marker is not None and not os.path.isfile(os.path.join(path, marker)):
    raise FileExistsError(f"{path} holds files that are not tac_jax {what} (no {marker}); "
                          f"tac_jax only replaces folders it wrote. {hint[0].upper()}{hint[1:]}, "
                          "or empty the folder yourself.")
  return True


def check_output_dir(path: str, overwrite: bool, flag: str = "--overwrite",
                     marker: Optional[str] = MANIFEST, what: str = "results") -> str:
  """Validates an output directory before any work starts; returns its absolute path.

  Refuses an empty name, a path that is a file, a non-empty folder that is not one of ours
  (no `marker` file; even with `overwrite`), one of ours unless `overwrite` (which then
  replaces it as a whole), and a parent that cannot be written.
  """
  if not path or not str(path).strip():
    raise ValueError("the output directory is empty; pass --outdir=<folder>.")
  path = os.path.abspath(path)
  if _check_ours(path, marker, what, "pass another output folder") and not overwrite:
    raise FileExistsError(f"output directory {path} already holds {what}; pass {flag} to "
                          "replace it as a whole, or another output folder.")
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ValueError(f"cannot create output directory {path}: {parent} is a file.")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise PermissionError(f"cannot write output directory {path}: {parent} is not writable.")
  return path


_STALE_AFTER_S = 24 * 3600


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except (PermissionError, OverflowError):
    return True
  return True


def clean_stale(final: str) -> None:
  """Removes the staging folders an interrupted write of `final` left beside it
  (`.NAME.tmp-PID-*` of a dead process, or unnamed ones older than a day); a previous
  version parked as `.NAME.old-PID-*` by a write killed mid-swap is put back first."""
  parent, name = os.path.split(os.path.abspath(final))
  if not os.path.isdir(parent):
    return
  for entry in os.listdir(parent):
    m = re.fullmatch(re.escape(f".{name}.") + r"(tmp|old)-(?:(\d+)-)?.*", entry)
    if m is None:
      continue
    full = os.path.join(parent, entry)
    pid = int(m.group(2)) if m.group(2) else None
    if pid is not None and _pid_alive(pid):
      continue
    if pid is None and time.time() - os.path.getmtime(full) < _STALE_AFTER_S:
      continue
    if m.group(1) == "old" and not os.path.lexists(final):
      os.replace(full, final)
    else:
      shutil.rmtree(full, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(final: str, marker: Optional[str] = None,
                     what: str = "output") -> Iterator[str]:
  """Yields a hidden sibling of `final` to build into; on success it replaces `final` (the
  previous version, if any, stays intact until then); on any error it is removed.

  `final` must not be a file, and with `marker` an existing non-empty `final` must hold
  that file (it is one of ours). Stale staging folders of earlier killed writes are removed.
  """
  final = os.path.abspath(final)
  parent, name = os.path.split(final)
  _check_ours(final, marker, what, "choose another folder")
  os.makedirs(parent, exist_ok=True)
  clean_stale(final)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.tmp-{os.getpid()}-")
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = None
  if os.path.lexists(final):
    old = tempfile.mkdtemp(dir=parent, prefix=f".{name}.old-{os.getpid()}-")
    os.rmdir(old)
    os.replace(final, old)
  os.replace(tmp, final)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def _git(*args: str) -> Optional[str]:
  """A git command's output in the package's checkout (None outside one or without git)."""
  try:
    proc = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
  except (OSError, subprocess.SubprocessError):
    return None
  return proc.stdout.strip() if proc.returncode == 0 else None


def manifest(config: Optional[Mapping[str, Any]], directory: str) -> Dict[str, Any]:
  """What produced `directory`'s files: config, git revision (whether the checkout had
  uncommitted changes to tracked files, and the SHA-256 of `git diff HEAD` if so),
  versions, file checksums."""
  rev = _git("rev-parse", "HEAD") or None
  status = _git("status", "--porcelain", "--untracked-files=no")
  dirty = None if status is None else bool(status)
  diff = _git("diff", "HEAD") if dirty else None   # which uncommitted changes, by hash
  diff_sha = hashlib.sha256(diff.encode()).hexdigest() if diff else None
  versions = {}
  for dist in ("jax", "jaxlib", "flax", "numpy", "orbax-checkpoint", "tac_jax"):
    try:
      versions[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
      versions[dist] = None
  files = {k: v for k, v in tree_checksums(directory).items() if k != MANIFEST}
  return {"config": dict(config) if config is not None else None, "git_revision": rev,
          "git_dirty": dirty, "git_diff_sha256": diff_sha, "versions": versions, "python": sys.version.split()[0], "files": files}


def write_report(outdir: str, text: str, config: Optional[Mapping[str, Any]]) -> str:
  """results.md (`text`) and manifest.json (`config`, revision, checksums) as the folder
  `outdir`, which appears only when both are complete; returns its path."""
  with staged_directory(outdir, MANIFEST, "results") as tmp:
    write_text_atomic(os.path.join(tmp, "results.md"), text)
    write_json_atomic(os.path.join(tmp, MANIFEST), manifest(config, tmp))
  return os.path.abspath(outdir)


# ----------------------------------------------------------------------------- param trees

@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
  """Silences orbax's own logging (asynchronous-I/O tracebacks on failures): our errors
  name the problem."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(level)


def param_shapes(tree) -> Dict[str, list]:
  flat = traverse_util.flatten_dict(jax.device_get(tree), sep="/")
  return {k: list(np.shape(v)) for k, v in sorted(flat.items())}


def save_tree(path: str, tree) -> None:
  """Writes an array pytree with orbax at `path` (a directory that must not exist)."""
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.abspath(path), jax.device_get(tree))
  ckptr.wait_until_finished()


def save_checkpoint(directory: str, params, meta: Mapping[str, Any]) -> str:
  """Writes params/ and model.json (meta + checksums + shapes) as one atomic directory."""
  if "model" not in meta:
    raise ValueError("meta must contain the 'model' config dict.")
  directory = os.path.abspath(directory)
  with staged_directory(directory, META_JSON, "model checkpoint") as tmp:
    save_tree(os.path.join(tmp, PARAMS_DIR), params)
    record = {**meta, "checksums": tree_checksums(os.path.join(tmp, PARAMS_DIR)),
              "param_shapes": param_shapes(params)}
    write_json_atomic(os.path.join(tmp, META_JSON), record)
  return directory


def load_meta(directory: str) -> Dict[str, Any]:
  """model.json of a checkpoint directory, with errors that say what to do."""
  directory = os.path.abspath(directory)
  if not os.path.exists(directory):
    raise FileNotFoundError(f"no model checkpoint at {directory}: the directory does not exist. "
                            "Train one with experiments/train.py, or pass --config.checkpoint="
                            "<model directory>.")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory} is a file, not a model checkpoint directory; pass the "
                            f"folder that holds {META_JSON} and {PARAMS_DIR}/.")
  marker = os.path.join(directory, META_JSON)
  if not os.path.exists(marker):
    raise FileNotFoundError(f"{directory} is not a complete model checkpoint: {META_JSON} is "
                            "missing (an interrupted save?). Re-export or retrain the model.")
  meta = read_json(marker, "checkpoint")
  if "model" not in meta:
    raise ValueError(f"corrupt checkpoint: {marker} has no 'model' section.")
  return meta


def _check_shapes(meta: Mapping[str, Any], abstract, marker: str) -> None:
  recorded = meta.get("param_shapes")
  if recorded is None:
    return
  want = param_shapes(jax.tree.map(lambda a: np.zeros(a.shape, np.int8), abstract))
  if recorded != want:
    diff = sorted(k for k in set(recorded) | set(want) if recorded.get(k) != want.get(k))
    k = diff[0]
    raise ValueError(f"checkpoint {marker} does not match its model config: param {k} was "
                     f"saved with shape {recorded.get(k)} but the config builds {want.get(k)} "
                     f"({len(diff)} params differ). Fix the 'model' section or re-export.")


def restore_params(directory: str, abstract, meta: Optional[Mapping[str, Any]] = None):
  """The params/ tree of a checkpoint directory, restored against `abstract`.

  Verifies the recorded checksums and shapes first (a record without checksums only with
  TAC_JAX_ALLOW_UNVERIFIED=1), so a damaged or mismatched file fails with one clear
  error naming it, before orbax reads anything.
  """
  directory = os.path.abspath(directory)
  meta = load_meta(directory) if meta is None else meta
  path = os.path.join(directory, PARAMS_DIR)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"corrupt checkpoint: {path} is missing.")
  marker = os.path.join(directory, META_JSON)
  verify_checksums(path, meta.get("checksums", {}), f"checkpoint {directory}")
  _check_shapes(meta, abstract, marker)
  try:
    with _quiet_orbax():
      return ocp.StandardCheckpointer().restore(path, abstract)
  except Exception as e:  # orbax raises several types for truncated / mismatched trees
    raise ValueError(f"could not restore params from {path}: the files are corrupt or do not "
                     f"match the model config in {META_JSON} ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}).") from None


def restore_tree(path: str, what: str):
  """An orbax tree saved by `save_tree` (no abstract: arrays as saved)."""
  try:
    with _quiet_orbax():
      return ocp.StandardCheckpointer().restore(os.path.abspath(path))
  except Exception as e:
    raise ValueError(f"could not read {what} from {path}: {type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}") from None
