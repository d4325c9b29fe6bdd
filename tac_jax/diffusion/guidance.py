"""Conditioned networks and classifier-free guidance (CFG) as a plain `apply(variables, x, t)`.

Samplers and compensators call a network as `apply(variables, x, t) -> eps`. A conditioned
network is `apply_cond(variables, x, t, value)`, or `apply_cond(variables, x, t, value, mask)`
when its `Condition` has a mask (class labels [B]; caption embeddings [B, L, D] and their
token mask [B, L]). Classifier-free guidance with scale w (diffusers' `guidance_scale`)
makes what the sampler consumes:

    eps_g(x, t) = eps_u + w (eps_c - eps_u),   eps_c = eps(x, t, c),  eps_u = eps(x, t, null)

with ONE batched network call, as diffusers' pipelines (and the PTQD / QNCD code) do:

    [eps_c; eps_u] = eps([x; x], [t; t], [c; null])

w = 1 (or None) is the conditional prediction alone and w = 0 the unconditional one: one
call on the B samples with c (resp. null). w must be finite and >= 0.

Conditions are arrays, which are not hashable, so they travel in the variables, never in
the apply: `guided(...)` returns `Guided(apply, cond, null)`, where `apply` is a
`GuidedApply` (a frozen dataclass of the network's apply and the scale: hashable and
compared by value, a static argument of jitted code, one compilation for any labels) that
reads `GuidedVariables(net, cond, null)`, and `bind(variables)` builds those:

    g = guided(module.apply, Condition(labels), Condition(null_labels), 4.0)
    fp = compensation.Net(g.apply, g.bind({"params": params}))
    gq = guided(qm.apply_fn("fake"), Condition(labels), Condition(null_labels), 4.0)
    q = compensation.Net(gq.apply, gq.bind(qm.variables))

The condition batch must be x's (or 1, broadcast to it); with `cycle=True` any batch n is
reused cyclically (sample i gets row i % n), for callers that run the net on other batch
sizes than the conditions' (tcec_safe fits on part of the seeds and validates on the rest).
`calibration_batches` gives PTQ the (x, t, *cond) batches of the call the guided apply makes.

Error propagation. eps_g is linear in (eps_c, eps_u), so the per-step quantization errors
d_c = eps_c^q - eps_c and d_u = eps_u^q - eps_u enter the step x_{k-1} = a_k x_k + b_k eps_g
(+ sigma_k z) as b_k d_g with

    d_g = w d_c + (1 - w) d_u = (1 + s) d_c - s d_u,   s = w - 1,

s being the strength of Ho & Salimans' eps_c + s (eps_c - eps_u). For w > 1 the
unconditional error enters with a negative weight: correlated errors (d_c ~ d_u) pass
nearly unchanged, independent ones grow to sqrt(w^2 + (w - 1)^2) times (5x at w = 4).
Compensators given guided nets on both sides fit d_g itself, the error the sampler sees.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, List, NamedTuple, Optional, Tuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from tac_jax.diffusion.samplers import StepCoeffs


@flax.struct.dataclass
class Condition:
  """The condition arrays of a batch (a pytree): `value` [B, ...] (labels [B], caption
  embeddings [B, L, D]) and an optional `mask` [B, ...] (caption token mask [B, L])."""
  value: Any
  mask: Any = None

  @property
  def batch(self) -> int:
    return int(jnp.shape(self.value)[0])

  @property
  def args(self) -> Tuple[Any, ...]:
    """The network's positional inputs after (x, t): (value,) or (value, mask)."""
    return (self.value,) if self.mask is None else (self.value, self.mask)

  def broadcast(self, batch: int) -> "Condition":
    return jax.tree.map(lambda v: jnp.broadcast_to(v, (batch,) + jnp.shape(v)[1:]), self)

  def concat(self, other: "Condition") -> "Condition":
    """[self; other] along the batch."""
    if (self.mask is None) != (other.mask is None):
      raise ValueError("the conditional and the null condition must both have a mask or "
                       "neither (e.g. the empty prompt's token mask).")
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), self, other)


@flax.struct.dataclass
class GuidedVariables:
  """What a `GuidedApply` takes as variables: the network's own and the conditions."""
  net: Any
  cond: Condition
  null: Optional[Condition] = None


