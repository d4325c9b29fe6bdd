"""The quantization defaults the launchers, configs and benchmarks share (one place).

`quant_defaults()` is the `config.quant` section of the main job and the sweep;
`quant_config(section, w_bits, a_bits, observer)` turns it into a QuantConfig.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from tac_jax.quant.inject import QuantConfig

# First / last / time-embedding layers stay at W8A8 (as in Q-Diffusion and PTQD).
KEEP_8BIT = r"^(conv_in|conv_out|time_embedding/.*)$"

# The bits come from the job's `settings` (W8A8, W4A8, W4A4), not from this section.
BITS_FIELDS = ("w_bits", "a_bits")


def quant_defaults() -> ml_collections.ConfigDict:
  """The `quant` section of a job config: weights per output channel, activations per
  tensor (asymmetric), one activation range for all timesteps, first/last layers at 8 bit."""
  return ml_collections.ConfigDict(dict(
      w_per_channel=True,
      a_symmetric=False,
      time_groups=1,
      keep_8bit=KEEP_8BIT,
      exclude=r"^$",
      # Not settable: present so that --config.quant.w_bits=4 says where bits are chosen.
      w_bits=ml_collections.config_dict.placeholder(int),
      a_bits=ml_collections.config_dict.placeholder(int)))


def quant_config(section: Mapping[str, Any], w_bits: int, a_bits: int,
                 observer: str, **overrides) -> QuantConfig:
  """A QuantConfig from a job config's `quant` section, a setting's bits and an observer."""
  section = dict(section)
  given = [k for k in BITS_FIELDS if section.pop(k, None) is not None]
  if given:
    raise ValueError(f"config.quant.{given[0]} is not a field: the bits come from "
                     "--config.settings (W8A8, W4A8, W4A4).")
  fields = dict(w_per_channel=section.get("w_per_channel", True),
                a_symmetric=section.get("a_symmetric", False),
                time_groups=section.get("time_groups", 1),
                keep_8bit=section.get("keep_8bit", KEEP_8BIT),
                exclude=section.get("exclude", r"^$"))
  unknown = set(section) - set(fields)
  if unknown:
    raise ValueError(f"unknown config.quant fields {sorted(unknown)}; known: {sorted(fields)}.")
  fields.update(overrides)
  return QuantConfig(w_bits=w_bits, a_bits=a_bits, w_observer=observer, a_observer=observer,
                     **fields)
