"""A quantized model as one folder on disk: export it once, sample from it later without
the float weights.

    artifact.json   format, the model's description (its model.json record: architecture,
                    config, schedule, guidance; or the factory that builds it), the
                    QuantConfig and every quantized layer's LayerSpec, the sampler, the
                    compensation method, sizes, and a SHA-256 per file below
    variables.npz   {"params": what stays float (biases, norms, embeddings, layers left
                    in float), "quant": per layer the packed integer weights, scales,
                    activation ranges, smoothing scales, low-rank branches, bias
                    corrections}; no float kernel of a quantized layer. One compressed
                    file (`array_file.save_arrays`): orbax's per-leaf metadata would be larger
                    than a 4-bit model's weights. Integer column sums are not stored
                    but recomputed (exactly) at load.
    correction/     the fitted CorrectionParams (compensation.io.save_params)

    path = artifact.export("runs/w4a8", model, qm, sampler_spec, calibration)
    art = artifact.load("runs/w4a8")               # reads no float checkpoint
    x0 = art.sample(x_T, key, mode="int")           # compensated, integer kernels

The folder is written as a whole (`files.staged_directory`): an interrupted export leaves
the previous one. `load` verifies every checksum before orbax reads a byte, so a truncated
or damaged artifact fails with one error naming the file. Samples from a loaded artifact
equal the in-memory quantized model's bit for bit (`tests/test_artifact.py`).

A checkpoint model (shipped, trained or imported) is rebuilt from its recorded config; a
factory model ("package.module:function") by calling the factory again for its module
and schedule (its params are dropped, so whatever the factory itself reads is read).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
from flax import traverse_util

from tac_jax import array_file, compensation, files, quant
from tac_jax.app import stages
from tac_jax.app.settings import SamplerSpec
from tac_jax.compensation import io as params_io
from tac_jax.diffusion import samplers
from tac_jax.models import checkpoint as ckpt_lib
from tac_jax.quant import core, int_ops
from tac_jax.quant.spec import QUANT_COLLECTION as QUANT
from tac_jax.quant.spec import LayerSpec

ARTIFACT_JSON = "artifact.json"
FORMAT = "tac_jax.quantized/1"
VARIABLES, CORRECTION = "variables.npz", "correction"
DERIVED = "w_sum"   # per-layer integer column sums: recomputed from w at load
# model.json entries that describe files, not the model (the artifact has its own).
_FILE_FIELDS = ("checksums", "param_shapes")


def sample(qm: quant.QuantizedModel, sampler: samplers.Sampler, cal: compensation.Calibration,
           x_T, key, mode: str = "int") -> jax.Array:
  """Final samples of the quantized model `qm` (fake-quant or integer kernels) with the
  fitted compensation `cal` applied online (compiles on each call; `Artifact.sample`
  keeps its program)."""
  run = stages.final_sampler_run(qm.apply_fn(mode), sampler, cal.method)
  return run(qm.variables, cal.params, x_T, key)


@dataclasses.dataclass(frozen=True, eq=False)
class Artifact:
  """A loaded artifact: the quantized model, its sampler and fitted compensation."""
  qmodel: quant.QuantizedModel
  sampler: samplers.Sampler
  calibration: compensation.Calibration
  shape: Tuple[int, int, int]
  labels: Optional[Tuple[int, ...]]
  record: Dict[str, Any]

  def apply_fn(self, mode: str = "int"):
    """The quantized network `apply(variables, x, t)` (variables: `self.qmodel.variables`)."""
    return self.qmodel.apply_fn(mode)

  def compensated_sampler(self, mode: str = "int") -> samplers.Sampler:
    """The sampler with the fitted correction applied at each step (for `samplers.sample`)."""
    return compensation.online_sampler(self.calibration.method, self.sampler,
                                       self.calibration.params,
                                       compensation.Net(self.apply_fn(mode), self.qmodel.variables))

  def sample(self, x_T, key, mode: str = "int") -> jax.Array:
    """x_0 from noise x_T [B, H, W, C] (a class-conditional model: sample i asks for
    labels[i % len(labels)])."""
    if np.ndim(x_T) != 4 or tuple(np.shape(x_T)[1:]) != tuple(self.shape):
      raise ValueError(f"x_T must be [B, {', '.join(map(str, self.shape))}] for this artifact, "
                       f"got shape {list(np.shape(x_T))}.")
    if mode not in self._runs:   # one compiled program per mode, kept
      self._runs[mode] = stages.final_sampler_run(self.apply_fn(mode), self.sampler,
                                                  self.calibration.method)
    return self._runs[mode](self.qmodel.variables, self.calibration.params, x_T, key)

  @functools.cached_property
  def _runs(self) -> Dict[str, Any]:
    return {}


def _model_record(model: stages.Model) -> Dict[str, Any]:
  if "factory" in model.meta:
    return {"factory": model.meta["factory"]}
  meta = {k: v for k, v in model.meta.items() if k not in _FILE_FIELDS}
  return {"checkpoint_meta": meta, "checkpoint": model.checkpoint,
          "labels": None if model.labels is None else list(model.labels),
          "guidance_scale": model.guidance_scale}


def _dir_bytes(directory: str) -> int:
  return sum(os.path.getsize(os.path.join(r, n)) for r, _, names in os.walk(directory)
             for n in names)


def float_checkpoint_bytes(model: stages.Model) -> Optional[int]:
  """Bytes on disk of the float checkpoint's params/ (None for a factory model)."""
  path = os.path.join(model.checkpoint, files.PARAMS_DIR)
  return _dir_bytes(path) if "factory" not in model.meta and os.path.isdir(path) else None


