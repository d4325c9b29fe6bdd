"""Latent text-to-image: a diffusers Stable Diffusion folder as one guided latent model.

A diffusers pipeline folder holds `unet/` (a `UNet2DConditionModel`), `vae/` (an
`AutoencoderKL`) and `scheduler/`. Sampling runs in the VAE's latent space; the text
encoder's output is the UNet's condition. We take the condition as precomputed arrays
(no text encoder runs here) and guide with classifier-free guidance (CFG) at a fixed
scale, so the sampler, PTQ and every compensator see a plain `apply(variables, x, t)`:

    eps_g = eps(x, t, null) + w (eps(x, t, c_i) - eps(x, t, null))

with ONE batched UNet call on [x; x] (`guidance.combine`), sample i asking for prompt
i % P. The prompt arrays travel in the params (`{"unet": ..., "prompts": {"cond": ...,
"null": ...}}`), never in the module, so the module stays hashable and the quantizer sees
the UNet's layers under `unet/`.

Conditions file (`.npz`), one row per prompt (P prompts) and one for the empty prompt:

    encoder_hidden_states       [P, L, D]   the text encoder's last hidden states
    null_encoder_hidden_states  [1, L, D]   the empty prompt's (CFG's null condition)
    text_embeds, null_text_embeds  [P, E], [1, E]   SDXL only: pooled text embeddings
    time_ids, null_time_ids        [P, K], [1, K]   SDXL only: size / crop ids

`DiffusersPipeline.decode(z)` maps latents to images in [-1, 1] through the VAE (z /
scaling_factor + shift_factor), so metrics compare images, not latents.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tac_jax.diffusion import guidance, make_schedule, prediction
from tac_jax.models import convert, dit_factory, vae
from tac_jax.models.unet_cond import UNet2DCondition, import_unet_cond_diffusers
from tac_jax.models.unet_cond_config import UNetCondConfig

SD_GUIDANCE_SCALE = 7.5   # diffusers' StableDiffusionPipeline default
COND_KEYS = ("encoder_hidden_states", "text_embeds", "time_ids")


def _as_unet_cond(rows: Mapping[str, jax.Array], config: UNetCondConfig):
  """The UNet's `cond`: the hidden states alone (SD 1.x / 2.x) or the SDXL dict."""
  if config.text_time:
    return dict(rows)
  return rows["encoder_hidden_states"]


