from tac_jax.metrics.image import pixel_std, psnr, quality_ratios, sharpness, ssim