def export(directory: str, model: stages.Model, qm: quant.QuantizedModel, sampler: SamplerSpec,
           cal: compensation.Calibration,
           built: Optional[samplers.Sampler] = None) -> Dict[str, Any]:
  """Writes the artifact folder `directory` (replacing a previous artifact there only once
  the new one is complete) and returns its record, with "bytes": the folder's size on disk
  (next to "float_checkpoint_bytes", the float params' on disk). `built`: the sampler the
  compensation was fitted on, needed when `sampler.linearise` (its derived coefficients
  came from the float model, so they are stored)."""
  if sampler.linearise and built is None:
    raise ValueError("export: the sampler is linearised; pass the linearised sampler the "
                     "compensation was fitted with (its coefficients come from the float model).")
  record: Dict[str, Any] = {
      "format": FORMAT, "model": _model_record(model), "shape": list(model.shape),
      "quant": {"config": dataclasses.asdict(qm.config),
                "specs": {p: dataclasses.asdict(s) for p, s in sorted(qm.specs.items())},
                "num_timesteps": qm.num_timesteps, "float_reasons": dict(qm.float_reasons)},
      "sampler": dataclasses.asdict(sampler), "method": cal.method}
  if sampler.linearise:
    c = built.coeffs
    record["sampler_coeffs"] = {"a": np.asarray(c.a).tolist(), "b": np.asarray(c.b).tolist()}
  with files.staged_directory(directory, ARTIFACT_JSON, "quantized artifact") as tmp:
    array_file.save_arrays(os.path.join(tmp, VARIABLES), _stored(qm.variables))
    params_io.save_params(os.path.join(tmp, CORRECTION), cal.params, {"method": cal.method})
    record["checksums"] = files.tree_checksums(tmp)
    record["float_checkpoint_bytes"] = float_checkpoint_bytes(model)
    files.write_json_atomic(os.path.join(tmp, ARTIFACT_JSON), record)
  return {**record, "bytes": _dir_bytes(directory)}


def _stored(variables):
  """The variables without what `_derive` recomputes."""
  layers = traverse_util.flatten_dict(variables[QUANT], sep="/", is_leaf=_is_layer)
  q = {p: {n: a for n, a in layer.items() if n != DERIVED} for p, layer in layers.items()}
  return {**variables, QUANT: traverse_util.unflatten_dict(q, sep="/")}


