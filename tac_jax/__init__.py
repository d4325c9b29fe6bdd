"""tac_jax: post-training quantization of diffusion models with timestep-aware
cumulative error compensation (TCEC, arXiv 2508.12094), in JAX/Flax."""

__version__ = "0.1.0"
