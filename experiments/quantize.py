"""The main job: PTQ + error-propagation analysis + TCEC on a diffusion UNet.

  python experiments/quantize.py --outdir=runs/main
  python experiments/quantize.py --config.settings=W4A4 --config.observers=mse --outdir=runs/w4a4
  python experiments/quantize.py --config.checkpoint=path/to/model_dir
  python experiments/quantize.py --outdir=runs/main --overwrite   # replace an earlier run
  python experiments/quantize.py --distributed ...     # multi-host (see README, "Scale out")
"""

from absl import flags

from tac_jax.app import launch, pipeline

_CONFIG = launch.define_config("config", "configs/quantize.py", "Main job config.")
_OUTDIR = flags.DEFINE_string("outdir", "runs/main", "Results, grids and plots go here.")


if __name__ == "__main__":
  launch.main(lambda: pipeline.run(_CONFIG.value, _OUTDIR.value,
                                   overwrite=launch.OVERWRITE.value))