class GuidedTextUNet(nn.Module):
  """(x [B, h, w, C] latents, t [B]) -> eps_g of a text-conditioned UNet at a fixed guidance
  scale; sample i uses prompt row i % P of params["prompts"]["cond"] (module docstring)."""
  config: UNetCondConfig
  scale: float = SD_GUIDANCE_SCALE
  # What the UNet predicts (the scheduler config's prediction_type). Not epsilon (SD 2.x's
  # v-prediction): the guided output is converted to eps with the schedule's alphas_cumprod
  # `abar` ([T]); guidance commutes with the conversion, which is affine in the output.
  prediction_type: str = "epsilon"
  abar: Tuple[float, ...] = ()

  def __call__(self, x, t):
    t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
    out = self.guided(x, t)
    if self.prediction_type == "epsilon":
      return out
    abar_t = jnp.asarray(self.abar, jnp.float32)[t].reshape((-1,) + (1,) * (x.ndim - 1))
    return prediction.to_epsilon(out, x, abar_t.astype(out.dtype), self.prediction_type)

  @nn.compact
  def guided(self, x, t):
    unet = UNet2DCondition(self.config, name="unet")
    prompts = self.param("prompts", lambda _: {})   # given, never initialised
    cond, null = prompts["cond"], prompts.get("null")
    b = x.shape[0]
    n = jax.tree.leaves(cond)[0].shape[0]
    pick = lambda v: v[jnp.arange(b) % n]
    c = _as_unet_cond(jax.tree.map(pick, cond), self.config)
    if self.scale == 1.0:
      return unet(x, t, c)
    u = _as_unet_cond(jax.tree.map(lambda v: jnp.broadcast_to(v, (b,) + v.shape[1:]), null),
                      self.config)
    both = jax.tree.map(lambda a, z: jnp.concatenate([a, z]), c, u)
    eps = unet(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
    return guidance.combine(eps[:b], eps[b:], self.scale)


def load_conditions(path: str, config: UNetCondConfig) -> Dict[str, Dict[str, np.ndarray]]:
  """{"cond": {...}, "null": {...}} from a conditions `.npz` (module docstring), checked
  against the UNet's config; ValueError naming the missing or misshapen array."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"conditions file {path!r} not found: write an .npz with "
                            "encoder_hidden_states [P, L, D] and null_encoder_hidden_states "
                            "[1, L, D] (tac_jax.models.latent docstring).")
  with np.load(path, allow_pickle=False) as f:
    arrays = {k: np.asarray(f[k], np.float32) for k in f.files}
  keys = COND_KEYS if config.text_time else COND_KEYS[:1]
  missing = [k for k in keys for k in (k, f"null_{k}") if k not in arrays]
  if missing:
    raise ValueError(f"conditions file {path}: missing {missing} (this UNet "
                     f"{'is SDXL-style and ' if config.text_time else ''}needs {list(keys)} and "
                     "their null_ rows).")
  cond = {k: arrays[k] for k in keys}
  null = {k: arrays[f"null_{k}"] for k in keys}
  h = cond["encoder_hidden_states"]
  if h.ndim != 3 or h.shape[2] != config.cross_attention_dim:
    raise ValueError(f"conditions file {path}: encoder_hidden_states must be [P, L, "
                     f"{config.cross_attention_dim}], got {list(h.shape)}.")
  for k in keys:
    if null[k].shape != (1,) + cond[k].shape[1:] or cond[k].shape[0] != h.shape[0]:
      raise ValueError(f"conditions file {path}: {k} {list(cond[k].shape)} and null_{k} "
                       f"{list(null[k].shape)} must be [P, ...] and [1, ...] with the same "
                       f"trailing shape and P = {h.shape[0]} prompts.")
  return {"cond": cond, "null": null}


@dataclasses.dataclass(frozen=True, eq=False)
class DiffusersPipeline:
  """A diffusers SD-family folder as a guided latent model: `module.apply({"params":
  params}, z, t)` -> eps_g; `schedule` (make_schedule kwargs), latent `shape` (h, w, C);
  `decode(z)` -> images in [-1, 1]."""
  module: GuidedTextUNet
  params: Any
  schedule: Dict[str, Any]
  shape: Tuple[int, int, int]
  vae_module: Any
  vae_params: Any
  vae_config: vae.VAEConfig
  num_prompts: int

  def decode(self, z: jax.Array) -> jax.Array:
    """Latents [B, h, w, C] -> images [B, H, W, 3] in [-1, 1] (jitted)."""
    return _decode(self.vae_module, self.vae_config, self.vae_params, z)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _decode(module, config: vae.VAEConfig, params, z):
  x = module.apply({"params": params}, vae.from_latent(config, z), method=module.decode)
  return jnp.clip(x, -1.0, 1.0)


def load_pipeline(directory: str, conditions: str, scale: Optional[float] = None
                  ) -> DiffusersPipeline:
  """The SD-family pipeline in `directory` (unet/, vae/, scheduler/) guided at `scale`
  (None: 7.5, diffusers' default) on the prompts of the `conditions` .npz."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"diffusers folder {directory!r} not found (it should hold unet/, "
                            "vae/ and scheduler/).")
  _, unet_params, unet_config = import_unet_cond_diffusers(directory)
  vae_module, vae_params, vae_config = vae.import_vae_diffusers(directory)
  prompts = load_conditions(conditions, unet_config)
  w = guidance.check_scale(SD_GUIDANCE_SCALE if scale is None else scale)
  schedule = dit_factory.diffusers_schedule(directory, prediction.PREDICTION_TYPES)
  kind = convert.prediction_type_from_diffusers(directory)
  abar = () if kind == "epsilon" else tuple(
      float(a) for a in make_schedule(**schedule).alphas_cumprod)
  module = GuidedTextUNet(unet_config, w, kind, abar)
  shape = (unet_config.sample_size, unet_config.sample_size, unet_config.in_channels)
  params = {"unet": unet_params, "prompts": jax.tree.map(jnp.asarray, prompts)}
  return DiffusersPipeline(module, params, schedule, shape,
                           vae_module, vae_params, vae_config,
                           int(prompts["cond"]["encoder_hidden_states"].shape[0]))
