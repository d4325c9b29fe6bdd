"""Train the feature classifier of the Frechet distance (ships in tac_jax/assets/classifier).

  python experiments/train_classifier.py [--outdir=tac_jax/assets/classifier] [--steps=1500]

A small CNN on the colored 16x16 digits (4 color seeds, as the default model), 15 % of the source digits (all
their colored copies) held out for the reported accuracy. About a minute on 2 CPU cores.
"""

import time

import numpy as np
from absl import flags

from tac_jax import data
from tac_jax.app import launch
from tac_jax.metrics import frechet

_OUTDIR = flags.DEFINE_string("outdir", frechet.classifier_dir(), "Where to write the classifier.")
_STEPS = flags.DEFINE_integer("steps", 1500, "Training steps (batch 128).")
_SEED = flags.DEFINE_integer("seed", 0, "Data order, init and held-out split.")
_COLOR_SEEDS = 4


def main():
  t0 = time.time()
  images = np.concatenate([data.digits(16, True, seed=k) for k in range(_COLOR_SEEDS)])
  labels = np.tile(data.digit_labels(), _COLOR_SEEDS)
  groups = np.tile(np.arange(labels.size // _COLOR_SEEDS), _COLOR_SEEDS)  # source digit
  params, metrics = frechet.train_classifier(images, labels, groups, steps=_STEPS.value,
                                             seed=_SEED.value)
  meta = {"input_shape": list(images.shape[1:]), "data": {"name": "digits",
          "num_color_seeds": _COLOR_SEEDS}, "steps": _STEPS.value, "seed": _SEED.value, **metrics}
  frechet.save_classifier(_OUTDIR.value, params, meta)
  print(f"held-out accuracy {metrics['heldout_accuracy']:.4f} on {metrics['heldout_size']} images; "
        f"{time.time() - t0:.0f}s; wrote {_OUTDIR.value}")


if __name__ == "__main__":
  launch.main(main)