def as_condition(cond) -> Condition:
  """A Condition, or an array (the value, no mask) as one."""
  return cond if isinstance(cond, Condition) else Condition(jnp.asarray(cond))


def check_scale(scale) -> float:
  """The guidance scale as a float (None: 1, conditional only); ValueError unless >= 0."""
  if scale is None:
    return 1.0
  try:
    w = float(scale)
  except (TypeError, ValueError):
    w = math.nan
  if not math.isfinite(w) or w < 0:
    raise ValueError(f"guidance scale must be a finite number >= 0 (diffusers' guidance_scale: "
                     f"0 unconditional, 1 conditional only, > 1 guided), got {scale!r}.")
  return w


def combine(eps_c, eps_u, scale: float):
  """eps_u + w (eps_c - eps_u); linear, so it also maps errors (d_c, d_u) to d_g."""
  return eps_u + scale * (eps_c - eps_u)


def _fit_batch(cond: Condition, batch: int, name: str, cycle: bool = False) -> Condition:
  if jnp.ndim(cond.value) == 0:
    raise ValueError(f"the {name} condition needs a batch axis (one row per sample), got a "
                     "scalar; e.g. jnp.full((B,), label).")
  n = cond.batch
  if cond.mask is not None and jnp.shape(cond.mask)[:1] != (n,):
    raise ValueError(f"the {name} condition's mask has shape {list(jnp.shape(cond.mask))}, "
                     f"its value batch {n}: one mask row per sample.")
  if n == batch:
    return cond
  if n == 1:
    return cond.broadcast(batch)
  if cycle:
    return jax.tree.map(lambda v: v[jnp.arange(batch) % n], cond)
  raise ValueError(f"the {name} condition has batch {n} but x has {batch} samples: pass one "
                   "condition per sample, a batch of 1 for all of them, or guided(..., "
                   "cycle=True) to reuse them cyclically.")


def network_inputs(x, t, cond: Condition, null: Optional[Condition], scale,
                   cycle: bool = False):
  """(x_in, t_in, cond args) of the one network call guidance makes for (x, t): [x; x],
  [t; t] and [c; null] when 0 < w != 1, else the B samples with c (w = 1) or null (w = 0)."""
  w = check_scale(scale)
  b = x.shape[0]
  t = jnp.broadcast_to(jnp.asarray(t), (b,))
  cond = _fit_batch(cond, b, "conditional", cycle)
  if w == 1.0:
    return x, t, cond.args
  if null is None:
    raise ValueError(f"guidance scale {w:g} mixes in the unconditional prediction: pass a null "
                     "condition (DiT's null label config.null_class_label, the empty prompt's "
                     "embedding).")
  null = _fit_batch(null, b, "null", cycle)
  if w == 0.0:
    return x, t, null.args
  return jnp.concatenate([x, x]), jnp.concatenate([t, t]), cond.concat(null).args


def guide(call: Callable, x, t, cond: Condition, null: Optional[Condition] = None,
          scale: Optional[float] = None, cycle: bool = False):
  """eps_g from one network call `call(x_in, t_in, *cond_args)` (module docstring)."""
  w = check_scale(scale)
  x_in, t_in, args = network_inputs(x, t, cond, null, w, cycle)
  eps = call(x_in, t_in, *args)
  b = x.shape[0]
  if x_in.shape[0] == b:
    return eps
  return combine(eps[:b], eps[b:], w)


def guide_labels(call: Callable, x, t, labels, null_label: int, scale: Optional[float]):
  """eps_g of a class-conditional `call(x_in, t_in, y)`: sample i asks for class
  labels[i % len(labels)], the null branch for `null_label` (one batched call)."""
  cond = Condition(jnp.asarray(labels, jnp.int32))
  null = Condition(jnp.full((1,), int(null_label), jnp.int32))
  return guide(call, x, t, cond, null, scale, cycle=True)


@dataclasses.dataclass(frozen=True)
class GuidedApply:
  """`apply(GuidedVariables, x, t) -> eps_g` of the conditioned `apply_cond` at `scale`:
  hashable and compared by value (a static argument of jitted code)."""
  apply_cond: Callable
  scale: float = 1.0
  cycle: bool = False

  def __call__(self, variables, x, t):
    if not isinstance(variables, GuidedVariables):
      raise ValueError("a guided apply takes GuidedVariables(net, cond, null), got "
                       f"{type(variables).__name__}: build them with Guided.bind(variables).")
    call = lambda x_in, t_in, *c: self.apply_cond(variables.net, x_in, t_in, *c)
    return guide(call, x, t, variables.cond, variables.null, self.scale, self.cycle)


