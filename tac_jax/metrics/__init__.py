from tac_jax.metrics.image import psnr, ssim
