from tac_jax.models.unet import UNet, UNetConfig, init_unet, timestep_embedding
