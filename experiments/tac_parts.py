"""Which part of TAC-Diffusion helps and which hurts on the default model at W8A8:
its input bias correction (IBC, the state shift) or its noise estimation reconstruction
(NER, the masked gain)? Each part is switched off with `errors.scale_params`.

  python experiments/tac_parts.py
"""

import jax
import jax.numpy as jnp
import numpy as np

from tac_jax import checkpoint, errors, metrics, quant
from tac_jax.diffusion import make_schedule, samplers
from tac_jax.stages import seed_noise


def main():
  module, params, meta = checkpoint.load_model(checkpoint.default_model_dir())
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
  run = jax.jit(lambda p: samplers.sample(fq, qm.variables, errors.compensate(sampler, p), x_eval,
                                          key_eval)[0].x)
  psnr = lambda p: float(jnp.mean(metrics.psnr(run(p), x_ref)))
  print(f"plain PTQ: PSNR {psnr(None):.2f} dB")
  for name, ref in (("tac", errors.ReferenceConfig()),
                    ("tac, threshold 0", errors.ReferenceConfig(tac_threshold=0.0))):
    p = jax.jit(lambda x: errors.calibrate(fp, var_fp, fq, qm.variables, sampler, x, key_cal,
                                           "tac", schedule=sched, reference_config=ref))(x_cal)
    for ner, ibc in ((1, 1), (1, 0), (0, 1)):
      print(f"{name}: NER {'on ' if ner else 'off'} IBC {'on ' if ibc else 'off'}: PSNR "
            f"{psnr(errors.scale_params(p, ner, ibc)):.2f} dB", flush=True)
    print(f"  NER gain 1 - K per step (channel 0): {np.round(1 - np.asarray(p.K[:, 0]), 3)}")


if __name__ == "__main__":
  main()
