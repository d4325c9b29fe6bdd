"""How classifier-free guidance scales the per-step quantization error (issue 24, item 3).

  python experiments/cfg_error.py [--checkpoint=dit_flow] [--scales=0,1,2,3,4,6]

The sampler consumes eps_g = eps_u + w (eps_c - eps_u), so a quantized network's per-step
error on it is d_g = w d_c + (1 - w) d_u. If the branch errors d_c, d_u were independent
and of equal size, guidance would amplify them by sqrt(w^2 + (1 - w)^2) (3.6x at w = 3);
if they were equal, not at all. This measures it on a class-conditional checkpoint: PTQ
(min-max) calibrated on the guided float trajectory at the model's own w, then for each
w along the float guided trajectory at that w (held-out seeds): RMS d_g / RMS d_c, the
correlation of d_c and d_u, and the end-to-end PSNR of plain PTQ against float at that w.
Prints one markdown table per setting (docs/METHOD.md quotes it).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from tac_jax import quant
from tac_jax.app import launch
from tac_jax.app import stages
from tac_jax.diffusion import flow
from tac_jax.diffusion import samplers
from tac_jax.metrics import image
from tac_jax.models import dit_factory

_CKPT = flags.DEFINE_string("checkpoint", "dit_flow", "A class-conditional DiT (name or folder).")
_SCALES = flags.DEFINE_list("scales", ["0", "1", "2", "3", "4", "6"], "Guidance scales w.")
_SETTINGS = flags.DEFINE_list("settings", ["W8A8", "W4A8"], "WxAy settings.")
_STEPS = flags.DEFINE_integer("steps", 20, "Euler steps.")
_NUM = flags.DEFINE_integer("num_samples", 40, "Calibration seeds (and as many held-out).")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")


def _rms(x):
  return float(jnp.sqrt(jnp.mean(jnp.square(x))))


def _branch_errors(qm, model, scale, batches):
  """Per step (d_c, d_u): quantized minus float output of each branch at the float
  guided trajectory's states, all steps stacked."""
  cfg, labels = model.module.config, model.module.labels
  d = {}
  for name, w in (("c", 1.0), ("u", 0.0)):
    branch = dit_factory.guided_module(cfg, labels, w)
    q = dataclasses.replace(qm, module=branch).apply_fn("fake")
    outs = []
    for x, t in batches:
      tt = jnp.full((x.shape[0],), t, jnp.float32)
      outs.append(q(model.variables, x, tt) - branch.apply(model.variables, x, tt))
    d[name] = jnp.stack(outs)
  return d["c"], d["u"]


def main():
  scales = [float(s) for s in _SCALES.value]
  base = stages.load_model(_CKPT.value)
  if base.labels is None:
    raise ValueError(f"--checkpoint={_CKPT.value} is not class-conditional.")
  if not isinstance(base.schedule, flow.FlowConfig):
    raise ValueError(f"--checkpoint={_CKPT.value} is not a flow model; this script samples Euler.")
  sampler = flow.flow_euler(_STEPS.value, base.schedule.shift, base.schedule.num_train_timesteps)
  k_cal, k_eval = jax.random.split(jax.random.key(_SEED.value))
  shape = (_NUM.value,) + tuple(base.shape)
  x_cal, x_eval = jax.random.normal(k_cal, shape), jax.random.normal(k_eval, shape)
  run = jax.jit(lambda apply, v, x: samplers.sample(apply, v, sampler, x, k_eval,
                                                    return_trajectory=True),
                static_argnums=0)
  _, traj = run(base.module.apply, base.variables, x_cal)
  calib = samplers.calibration_batches(traj, sampler)
  w0 = base.module.scale
  for setting in _SETTINGS.value:
    w_bits, a_bits = (int(v) for v in setting.upper().lstrip("W").split("A"))
    qconfig = quant.presets.quant_config(quant.presets.quant_defaults(), w_bits, a_bits, "minmax")
    qm = quant.quantize_model(base.module, base.params, calib, qconfig)
    print(f"\n{setting} min-max, PTQ calibrated at w = {w0:g}; Euler {_STEPS.value}, "
          f"{_NUM.value} held-out seeds\n")
    print("| w | RMS d_g / RMS d_c | sqrt(w^2+(1-w)^2) | corr(d_c, d_u) | RMS d_u / RMS d_c "
          "| plain PTQ PSNR (dB) |")
    print("|---|---|---|---|---|---|")
    for w in scales:
      model = stages.load_model(_CKPT.value, guidance_scale=w)
      state, traj = run(model.module.apply, model.variables, x_eval)
      d_c, d_u = _branch_errors(qm, model, w, samplers.calibration_batches(traj, sampler))
      d_g = w * d_c + (1 - w) * d_u
      corr = float(jnp.vdot(d_c, d_u) / (jnp.linalg.norm(d_c) * jnp.linalg.norm(d_u)))
      q = dataclasses.replace(qm, module=model.module).apply_fn("fake")
      q_state, _ = run(q, model.variables, x_eval)
      psnr = float(jnp.mean(image.psnr(jnp.clip(q_state.x, -1, 1), jnp.clip(state.x, -1, 1))))
      print(f"| {w:g} | {_rms(d_g) / _rms(d_c):.2f} | {np.hypot(w, 1 - w):.2f} | {corr:.3f} "
            f"| {_rms(d_u) / _rms(d_c):.2f} | {psnr:.2f} |", flush=True)


if __name__ == "__main__":
  launch.main(main)
