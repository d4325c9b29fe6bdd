"""PTQ driver: float model + calibration inputs -> `QuantizedModel`.

1. List the Dense/DenseGeneral/Conv layers the model calls and pick those the config selects.
2. Quantize their weights once (per output channel, symmetric).
3. Run the float model over calibration inputs (x, t), recording per-layer input
   statistics, grouped by timestep when `config.time_groups > 1`. A conditioned model
   takes batches (x, t, *cond), called as `module.apply(v, x, t, *cond)`: for a
   classifier-free-guided one, x and t twice and cond = concat([cond, null]), the one
   batched call the sampler makes (`diffusion.guidance.calibration_batches`).
4. Fit activation ranges with the configured observer.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Dict, Iterable, List, Mapping, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from tac_jax.host import to_host
from tac_jax.quant import act_stats
from tac_jax.quant.calibration_data import check_calibration as _check_calibration
from tac_jax.quant import core
from tac_jax.quant import groupwise
from tac_jax.quant import int_ops
from tac_jax.quant import observers
from tac_jax.quant.inject import error_interceptor, observing_interceptor, quantizing_interceptor
from tac_jax.quant.spec import (FLOAT_REASONS, MODES, QUANT_COLLECTION, STATS_COLLECTION, LayerSpec,
                                QuantConfig, list_layers, select_layers, time_group, unsupported)

Params = Dict[str, Any]
LOW_RANK_CAP = 8
# (x, t) or (x, t, *cond): t a scalar timestep (or None), cond the model's further
# positional inputs (class labels, caption embeddings and mask), one row per sample.
CalibBatch = Tuple[Any, ...]


def _timesteps(t, batch: int) -> jax.Array:
  """A calibration timestep as the samplers pass it: [B] int32 (DDPM family) or float32 (flow)."""
  t = jnp.asarray(t)
  dtype = jnp.int32 if jnp.issubdtype(t.dtype, jnp.integer) else jnp.float32
  return jnp.broadcast_to(t.astype(dtype), (batch,))


def _call(module, variables, x, t, *cond, **kw):
  """The model on one calibration batch (x, t, *cond); t None: the model takes no time."""
  args = (x,) if t is None else (x, _timesteps(t, x.shape[0]))
  return module.apply(variables, *args, *cond, **kw)


def _groupwise_weight(kernel: jax.Array, spec: LayerSpec, smooth) -> Dict[str, jax.Array]:
  """Group-wise integer weights of W' = diag(s) W - L1 L2, with s and L1, L2 kept."""
  w = groupwise.conv_matrix(kernel) if kernel.ndim == 4 else kernel
  out: Dict[str, jax.Array] = {}
  if smooth is not None:
    w = w * smooth[groupwise.channel_of_row(kernel.shape)][:, None]
    out["smooth"] = smooth.astype(jnp.float32)
  if spec.low_rank:
    out["lora_a"], out["lora_b"], w = groupwise.low_rank_split(w, spec.low_rank)
  wq, w_scale = groupwise.quantize_weight_groups(w, spec.w_bits, spec.group_size)
  out["w"] = core.pack_int4(wq) if spec.packed else wq
  out["w_scale"] = w_scale
  return out


