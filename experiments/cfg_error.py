"""How classifier-free guidance scales the per-step quantization error (issue 24, item 3).

  python experiments/cfg_error.py [--checkpoint=dit_flow] [--scales=0,1,2,3,4,6] \
      [--outdir=docs/results_cfg_error]

The sampler consumes eps_g = eps_u + w (eps_c - eps_u), so a quantized network's per-step
error on it is d_g = w d_c + (1 - w) d_u. If the branch errors d_c, d_u were independent
and of equal size, guidance would amplify them by sqrt(w^2 + (1 - w)^2) (3.6x at w = 3);
if they were equal, not at all. This measures it on a class-conditional checkpoint: PTQ
(min-max) calibrated on the guided float trajectory at the model's own w, then for each
w along the float guided trajectory at that w (held-out seeds): RMS d_g / RMS d_c, the
correlation of d_c and d_u, the end-to-end PSNR of plain PTQ against float at that w, and
how much of d_g a one-step, per-step and per-channel least-squares correction leaves
(fitted on the calibration seeds' trajectories at that w, measured on the held-out ones)
when it is fitted on the guided output, d_g ~ K eps_g^q + beta, or on each branch,
d_c ~ K_c eps_c^q + beta_c and d_u ~ K_u eps_u^q + beta_u combined with w.
Prints one markdown table per setting; with --outdir also writes them to results.md next
to a manifest.json (config, revision, checksums), atomically (docs/METHOD.md quotes
docs/results_cfg_error).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from tac_jax import files
from tac_jax import quant
from tac_jax.app import launch
from tac_jax.app import stages
from tac_jax.compensation import lstsq
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
_OUT = flags.DEFINE_string("outdir", "", "If set, write results.md and manifest.json there.")
_CONFIG_FLAGS = ("checkpoint", "scales", "settings", "steps", "num_samples", "seed")


def _rms(x):
  return float(jnp.sqrt(jnp.mean(jnp.square(x))))


def _branch_outputs(qm, model, batches):
  """Per branch ("c", "u"): (quantized, float) outputs at the float guided trajectory's
  states, steps stacked [N, B, H, W, C]."""
  cfg, labels = model.module.config, model.module.labels
  out = {}
  for name, w in (("c", 1.0), ("u", 0.0)):
    branch = dit_factory.guided_module(cfg, labels, w)
    q = dataclasses.replace(qm, module=branch).apply_fn("fake")
    qs, fs = [], []
    for x, t in batches:
      tt = jnp.full((x.shape[0],), t, jnp.float32)
      qs.append(q(qm.variables, x, tt))
      fs.append(branch.apply(model.variables, x, tt))
    out[name] = (jnp.stack(qs), jnp.stack(fs))
  return out


def _fit(d, q):
  """Per step and channel least squares d ~ K q + beta over samples and pixels, as
  [N, 1, 1, 1, C] arrays (`compensation.lstsq`, the fit the compensators use)."""
  k, b = jax.vmap(lambda qi, di: lstsq.solve_affine(lstsq.affine_stats(qi, di), ridge=0.0))(q, d)
  return k[:, None, None, None], b[:, None, None, None]


def _residuals(cal, ev, w):
  """RMS of d_g left after the one-step fit (a) on the guided output, (b) on each branch
  (fitted on `cal`, measured on `ev`), as a fraction of RMS d_g."""
  g = lambda o, i: w * o["c"][i] + (1 - w) * o["u"][i]
  d_cal, d_ev = g(cal, 0) - g(cal, 1), g(ev, 0) - g(ev, 1)
  k, b = _fit(d_cal, g(cal, 0))
  guided = d_ev - (k * g(ev, 0) + b)
  fits = {n: _fit(cal[n][0] - cal[n][1], cal[n][0]) for n in ("c", "u")}
  hat = {n: fits[n][0] * ev[n][0] + fits[n][1] for n in ("c", "u")}
  branch = d_ev - (w * hat["c"] + (1 - w) * hat["u"])
  return _rms(guided) / _rms(d_ev), _rms(branch) / _rms(d_ev)


def _write(outdir: str, lines) -> None:
  """results.md and manifest.json; the folder appears only when complete."""
  config = {f: flags.FLAGS[f].value for f in _CONFIG_FLAGS}
  files.write_report(outdir, "\n".join(lines) + "\n", config)
  print(f"wrote {outdir}: results.md, manifest.json")


def main():
  outdir = files.check_output_dir(_OUT.value, launch.OVERWRITE.value) if _OUT.value else None
  lines = []

  def emit(text):
    print(text, flush=True)
    lines.append(text)

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
    qm = stages.quantize(base, calib, qconfig)
    emit(f"\n{setting} min-max, PTQ calibrated at w = {w0:g}; Euler {_STEPS.value}, "
         f"{_NUM.value} held-out seeds\n")
    emit("| w | RMS d_g / RMS d_c | sqrt(w^2+(1-w)^2) | corr(d_c, d_u) | RMS d_u / RMS d_c "
          "| plain PTQ PSNR (dB) | left after guided fit | left after per-branch fit |")
    emit("|---|---|---|---|---|---|---|---|")
    for w in scales:
      model = stages.load_model(_CKPT.value, guidance_scale=w)
      outs, final = {}, {}
      for name, x in (("cal", x_cal), ("eval", x_eval)):
        final[name], traj_w = run(model.module.apply, model.variables, x)
        outs[name] = _branch_outputs(qm, model, samplers.calibration_batches(traj_w, sampler))
      d_c, d_u = (outs["eval"][n][0] - outs["eval"][n][1] for n in ("c", "u"))
      d_g = w * d_c + (1 - w) * d_u
      corr = float(jnp.vdot(d_c, d_u) / (jnp.linalg.norm(d_c) * jnp.linalg.norm(d_u)))
      left_g, left_b = _residuals(outs["cal"], outs["eval"], w)
      state = final["eval"]
      q = dataclasses.replace(qm, module=model.module).apply_fn("fake")
      q_state, _ = run(q, qm.variables, x_eval)
      psnr = float(jnp.mean(image.psnr(jnp.clip(q_state.x, -1, 1), jnp.clip(state.x, -1, 1))))
      emit(f"| {w:g} | {_rms(d_g) / _rms(d_c):.2f} | {np.hypot(w, 1 - w):.2f} | {corr:.3f} "
           f"| {_rms(d_u) / _rms(d_c):.2f} | {psnr:.2f} | {left_g:.3f} | {left_b:.3f} |")
  if outdir:
    _write(outdir, lines)

if __name__ == "__main__":
  launch.main(main)
