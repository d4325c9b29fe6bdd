"""Static checks of the library's shape (issue: code shape): short functions, no imports
inside functions that dodge cycles, no caches keyed by object identity, no import cycles;
and, for the library proper (tac_jax/ but the application, tac_jax/app/): short parameter
lists of public functions, short modules, no absl."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "tac_jax")
APP = os.path.join("tac_jax", "app")   # the application: launchers' jobs, flags, reports
MAX_LINES = 60
MAX_PARAMS = 8          # of a public library function (positional + keyword-only, no self)
MAX_MODULE_LINES = 400  # of a library module
# Optional heavy dependencies may be imported where they are used (not to dodge cycles).
OPTIONAL = {"torch"}


def _sources():
  for root, _, names in os.walk(PKG):
    for name in sorted(names):
      if name.endswith(".py"):
        path = os.path.join(root, name)
        with open(path) as f:
          yield os.path.relpath(path, ROOT), f.read()


def _modules():
  for path, source in _sources():
    yield path, ast.parse(source)


def _is_library(path):
  return not (path + os.sep).startswith(APP + os.sep)


def _library_modules():
  return [(path, tree) for path, tree in _modules() if _is_library(path)]


def _public_functions(tree):
  """(qualified name, node) of the module's public functions and its classes' public
  methods (nested helpers are not part of any API)."""
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
      yield node.name, node
    elif isinstance(node, ast.ClassDef):
      for sub in node.body:
        if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and not sub.name.startswith("_"):
          yield f"{node.name}.{sub.name}", sub


def _num_params(fn):
  a = fn.args
  names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
  return len(names[1:] if names and names[0] in ("self", "cls") else names)


def _imported(node):
  if isinstance(node, ast.ImportFrom):
    return [node.module or ""]
  if isinstance(node, ast.Import):
    return [a.name for a in node.names]
  return []


def _functions(tree):
  return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_function_is_longer_than_the_limit():
  long = [f"{path}:{fn.lineno} {fn.name} ({fn.end_lineno - fn.lineno + 1} lines)"
          for path, tree in _modules() for fn in _functions(tree)
          if fn.end_lineno - fn.lineno + 1 > MAX_LINES]
  assert not long, f"functions over {MAX_LINES} lines: {long}"


def test_no_function_level_imports_of_the_package_or_non_optional_modules():
  bad = []
  for path, tree in _modules():
    for fn in _functions(tree):
      for node in ast.walk(fn):
        names = _imported(node)
        if any(n.split(".")[0] not in OPTIONAL for n in names):
          bad.append(f"{path}:{node.lineno} {names}")
  assert not bad, f"imports inside functions: {bad}"


def test_no_identity_keyed_caches():
  bad = [f"{path}:{n.lineno}" for path, tree in _modules() for n in ast.walk(tree)
         if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "id"]
  assert not bad, f"id() calls (identity-keyed caches): {bad}"


def test_the_checks_see_the_library_and_the_application():
  paths = [path for path, _ in _modules()]
  library = [p for p in paths if _is_library(p)]
  assert os.path.join("tac_jax", "compensation", "calibrate.py") in library
  assert os.path.join(APP, "pipeline.py") in paths and os.path.join(APP, "pipeline.py") not in library


def test_no_public_library_function_takes_more_than_the_limit_of_parameters():
  long = [f"{path}:{fn.lineno} {name} ({_num_params(fn)} parameters)"
          for path, tree in _library_modules() for name, fn in _public_functions(tree)
          if _num_params(fn) > MAX_PARAMS]
  assert not long, (f"public library functions with more than {MAX_PARAMS} parameters (group "
                    f"related ones in a dataclass / NamedTuple): {long}")


def test_no_library_module_is_longer_than_the_limit():
  long = [f"{path} ({len(source.splitlines())} lines)" for path, source in _sources()
          if _is_library(path) and len(source.splitlines()) > MAX_MODULE_LINES]
  assert not long, f"library modules over {MAX_MODULE_LINES} lines (split them by topic): {long}"


def test_the_library_does_not_import_absl():
  """absl (flags, logging) belongs to the launchers and the application (tac_jax/app/)."""
  bad = [f"{path}:{node.lineno} {_imported(node)}" for path, tree in _library_modules()
         for node in ast.walk(tree) if any(n.split(".")[0] == "absl" for n in _imported(node))]
  assert not bad, f"absl imports in the library: {bad}"


@pytest.mark.parametrize("module", ["tac_jax.compensation", "tac_jax.app.sweep",
                                    "tac_jax.models.convert"])
def test_each_module_imports_on_its_own(module):
  """Imported first in a fresh interpreter (a cycle would fail for some entry point)."""
  proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                        text=True, timeout=120, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
