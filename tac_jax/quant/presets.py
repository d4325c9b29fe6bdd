"""The quantization defaults and named base-PTQ presets the launchers, configs and
benchmarks share (one place).

`quant_defaults()` is the `config.quant` section of the main job and the sweep;
`quant_config(section, w_bits, a_bits, preset)` turns it and a preset into a QuantConfig.

Presets (the ladder the main job and the sweep can run, each with every compensator):

    minmax       per-output-channel weights, one static activation range per tensor
                 (min-max over the float sampler's trajectories at all timesteps)
    mse          the same, ranges chosen by the MSE search (weights and activations)
    percentile   the same, ranges at the 99.99th percentile
    minmax_bc    minmax + bias correction (each layer's mean output error folded away)
    qdiff        Q-Diffusion's base: MSE ranges, split shortcuts (the layers in
                 `split_layers`, fed a concatenation, get one range per part), on
                 calibration data from every sampler step (as all presets here)
    groupwise    weights per (group of `group_size` input features, output channel),
                 activations per (token, group) at run time
    smoothquant  groupwise after SmoothQuant migration (alpha = `smooth_alpha`)
    svdquant     smoothquant + a rank-`low_rank` float branch (SVDQuant)
    svdquant_bc  svdquant + bias correction
    qwix         Google's qwix PTQ (quant.qwix_base, the `qwix` extra) on minmax's layer
                 choices and static activation ranges: symmetric per-channel weights
                 (docs/qwix.md says what it covers)
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from tac_jax.quant.spec import QuantConfig

# First / last / time-embedding layers stay at W8A8 (as in Q-Diffusion and PTQD).
KEEP_8BIT = r"^(conv_in|conv_out|time_embedding/.*)$"
# The same for a DiT / PixArt (diffusers' names, under at most one wrapper such as a
# guided model's "dit/"): the patch embedding, the output layers, the timestep / caption
# embeddings and the adaLN modulations. On the shipped DiT at W4A8 (min-max, no
# compensation) the adaLN modulations at 8 bits give +0.44 dB, the patch embedding and
# output layers +1.7 dB, both +2.3 dB (docs/results_dit_layers); configs/quantize_dit.py.
DIT_KEEP_8BIT = (r"^([^/]+/)?(pos_embed/proj|proj_out(_[12])?|adaln_single/.*|"
                 r"caption_projection/.*|transformer_blocks_\d+/norm1/(linear|emb/.*))$")
# Our UNet's layers fed a concatenation of skip and up-path features (the up blocks'
# shortcut convs; conv1 sees it only after a GroupNorm).
SPLIT_SHORTCUTS = r"^up_blocks_\d+/resnets_\d+/conv_shortcut$"

# The bits come from the job's `settings` (W8A8, W4A8, W4A4), not from this section.
BITS_FIELDS = ("w_bits", "a_bits")

# Preset -> QuantConfig fields; "{group}", "{rank}", "{alpha}" come from the quant section.
PRESETS = {
    "minmax": {},
    "mse": {"w_observer": "mse", "a_observer": "mse"},
    "percentile": {"w_observer": "percentile", "a_observer": "percentile"},
    "minmax_bc": {"bias_correction": True},
    "qdiff": {"w_observer": "mse", "a_observer": "mse", "split_layers": "{split}"},
    "groupwise": {"group_size": "{group}"},
    "smoothquant": {"group_size": "{group}", "smooth_alpha": "{alpha}"},
    "svdquant": {"group_size": "{group}", "smooth_alpha": "{alpha}", "low_rank": "{rank}"},
    "svdquant_bc": {"group_size": "{group}", "smooth_alpha": "{alpha}", "low_rank": "{rank}",
                    "bias_correction": True},
}
# Presets run by another library's PTQ: name -> "module:function" with quantize_model's
# signature (imported when used: optional dependencies).
EXTERNAL = {"qwix": "tac_jax.quant.qwix_base:quantize_with_qwix"}
PRESETS["qwix"] = {}
PRESET_PARAMS = {"group": "group_size", "rank": "low_rank", "alpha": "smooth_alpha",
                 "split": "split_layers"}


# The `config.quant` section's defaults (the one place they are stated): weights per output
# channel, activations per tensor (asymmetric), one activation range for all timesteps,
# first/last layers at 8 bit; the group-wise presets' groups of 32 features (SVDQuant uses
# 64 on layers far wider than ours), a rank-16 float branch (capped at min(K, N) /
# ptq.LOW_RANK_CAP per layer), SmoothQuant's alpha = 0.5; the layers with split activation
# ranges in the `qdiff` preset (set your model's); the attention matmuls (q k^T, softmax v)
# quantized at the activation bits only when asked.
SECTION_DEFAULTS = dict(w_per_channel=True, a_symmetric=False, time_groups=1, keep_8bit=KEEP_8BIT,
                        exclude=r"^$", group_size=32, low_rank=16, smooth_alpha=0.5,
                        split_layers=SPLIT_SHORTCUTS, attention_matmuls=False)


def quant_defaults() -> ml_collections.ConfigDict:
  """The `quant` section of a job config (`SECTION_DEFAULTS`)."""
  section = ml_collections.ConfigDict(dict(SECTION_DEFAULTS))
  # Not settable: present so that --config.quant.w_bits=4 says where bits are chosen.
  for k in BITS_FIELDS:
    section[k] = ml_collections.config_dict.placeholder(int)
  return section


def check_preset(name: str) -> str:
  if name not in PRESETS:
    raise ValueError(f"unknown PTQ preset {name!r}; choose from {sorted(PRESETS)} "
                     "(tac_jax/quant/presets.py).")
  return name


def quant_config(section: Mapping[str, Any], w_bits: int, a_bits: int,
                 preset: str = "minmax", **overrides) -> QuantConfig:
  """A QuantConfig from a job config's `quant` section, a setting's bits and a preset."""
  section = dict(section)
  given = [k for k in BITS_FIELDS if section.pop(k, None) is not None]
  if given:
    raise ValueError(f"config.quant.{given[0]} is not a field: the bits come from "
                     "--config.settings (W8A8, W4A8, W4A4).")
  params = {k: section.pop(field, SECTION_DEFAULTS[field]) for k, field in PRESET_PARAMS.items()}
  fields = {k: section.pop(k, SECTION_DEFAULTS[k]) for k in SECTION_DEFAULTS
            if k not in PRESET_PARAMS.values()}
  if section:
    raise ValueError(f"unknown config.quant fields {sorted(section)}; known: "
                     f"{sorted(list(fields) + list(PRESET_PARAMS.values()))}.")
  for field, value in PRESETS[check_preset(preset)].items():
    fields[field] = params[value[1:-1]] if isinstance(value, str) and value.startswith("{") \
        else value
  fields.update(overrides)
  return QuantConfig(w_bits=w_bits, a_bits=a_bits, **fields)
