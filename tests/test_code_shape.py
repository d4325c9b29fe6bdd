"""Static checks of the library's shape (issue: code shape): short functions, no imports
inside functions that dodge cycles, no caches keyed by object identity, no import cycles."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "tac_jax")
MAX_LINES = 60
# Optional heavy dependencies may be imported where they are used (not to dodge cycles).
OPTIONAL = {"torch"}


def _modules():
  for root, _, names in os.walk(PKG):
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        with open(path) as f:
          yield os.path.relpath(path, ROOT), ast.parse(f.read())


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
        if isinstance(node, (ast.Import, ast.ImportFrom)):
          names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
              [a.name for a in node.names]
          if any(n.split(".")[0] not in OPTIONAL for n in names):
            bad.append(f"{path}:{node.lineno} {names}")
  assert not bad, f"imports inside functions: {bad}"


def test_no_identity_keyed_caches():
  bad = [f"{path}:{n.lineno}" for path, tree in _modules() for n in ast.walk(tree)
         if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "id"]
  assert not bad, f"id() calls (identity-keyed caches): {bad}"


@pytest.mark.parametrize("module", ["tac_jax.models.convert", "tac_jax.errors.compensation",
                                    "tac_jax.sweep"])
def test_each_module_imports_on_its_own(module):
  """Imported first in a fresh interpreter (a cycle would fail for some entry point)."""
  proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                        text=True, timeout=120, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
