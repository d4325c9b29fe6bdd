import importlib.util
import os
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


sys.modules["configs_loader"] = types.SimpleNamespace(load_config=load_config,
                                                      launcher_cmd=launcher_cmd)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
  """tiny_model_dir(sample_size) -> a saved model directory of a tiny random UNet."""
  import jax  # pylint: disable=import-outside-toplevel
  from tac_jax import checkpoint  # pylint: disable=import-outside-toplevel
  from tac_jax.models import UNetConfig, init_unet  # pylint: disable=import-outside-toplevel
  made = {}

  def make(sample_size: int = 8) -> str:
    if sample_size not in made:
      cfg = UNetConfig(sample_size=sample_size, block_out_channels=(8, 16), attention_levels=(1,),
                       attention_head_dim=16, norm_num_groups=4)
      _, params = init_unet(cfg, jax.random.key(0))
      d = str(tmp_path_factory.mktemp(f"model{sample_size}"))
      checkpoint.save_model(d, params, {"model": cfg.to_dict(), "schedule": {
          "name": "linear", "num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02}})
      made[sample_size] = d
    return made[sample_size]

  return make
