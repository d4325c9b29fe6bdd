"""Helpers the tests share: the launchers' configs, their command lines, and the
environment of a child process with extra XLA flags.

A plain module (tests/ is on sys.path: pytest puts the folder of the rootdir's
tests/conftest.py there), imported as `from configs_loader import load_config`. It does not
import jax, so conftest can import it before setting the XLA environment.
"""

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def xla_env(**flags):
  """os.environ for a child process with extra XLA flags, e.g.
  xla_env(xla_force_host_platform_device_count=4)."""
  extra = " ".join(f"--{k}={v}" for k, v in flags.items())
  return dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {extra}".strip(),
              JAX_PLATFORMS="cpu")


def load_config(name: str):
  """get_config() of configs/<name>.py (configs/ is not a package)."""
  spec = importlib.util.spec_from_file_location(f"configs_{name}",
                                                os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def launcher_cmd(script: str, config: str, *flags: str):
  """argv running experiments/<script>.py with configs/<config>.py and `flags`."""
  return [sys.executable, os.path.join(ROOT, "experiments", f"{script}.py"),
          f"--config={os.path.join(ROOT, 'configs', f'{config}.py')}", *flags]