def _is_layer(_, node) -> bool:
  return isinstance(node, dict) and "w_scale" in node


def _derive(variables, specs: Dict[str, LayerSpec], where: str):
  """The stored variables with each per-channel layer's integer column sums put back."""
  if set(variables) != {"params", QUANT}:
    raise ValueError(f"corrupt {where}: variables hold {sorted(variables)}, not params and "
                     f"{QUANT}; re-export it.")
  flat = traverse_util.flatten_dict(variables[QUANT], sep="/", is_leaf=_is_layer)
  missing = sorted(p for p, s in specs.items() if s.weighted and p not in flat)
  unknown = sorted(set(flat) - set(specs))
  if missing or unknown:
    raise ValueError(f"corrupt {where}: the quantized weights and the recorded layers differ "
                     f"(first {(missing + unknown)[0]}); re-export it.")
  per_channel = {p: layer["w"] for p, layer in flat.items() if not specs[p].group_size}

  @jax.jit   # one program for every layer (eager ops would compile once per shape)
  def sums(ws):
    return {p: int_ops.weight_sums(core.unpack_int4(w, specs[p].out_features)
                                   if specs[p].packed else w) for p, w in ws.items()}
  for path, s in sums(per_channel).items():
    flat[path][DERIVED] = np.asarray(s)
  return {**variables, QUANT: traverse_util.unflatten_dict(flat, sep="/")}


def _rebuild_model(record: Dict[str, Any], where: str) -> stages.Model:
  """The stages.Model of the recorded model, params absent (None)."""
  m = record["model"]
  if "factory" in m:
    return dataclasses.replace(stages.model_from_factory(m["factory"]), params=None)
  meta = m["checkpoint_meta"]
  module, _ = ckpt_lib.build_module(meta, where, abstract=False)
  labels = None if m.get("labels") is None else tuple(m["labels"])
  return stages.checkpoint_model(module, None, meta, m.get("checkpoint", where),
                                 m.get("guidance_scale"), labels)


def load(directory: str) -> Artifact:
  """The artifact at `directory`: checksums verified, no float weights read."""
  directory = os.path.abspath(directory)
  where = f"quantized artifact {directory}"
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no quantized artifact at {directory}: the folder does not exist; "
                            "write one with the main job's --config.export=<folder>.")
  record = files.read_json(os.path.join(directory, ARTIFACT_JSON), "quantized artifact")
  if record.get("format") != FORMAT:
    raise ValueError(f"{where}: format {record.get('format')!r}, this version of tac_jax reads "
                     f"{FORMAT!r}; re-export it.")
  files.verify_checksums(directory, record.get("checksums", {}), where)
  try:
    q = record["quant"]
    config = quant.QuantConfig.from_dict(q["config"])
    specs = {p: LayerSpec(**s) for p, s in q["specs"].items()}
    spec = SamplerSpec(**record["sampler"])
    model = _rebuild_model(record, where)
  except (KeyError, TypeError) as e:
    raise ValueError(f"corrupt {where}: {ARTIFACT_JSON} lacks or mangles {e}; "
                     "re-export it.") from None
  stored = array_file.load_arrays(os.path.join(directory, VARIABLES), where)
  variables = _derive(stored, specs, where)
  sampler = spec.build(model.schedule)
  if "sampler_coeffs" in record:
    c = record["sampler_coeffs"]
    sampler = sampler._replace(coeffs=sampler.coeffs._replace(
        a=np.asarray(c["a"], np.float32), b=np.asarray(c["b"], np.float32)))
  params = params_io.load_params(os.path.join(directory, CORRECTION), sampler, model.channels)
  qm = quant.QuantizedModel(module=model.module, variables=variables, specs=specs, config=config,
                            num_timesteps=int(q["num_timesteps"]),
                            float_reasons=dict(q.get("float_reasons", {})))
  return Artifact(qm, sampler, compensation.Calibration(record["method"], params, 0.0),
                  model.shape, model.labels, record)