class Guided(NamedTuple):
  """A guided network: its hashable `apply` and the conditions `bind` adds to variables."""
  apply: GuidedApply
  cond: Condition
  null: Optional[Condition] = None

  def bind(self, variables) -> GuidedVariables:
    """The network's variables with this batch's conditions, for `apply`."""
    return GuidedVariables(variables, self.cond, self.null)


def _guided_apply(apply_cond: Callable, scale: float, cycle: bool) -> GuidedApply:
  try:
    hash(apply_cond)
  except TypeError:
    raise ValueError(f"apply_cond must be hashable (a module's apply, a QuantizedApply, a frozen "
                     f"dataclass): it is static in jitted code; got {type(apply_cond).__name__}."
                     ) from None
  return GuidedApply(apply_cond, scale, bool(cycle))


def guided(apply_cond: Callable, cond, null_cond, scale: Optional[float],
           cycle: bool = False) -> Guided:
  """Classifier-free guidance of `apply_cond(variables, x, t, value[, mask])` at `scale`
  (0: unconditional, 1 or None: conditional only, one call on B samples; otherwise one
  call on 2B). `cond` / `null_cond`: Conditions (or value arrays), batch B or 1, or any
  batch with `cycle` (module docstring)."""
  w = check_scale(scale)
  null = None if null_cond is None else as_condition(null_cond)
  if w != 1.0 and null is None:
    raise ValueError(f"guidance scale {w:g} needs a null condition; use `unconditional` for "
                     "a fixed condition without guidance.")
  return Guided(_guided_apply(apply_cond, w, cycle), as_condition(cond), null)


def unconditional(apply_cond: Callable, cond, cycle: bool = False) -> Guided:
  """`apply_cond` at a fixed condition, without guidance: eps(x, t, cond), one call."""
  return Guided(_guided_apply(apply_cond, 1.0, cycle), as_condition(cond), None)


def calibration_batches(traj, coeffs: StepCoeffs, cond, null=None,
                        scale: Optional[float] = None, cycle: bool = False
                        ) -> List[Tuple[Any, ...]]:
  """PTQ batches (x_in, t_i, *cond_args) of the network call the guided apply makes at each
  step of a trajectory (`samplers.sample(..., return_trajectory=True)`), for
  `quant.quantize_model` on the bare conditioned model."""
  cond = as_condition(cond)
  null = None if null is None else as_condition(null)
  out = []
  for i in range(coeffs.num_steps):
    x_in, _, args = network_inputs(traj[i], coeffs.t[i], cond, null, scale, cycle)
    out.append((x_in, int(coeffs.t[i]), *args))
  return out


class ClassGuided(nn.Module):
  """Any class-conditional Flax module `net(x, t, y) -> prediction` (y int32 [B]) as the
  guided (x, t) -> eps_u + w (eps_c - eps_u) network a sampler consumes, one batched call:
  sample i asks for labels[i % len(labels)], the null branch for `null_label` (the label a
  model trained with label dropout reserves for "no class"). Its params are {"net": the
  wrapped module's params}. The main job's factory format: return
  (ClassGuided(my_dit, labels, null_label, w), {"net": params}, schedule, shape), and the
  job guides, calibrates, compensates and scores label accuracy on it (`labels`, `scale`)."""
  net: nn.Module
  labels: Tuple[int, ...]
  null_label: int
  scale: float = 1.0

  def __post_init__(self):
    if not self.labels or any(isinstance(v, bool) or int(v) != v for v in self.labels):
      raise ValueError(f"ClassGuided: labels must be a non-empty tuple of ints, got "
                       f"{self.labels!r}.")
    object.__setattr__(self, "labels", tuple(int(v) for v in self.labels))
    object.__setattr__(self, "scale", check_scale(self.scale))
    super().__post_init__()

  @nn.compact
  def __call__(self, x, t):
    return guide_labels(self.net, x, t, self.labels, self.null_label, self.scale)
