"""Flax diffusion networks with diffusers' parameter names: the UNet (`UNet2DModel`), the
DiT / PixArt-alpha transformers, their checkpoints and diffusers imports."""

from tac_jax.models.checkpoint import load_pretrained, save_model
from tac_jax.models.dit import DiT, init_dit
from tac_jax.models.dit_config import DiTConfig
from tac_jax.models.dit_convert import import_dit_diffusers
from tac_jax.models.unet import UNet, UNetConfig, init_unet, timestep_embedding
