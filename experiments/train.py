"""Train a diffusion UNet.

  python experiments/train.py --config=configs/default_model.py --workdir=runs/default \
      [--export_dir=tac_jax/assets/default_model] [--config.num_train_steps=500]
"""

import os
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from tac_jax.app import launch
from tac_jax.app import train as train_lib
from tac_jax import viz
from tac_jax.diffusion import samplers

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default_model.py", "Training config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default_model", "Checkpoints and samples go here.")
_EXPORT = flags.DEFINE_string("export_dir", None, "Also export the EMA params as a model dir.")


def main():
  config = _CONFIG.value
  t0 = time.time()
  out = train_lib.train(config, _WORKDIR.value, export_dir=_EXPORT.value)
  minutes = (time.time() - t0) / 60
  print(f"training took {minutes:.1f} min on {jax.device_count()} {jax.devices()[0].platform} device(s)")
  sched = train_lib.schedule_from_config(config)
  sampler = samplers.ddim(sched, config.sample_steps, spacing=config.get("sample_spacing", "uniform"))
  mc = train_lib.model_config(config)
  key = jax.random.key(config.seed + 1)
  x_T = jax.random.normal(key, (config.num_samples, mc.sample_size, mc.sample_size, mc.in_channels))
  run = jax.jit(lambda p, x, k: samplers.sample(out["module"].apply, {"params": p}, sampler, x, k)[0].x)
  imgs = run(out["params"], x_T, key)
  paths = [os.path.join(_WORKDIR.value, "samples.png")]
  if _EXPORT.value:
    name = os.path.basename(os.path.normpath(_EXPORT.value))
    paths.append(os.path.join(_EXPORT.value, "..", "..", "..", "docs", f"{name}_samples.png"))
  if jax.process_index() != 0:
    return
  for p in paths:
    viz.save_grid(os.path.normpath(p), jnp.clip(imgs, -1, 1), cols=8)
    print(f"wrote {os.path.normpath(p)}")


if __name__ == "__main__":
  app.run(launch.job(main))
