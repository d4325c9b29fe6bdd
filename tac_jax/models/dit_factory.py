"""Model factories in the main job's format for class-conditional DiTs with classifier-free
guidance at a fixed scale and fixed labels.

A factory takes no arguments and returns (module, params, schedule, (H, W, C)) with
`module.apply({"params": params}, x, t)` the noise prediction the sampler consumes, here
the guided one (diffusion.guidance):

    eps_g = eps_u + w (eps_c - eps_u),   [eps_c; eps_u] = eps(DiT([x; x], [t; t], [y; null]))

one batched call, eps(.) the epsilon half of a learned-sigma output (`epsilon_prediction`).
`GuidedDiT` is that module: it holds the DiT (its params under "dit"), the labels and the
scale as static attributes. Sample i of a batch gets label labels[i % len(labels)], so any
batch size works (the main job calls with calibration, evaluation and PTQ batches of
different sizes); PTQ sees the 2B-sample call, conditional and null halves.

    tiny()                                      a random tiny DiT (tests, smoke runs)
    make_guided_factory(directory, labels, w)   a factory for an imported diffusers DiT

To run an imported DiT through the main job, name a factory in a module of your own:

    # my_models.py
    from tac_jax.models.dit_factory import make_guided_factory
    dit_xl = make_guided_factory("/ckpt/DiT-XL-2-256", labels=(207, 360, 387, 974), scale=4.0)

    python experiments/quantize.py --config.model=my_models:dit_xl --outdir=runs/dit

The images are the DiT's latents ([sample_size, sample_size, in_channels]), not decoded.
The schedule is read from `scheduler/scheduler_config.json` next to the transformer when
there is one (linear or squaredcos_cap_v2 betas), else DiT's: linear 1e-4..0.02, T = 1000.
`EpsilonApply` adapts a bare DiT apply (float or `QuantizedModel.apply_fn`) to
`guidance.guided`, for conditions that change per batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax

from tac_jax.diffusion import guidance
from tac_jax.models.convert import schedule_from_diffusers
from tac_jax.models.dit import DiT, epsilon_prediction, init_dit
from tac_jax.models.dit_config import DiTConfig
from tac_jax.models.dit_convert import import_dit_diffusers

DIT_SCHEDULE = {"name": "linear", "num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02}
TINY = DiTConfig(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
                 num_attention_heads=2, attention_head_dim=8, num_embeds_ada_norm=10)
TINY_LABELS = tuple(range(10))
TINY_SCALE = 4.0


@dataclasses.dataclass(frozen=True)
class EpsilonApply:
  """`apply_cond` for `guidance.guided`: a DiT's apply (`DiT.apply` or a QuantizedApply)
  followed by the epsilon half of its output. Hashable, compared by value."""
  apply: Callable
  config: DiTConfig

  def __call__(self, variables, x, t, cond, mask=None):
    args = (cond,) if mask is None else (cond, mask)
    return epsilon_prediction(self.apply(variables, x, t, *args), self.config)


def check_labels(labels: Sequence[int], config: DiTConfig) -> Tuple[int, ...]:
  """The labels as a tuple of ints in [0, classes); ValueError otherwise."""
  if not config.class_conditional:
    raise ValueError("GuidedDiT is for class-conditional DiTs (ada_norm_zero); guide a text-"
                     "conditioned PixArt with guidance.guided and Condition(embeddings, mask).")
  labels = tuple(labels)
  n = config.num_embeds_ada_norm
  if not labels or any(int(y) != y or not 0 <= y < n for y in labels):
    raise ValueError(f"labels must be a non-empty sequence of class indices in [0, {n}), got "
                     f"{labels!r} ({n} is the null label, added by guidance itself).")
  return tuple(int(y) for y in labels)


class GuidedDiT(nn.Module):
  """(x [B, S, S, C], t [B]) -> eps_g [B, S, S, C] of a class-conditional DiT at a fixed
  guidance scale, sample i conditioned on labels[i % len(labels)] (module docstring)."""
  config: DiTConfig
  labels: Tuple[int, ...]
  scale: float = TINY_SCALE

  @nn.compact
  def __call__(self, x, t):
    dit = DiT(self.config, name="dit")
    call = lambda x_in, t_in, y: epsilon_prediction(dit(x_in, t_in, y), self.config)
    return guidance.guide_labels(call, x, t, self.labels, self.config.null_class_label,
                                 self.scale)


def guided_module(config: DiTConfig, labels: Sequence[int], scale: float) -> GuidedDiT:
  """A checked `GuidedDiT`; its params are {"dit": the DiT's params}."""
  return GuidedDiT(config, check_labels(labels, config), guidance.check_scale(scale))


def tiny(seed: int = 0):
  """A random tiny learned-sigma DiT (8x8x4, 10 classes) with CFG at w = 4 on labels 0..9."""
  module, params = init_dit(TINY, jax.random.key(seed))
  shape = (TINY.sample_size, TINY.sample_size, TINY.in_channels)
  return (guided_module(TINY, TINY_LABELS, TINY_SCALE), {"dit": params},
          {"name": "linear", "num_timesteps": 1000}, shape)


def diffusers_schedule(directory: str, prediction_types: Sequence[str] = ("epsilon",)
                       ) -> Dict[str, Any]:
  """make_schedule kwargs from the pipeline's `scheduler/scheduler_config.json` (looked up
  in `directory` and its parent; `convert.schedule_from_diffusers`, which checks it and
  names the file in its errors), else DiT's linear schedule."""
  found = schedule_from_diffusers(directory, prediction_types)
  return dict(DIT_SCHEDULE) if found is None else found


def guided_dit(directory: str, labels: Sequence[int], scale: float,
               schedule: Optional[Dict[str, Any]] = None):
  """(module, params, schedule, shape) of the diffusers DiT in `directory` with CFG."""
  _, params, config = import_dit_diffusers(directory)
  shape = (config.sample_size, config.sample_size, config.in_channels)
  sched = diffusers_schedule(directory) if schedule is None else dict(schedule)
  return guided_module(config, labels, scale), {"dit": params}, sched, shape


def make_guided_factory(directory: str, labels: Sequence[int], scale: float,
                        schedule: Optional[Dict[str, Any]] = None) -> Callable[[], Any]:
  """A zero-argument factory for the main job (module docstring): the diffusers DiT in
  `directory`, imported when called, guided at `scale` on `labels`."""
  guidance.check_scale(scale)
  labels = tuple(labels)
  if not labels:
    raise ValueError("labels must name at least one class.")
  return functools.partial(guided_dit, directory, labels, scale, schedule)
