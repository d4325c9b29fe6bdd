"""The evaluation sweep: settings x methods x samplers x seeds, PTQ options, ablations,
Frechet distance, error analysis; writes report.md, sweep.json, plots and grids.

  python experiments/sweep.py --outdir=runs/sweep
  python experiments/sweep.py --config.seeds=0,1,2 --config.samplers=ddim10,ddim25 --outdir=runs/s
"""

import sys

from absl import flags

from tac_jax.app import launch, sweep

_CONFIG = launch.define_config("config", "configs/sweep.py", "Sweep config.")
_OUTDIR = flags.DEFINE_string("outdir", "runs/sweep", "Report, JSON and figures go here.")


if __name__ == "__main__":
  launch.main(lambda: sweep.run(
      _CONFIG.value, _OUTDIR.value, overwrite=launch.OVERWRITE.value,
      command=" ".join(["python experiments/sweep.py"] + sys.argv[1:])))
