from tac_jax.models.unet import UNet, UNetConfig, init_unet, timestep_embedding
from tac_jax.models.checkpoint import load_pretrained, save_model
