import importlib.util
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str):
  """get_config() of configs/<name>.py (configs/ is not a package)."""
  spec = importlib.util.spec_from_file_location(f"configs_{name}",
                                                os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


sys.modules["configs_loader"] = types.SimpleNamespace(load_config=load_config)
