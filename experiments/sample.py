"""Sample grids of a float model folder (or shipped name) at one or more guidance scales.

  python experiments/sample.py --checkpoint=dit_flow --guidance_scales=0,3 \
      --out=docs/dit_flow_model_samples

writes OUT_w0.png, OUT_w3.png (one column per class for a class-conditional model) and
prints each grid's label accuracy (the shipped classifier's share of samples of the
requested class). Flow models are sampled with Euler, epsilon models with DDIM.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from tac_jax.app import launch
from tac_jax.app import stages
from tac_jax.app import viz
from tac_jax.diffusion import flow
from tac_jax.diffusion import samplers
from tac_jax.metrics import frechet

_CKPT = flags.DEFINE_string("checkpoint", "dit_flow", "Shipped model name or model folder.")
_SCALES = flags.DEFINE_list("guidance_scales", ["0", "3"],
                            "Guidance scales w (class-conditional models; 1 = conditional only).")
_STEPS = flags.DEFINE_integer("steps", 20, "Sampler steps (Euler for flow, DDIM for epsilon).")
_NUM = flags.DEFINE_integer("num_samples", 80, "Samples per grid.")
_SEED = flags.DEFINE_integer("seed", 1, "PRNG seed of the initial noise.")
_OUT = flags.DEFINE_string("out", "runs/samples", "Output prefix: OUT_w{w}.png.")


def _grid(model: stages.Model, num: int, steps: int, seed: int) -> np.ndarray:
  if isinstance(model.schedule, flow.FlowConfig):
    sampler = flow.flow_euler(steps, model.schedule.shift, model.schedule.num_train_timesteps)
  else:
    sampler = samplers.ddim(model.schedule, steps)
  key = jax.random.key(seed)
  x_T = jax.random.normal(key, (num,) + tuple(model.shape))
  run = jax.jit(lambda v, x, k: samplers.sample(model.module.apply, v, sampler, x, k)[0].x)
  return np.asarray(jnp.clip(run(model.variables, x_T, key), -1, 1))


def main():
  scales = []
  for s in _SCALES.value:
    try:
      scales.append(float(s))
    except ValueError:
      raise ValueError(f"--guidance_scales={','.join(_SCALES.value)}: {s!r} is not a number.")
  classifier = frechet.FeatureExtractor()
  for w in scales:
    model = stages.load_model(_CKPT.value, guidance_scale=w)
    imgs = _grid(model, _NUM.value, _STEPS.value, _SEED.value)
    cols = len(model.labels) if model.labels is not None else 8
    path = viz.save_grid(f"{_OUT.value}_w{w:g}.png", imgs, cols=cols)
    line = f"wrote {path}"
    requested = model.requested_labels(len(imgs))
    if requested is not None:
      acc = frechet.label_accuracy(classifier.classify(imgs), requested)
      line += f"  (w = {w:g}, label accuracy {100 * acc:.1f} % of {len(imgs)})"
    print(line)


if __name__ == "__main__":
  launch.main(main)
