"""Which part of TAC-Diffusion helps and which hurts on the default model at W8A8:
its input bias correction (IBC, the state shift) or its noise estimation reconstruction
(NER, the masked gain)? Each part is switched off with `compensation.scale_params`.

  python experiments/tac_parts.py
"""

import jax
import jax.numpy as jnp
import numpy as np

from tac_jax import compensation, metrics, models, quant
from tac_jax.diffusion import make_schedule, samplers
from tac_jax.app.stages import seed_noise


def main():
  module, params, meta = models.load_pretrained("default")
  sched = make_schedule(**meta["schedule"])
  sampler = samplers.ddim(sched, 20)
  fp, var_fp = module.apply, {"params": params}
  x_cal, key_cal, x_eval, key_eval = seed_noise(0, 64, 64, (16, 16, 3))
  _, traj = samplers.sample(fp, var_fp, sampler, x_cal, key_cal, return_trajectory=True)
  qm = quant.quantize_model(module, params, samplers.calibration_batches(traj, sampler.coeffs),
                            quant.QuantConfig(w_bits=8, a_bits=8,
                                              keep_8bit="^(conv_in|conv_out|time_embedding/.*)$"))
  fq = qm.apply_fn("fake")
  x_ref = samplers.sample(fp, var_fp, sampler, x_eval, key_eval)[0].x
  run = jax.jit(lambda p: samplers.sample(fq, qm.variables, compensation.compensate(sampler, p),
                                          x_eval, key_eval)[0].x)
  psnr = lambda p: float(jnp.mean(metrics.psnr(run(p), x_ref)))
  print(f"plain PTQ: PSNR {psnr(None):.2f} dB")
  nets = compensation.Net(fp, var_fp), compensation.Net(fq, qm.variables)
  for name, opts in (("tac", compensation.TACOptions()),
                     ("tac, threshold 0", compensation.TACOptions(threshold=0.0))):
    p = compensation.calibrate(*nets, sampler, x_cal, key_cal, "tac", opts).params
    for ner, ibc in ((1, 1), (1, 0), (0, 1)):
      print(f"{name}: NER {'on ' if ner else 'off'} IBC {'on ' if ibc else 'off'}: PSNR "
            f"{psnr(compensation.scale_params(p, ner, ibc)):.2f} dB", flush=True)
    print(f"  NER gain 1 - K per step (channel 0): {np.round(1 - np.asarray(p.K[:, 0]), 3)}")


if __name__ == "__main__":
  main()