def quantize_weight(kernel: jax.Array, spec: LayerSpec, config: QuantConfig,
                    smooth=None) -> Dict[str, jax.Array]:
  """Integer weights and scales for one layer: per output channel (with integer column
  sums for the activation zero point), or group-wise (`spec.group_size`)."""
  if spec.group_size:
    return _groupwise_weight(kernel, spec, smooth)
  axis = kernel.ndim - 1 if config.w_per_channel else None
  observer = observers.get_observer(config.w_observer)
  qp = observer(kernel, spec.w_bits, axis, True)
  wq = core.quantize(kernel, qp)
  out = kernel.shape[-1]
  w_scale = jnp.broadcast_to(jnp.reshape(qp.scale, (-1,)), (out,)) if qp.axis is None \
      else jnp.reshape(qp.scale, (out,))
  return {
      "w": core.pack_int4(wq) if spec.packed else wq,
      "w_scale": w_scale.astype(jnp.float32),
      "w_sum": int_ops.weight_sums(wq),
  }


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedModel:
  """A quantized model: module, variables ({'params', 'quant'}) and static layer specs."""
  module: nn.Module
  variables: Params
  specs: Mapping[str, LayerSpec]
  config: QuantConfig
  num_timesteps: int
  float_reasons: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def apply_fn(self, mode: str = "fake") -> Callable:
    """Pure `apply(variables, x, t, *cond)` for `mode` in {'fake', 'int'}.

    Models with the same module, layer specs and activation handling get equal (and
    equally hashing) functions whatever their observers, so jitted code that takes the
    function as a static argument compiles once for all of them.
    """
    if mode not in MODES:
      raise ValueError(f"unknown quantization mode {mode!r}; choose from {MODES}.")
    c = self.config
    return QuantizedApply(self.module, tuple(sorted(self.specs.items())), c.a_dynamic,
                          c.time_groups, self.num_timesteps, mode)

  @property
  def float_layers(self) -> Dict[str, str]:
    """Layers with a kernel that stay in float, and why (FLOAT_REASONS)."""
    flat = traverse_util.flatten_dict(self.variables["params"], sep="/")
    out = {p: why for p, why in self.float_reasons.items() if p not in self.specs}
    for key in flat:
      path, _, leaf = key.rpartition("/")
      if leaf == "kernel" and path not in self.specs:
        out[path] = self.float_reasons.get(path, FLOAT_REASONS["type"])
    return out

  def __call__(self, x, t=None, *cond, mode: str = "fake"):
    return _jitted_apply(self.apply_fn(mode), self.variables, x, t, cond)

  def memory_report(self, float_params: Params) -> Dict[str, int]:
    """Bytes of the float model vs this model, and of the quantized layers alone."""
    flat_float = traverse_util.flatten_dict(float_params, sep="/")
    weighted = [p for p, spec in self.specs.items() if spec.weighted]
    w_float = sum(core.storage_bytes(flat_float[f"{p}/kernel"]) for p in weighted)
    flat_q = traverse_util.flatten_dict(self.variables[QUANT_COLLECTION], sep="/")
    w_int = sum(core.storage_bytes(flat_q[f"{p}/w"]) for p in weighted)
    w_int8 = sum(core.storage_bytes(flat_float[f"{p}/kernel"]) // 4 for p in weighted)
    per_layer = lambda names: sum(core.storage_bytes(flat_q[f"{p}/{n}"]) for p in weighted
                                  for n in names if f"{p}/{n}" in flat_q)
    return {
        "model_float32": sum(core.storage_bytes(v) for v in flat_float.values()),
        "model_quantized": sum(core.storage_bytes(v) for v in jax.tree.leaves(self.variables)),
        "layers_float32": w_float,
        "layers_int8": w_int8,
        "layers_stored": w_int,
        # scales, zero points, column sums, smoothing scales, bias corrections
        "layers_overhead": per_layer(("w_scale", "w_sum", "a_scale", "a_zero", "smooth",
                                      "bias_corr")),
        "low_rank_float32": per_layer(("lora_a", "lora_b")),
    }


@dataclasses.dataclass(frozen=True)
class QuantizedApply:
  """The quantized network as a pure `apply(variables, x, t, *cond)` (cond: a conditioned
  model's further inputs, as in its calibration batches): a frozen dataclass of static
  values, hashable and compared by value, so `jax.jit` code that takes it as a static
  argument compiles once per (module, layer specs, activation handling, mode)."""
  module: nn.Module
  specs: Tuple[Tuple[str, LayerSpec], ...]
  a_dynamic: bool
  time_groups: int
  num_timesteps: int
  mode: str

  def __call__(self, variables, x, t=None, *cond):
    group = 0 if t is None else time_group(t, self.num_timesteps, self.time_groups)
    # The interceptor only reads a_dynamic from the config; bits come from the specs.
    config = QuantConfig(a_dynamic=self.a_dynamic, time_groups=self.time_groups)
    with nn.intercept_methods(quantizing_interceptor(dict(self.specs), config, self.mode, group)):
      return _call(self.module, variables, x, t, *cond)


@functools.partial(jax.jit, static_argnums=0)
def _jitted_apply(fn: QuantizedApply, variables, x, t, cond):
  return fn(variables, x, t, *cond)


def collect_activation_stats(module: nn.Module, params: Params, calib: Sequence[CalibBatch],
                             config: QuantConfig, num_timesteps: int
                             ) -> Dict[str, List[List[act_stats.Record]]]:
  """Per layer and timestep group: the calibration calls' input records."""
  return _collect_activation_stats(module, params, _check_calibration(calib, num_timesteps),
                                   config, num_timesteps)[0]


def _collect_activation_stats(module, params, calib: List[CalibBatch], config: QuantConfig,
                              num_timesteps: int):
  """`collect_activation_stats` on already validated calibration batches, and each
  layer's per-input-channel max |x| over all of them."""

  @jax.jit
  def observe(params, x, t, cond):
    with nn.intercept_methods(observing_interceptor(config.sample_size)):
      _, state = _call(module, {"params": params}, x, t, *cond, mutable=[STATS_COLLECTION])
    return state[STATS_COLLECTION]

  stats: Dict[str, List[List[act_stats.Record]]] = {}
  channel_absmax: Dict[str, np.ndarray] = {}
  for x, t, *cond in calib:
    g = 0 if t is None else int(time_group(t, num_timesteps, config.time_groups))
    rec = jax.tree.map(to_host, observe(params, x, t, tuple(cond)))
    flat = traverse_util.flatten_dict(rec, is_leaf=lambda k, v: isinstance(v, tuple))
    for key, calls in flat.items():
      path = "/".join(key[:-1])
      groups = stats.setdefault(path, [[] for _ in range(config.time_groups)])
      for call in calls:
        rec = act_stats.Record(*(np.asarray(v) for v in call))
        groups[g].append(rec)
        channel_absmax[path] = np.maximum(channel_absmax.get(path, 0.0),
                                          np.maximum(-rec.cmin, rec.cmax))
  return stats, channel_absmax


@functools.partial(jax.jit, static_argnames=("name", "bits", "symmetric", "p"))
def _fit_range(data, name: str, bits: int, symmetric: bool, p: float):
  kw = {"p": p} if name == "percentile" else {}
  qp = observers.get_observer(name)(data, bits, None, symmetric, **kw)
  return jnp.reshape(qp.scale, ()), jnp.reshape(qp.zero_point, ())


def fit_activation_ranges(stats, specs: Mapping[str, LayerSpec], config: QuantConfig):
  """Static activation ranges per layer and timestep group ([G], or [G, 2] for a split
  layer) with the configured observer; a group without calls uses all of them."""
  ranges = {}
  for path, spec in specs.items():
    if not spec.weighted:    # a matmul: both operands quantized at run time
      continue
    if path not in stats:
      raise ValueError(f"layer {path} recorded no activations during calibration.")
    groups = stats[path]
    everything = [r for g in groups for r in g]
    n = everything[0].cmin.shape[0]
    parts = ((0, spec.split), (spec.split, n)) if spec.split else ((0, n),)
    part_data = lambda records, lo, hi: np.concatenate([act_stats.part_data(r, lo, hi)
                                                        for r in records])
    overall = {part: part_data(everything, *part) for part in parts}
    for data in overall.values():
      observers.check_calibration_data(data, f"activations of layer {path}")
    scales, zeros = [], []
    for g in groups:   # one group (the default) is all calls: reuse their data
      fits = [_fit_range(jnp.asarray(overall[part] if len(g) in (0, len(everything))
                                     else part_data(g, *part)),
                         config.a_observer, spec.a_bits, spec.a_symmetric, config.percentile)
              for part in parts]
      scales.append(jnp.stack([f[0] for f in fits]))
      zeros.append(jnp.stack([f[1] for f in fits]))
    shape = (len(groups), 2) if spec.split else (len(groups),)
    ranges[path] = {"a_scale": jnp.stack(scales).reshape(shape).astype(jnp.float32),
                    "a_zero": jnp.stack(zeros).reshape(shape).astype(jnp.int32)}
  return ranges


def split_specs(specs: Mapping[str, LayerSpec], stats, config: QuantConfig
                ) -> Dict[str, LayerSpec]:
  """The specs with `split` set on the layers `config.split_layers` names (static ranges
  only), the boundary chosen from their calibration ranges (act_stats.choose_split)."""
  pattern = re.compile(config.split_layers)
  out = dict(specs)
  for path, spec in specs.items():
    if pattern.search(path) and spec.weighted and not spec.group_size and not config.a_dynamic:
      records = [r for g in stats[path] for r in g]
      out[path] = dataclasses.replace(spec, split=act_stats.choose_split(
          *act_stats.channel_range(records)))
  return out


def _bias_corrections(module, variables, specs, config: QuantConfig, calib,
                      num_timesteps: int) -> Dict[str, jax.Array]:
  """Per quantized layer: its mean output error per output channel over the calibration
  batches, each layer fed the float model's own activations."""

  @jax.jit
  def errors(variables, x, t, cond):
    group = 0 if t is None else time_group(t, num_timesteps, config.time_groups)
    with nn.intercept_methods(error_interceptor(specs, config, group)):
      _, state = _call(module, variables, x, t, *cond, mutable=[STATS_COLLECTION])
    return state[STATS_COLLECTION]

  sums: Dict[str, Any] = {}
  for x, t, *cond in calib:
    flat = traverse_util.flatten_dict(errors(variables, x, t, tuple(cond)),
                                      is_leaf=lambda k, v: isinstance(v, tuple))
    for key, calls in flat.items():
      path = "/".join(key[:-1])
      n, total = sums.get(path, (0, 0.0))
      sums[path] = (n + len(calls), total + sum(calls))
  return {path: (total / n).astype(jnp.float32) for path, (n, total) in sums.items()}


def _layer_specs(module, params, calib, config: QuantConfig):
  """The selected layers' specs (output width and low-rank cap filled in) and kernels."""
  x0, t0, *cond = calib[0]
  args = (x0,) if t0 is None else (x0, _timesteps(t0, x0.shape[0]))
  general: Dict[str, Tuple[int, Tuple[int, ...]]] = {}   # DenseGeneral: (in_axes, features)
  layers = list_layers(module, {"params": params}, *args, *cond, general=general)
  specs = select_layers(layers, config)
  specs.update({p: dataclasses.replace(specs[p], in_axes=general[p][0], features=general[p][1])
                for p in set(general) & set(specs)})
  excluded = {p: FLOAT_REASONS[unsupported(layers[p], config) or "config"] for p in layers
              if p not in specs}
  if not specs:
    raise ValueError(f"QuantConfig selects none of the model's layers {sorted(layers)}; "
                     "check include/exclude.")
  flat = traverse_util.flatten_dict(params, sep="/")
  # A DenseGeneral's kernel [*in, *features] as the 2-D matrix it multiplies by.
  kernels = {path: (flat[f"{path}/kernel"].reshape(-1, int(np.prod(s.features))) if s.features
                    else flat[f"{path}/kernel"]) for path, s in specs.items() if s.weighted}
  for path, kernel in kernels.items():
    observers.check_calibration_data(kernel, f"weight of layer {path}")
    k, n = int(np.prod(kernel.shape[:-1])), int(kernel.shape[-1])
    # The float branch stays small next to the layer: rank <= min(K, N) / LOW_RANK_CAP.
    specs[path] = dataclasses.replace(
        specs[path], out_features=n, low_rank=min(config.low_rank, min(k, n) // LOW_RANK_CAP),
        group_size=groupwise.fit_group(k, config.group_size) if config.group_size else 0)
  return specs, kernels, flat, excluded


def quantize_model(module: nn.Module, params: Params, calib: Iterable[CalibBatch],
                   config: QuantConfig, num_timesteps: int = 1000) -> QuantizedModel:
  """Post-training quantization of `module` (called as `module.apply(v, x, t, *cond)`).

  Args:
    module: a Flax Linen module; its Dense/Conv layers are quantized by interception.
    params: the float `params` collection.
    calib: (x, t) calibration batches, t a scalar timestep (None for models without t),
      or, for a conditioned model, (x, t, *cond) batches: cond its further positional
      inputs (e.g. labels [B], or caption embeddings [B, L, D] and a mask [B, L]), the
      same kind in every batch. `apply_fn(mode)` then takes them too.
    config: what to quantize (bits, observers, ranges per timestep group, or the
      group-wise / SmoothQuant / low-rank / bias-correction options).
    num_timesteps: the diffusion T, used to map t to its activation-range group.
  Returns:
    A QuantizedModel: `apply_fn("fake" | "int")`, `variables`, `memory_report`.
  """
  calib = _check_calibration(calib, num_timesteps)
  specs, kernels, flat, excluded = _layer_specs(module, params, calib, config)
  static = not config.a_dynamic and not config.group_size
  if static or config.smooth_alpha:
    stats, channel_absmax = _collect_activation_stats(module, params, calib, config,
                                                      num_timesteps)
  smooth = ({p: groupwise.smooth_scales(jnp.asarray(channel_absmax[p]), kernels[p],
                                        config.smooth_alpha) for p in kernels}
            if config.smooth_alpha else {})
  # One compiled program for all layers (eager per-layer ops would compile per shape).
  quant: Dict[str, Any] = jax.jit(
      lambda ks, sm: {p: quantize_weight(k, specs[p], config, sm.get(p))
                      for p, k in ks.items()})(kernels, smooth)
  if static:
    specs = split_specs(specs, stats, config)
    for path, r in fit_activation_ranges(stats, specs, config).items():
      quant[path].update(r)
  variables = {"params": params, QUANT_COLLECTION: _unflatten(quant)}
  if config.bias_correction:
    for path, c in _bias_corrections(module, variables, specs, config, calib,
                                     num_timesteps).items():
      quant[path]["bias_corr"] = c
  kept = {k: v for k, v in flat.items() if k.rsplit("/", 1)[0] not in specs
          or not k.endswith("/kernel")}
  variables = {"params": traverse_util.unflatten_dict(kept, sep="/"),
               QUANT_COLLECTION: _unflatten(quant)}
  return QuantizedModel(module=module, variables=variables, specs=specs, config=config,
                        num_timesteps=num_timesteps, float_reasons=excluded)


def _unflatten(quant: Dict[str, Dict[str, Any]]):
  return traverse_util.unflatten_dict({f"{p}/{n}": a for p, d in quant.items()
                                       for n, a in d.items()}, sep="/")
