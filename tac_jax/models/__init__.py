"""Flax diffusion networks with diffusers' parameter names: the UNet (`UNet2DModel`), the
DiT / PixArt-alpha transformers, the text-conditioned UNet (`UNet2DConditionModel`) and
VAE (`AutoencoderKL`) of Stable Diffusion folders, their checkpoints and diffusers imports.
(`models.text_encoders` needs torch and transformers, so it is imported on its own.)"""

from tac_jax.models.checkpoint import load_pretrained, save_model
from tac_jax.models.dit import DiT, init_dit
from tac_jax.models.dit_config import DiTConfig
from tac_jax.models.dit_convert import import_dit_diffusers
from tac_jax.models.unet import UNet, UNetConfig, init_unet, timestep_embedding
from tac_jax.models.latent import load_pipeline
from tac_jax.models.unet_cond import UNet2DCondition, import_unet_cond_diffusers
from tac_jax.models.unet_cond_config import UNetCondConfig
from tac_jax.models.vae import AutoencoderKL, VAEConfig, import_vae_diffusers
