"""Import (and export) diffusers `UNet2DModel` checkpoints into the Flax UNet.

A diffusers model directory (`save_pretrained` layout, optionally under `unet/`) holds
`config.json` and `diffusion_pytorch_model.safetensors` (or `.bin`, a pickled PyTorch
state dict). The Flax UNet uses diffusers' module names, so the mapping is mechanical:

    down_blocks.0.resnets.1.conv1.weight  ->  down_blocks_0/resnets_1/conv1/kernel
    conv:   [O, I, kh, kw]  ->  [kh, kw, I, O]     linear: [O, I] -> [I, O]
    norm:   weight / bias   ->  scale / bias

Legacy attention names (`query`, `key`, `value`, `proj_attn`, as in the original DDPM
CIFAR-10 release) are renamed to `to_q`, `to_k`, `to_v`, `to_out.0`, as diffusers does.
Safetensors files are read and written here directly (JSON header + raw little-endian
buffers), so importing a safetensors checkpoint needs neither torch nor safetensors;
`.bin` files need torch.

    module, params, meta = import_diffusers("path/to/ddpm-cifar10-32")
    export_checkpoint("path/to/ddpm-cifar10-32", "runs/cifar10_model")   # a tac_jax model dir
    python experiments/quantize.py --config.checkpoint=runs/cifar10_model
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from tac_jax import files
from tac_jax.diffusion.schedules import make_schedule
from tac_jax.models import checkpoint
from tac_jax.models import torch_weights
from tac_jax.models.unet import UNet, UNetConfig
from tac_jax.validate import is_integer

CONFIG_NAME = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear",   # diffusers -> ours
                  "squaredcos_cap_v2": "cosine"}
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                 "model.safetensors", "pytorch_model.bin")
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

# ----------------------------------------------------------------------------- safetensors

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
              "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def load_safetensors(path: str) -> Dict[str, np.ndarray]:
  """Reads a .safetensors file into numpy arrays (any of F64/F32/F16/BF16/int types)."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise ValueError(f"corrupt safetensors file {path}: shorter than its 8-byte header size.")
    (n,) = struct.unpack("<Q", raw)
    if n > size - 8:
      raise ValueError(f"corrupt safetensors file {path}: header of {n} bytes does not fit in "
                       f"the {size}-byte file (truncated download?).")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"corrupt safetensors file {path}: header is not JSON ({e}).") from None
    data = f.read()
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info.get("dtype") not in _ST_DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}.")
    start, end = info["data_offsets"]
    dtype = np.dtype(_ST_DTYPES[info["dtype"]])
    shape = tuple(info["shape"])
    if end > len(data) or end - start != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
      raise ValueError(f"corrupt safetensors file {path}: tensor {name!r} does not fit its "
                       f"byte range {start}..{end} (file truncated?).")
    out[name] = np.frombuffer(data[start:end], dtype=dtype.newbyteorder("<")).reshape(shape).copy()
  return out


def save_safetensors(path: str, tensors: Mapping[str, np.ndarray],
                     metadata: Optional[Mapping[str, str]] = None) -> None:
  """Writes numpy arrays as a .safetensors file (atomically: temp file, then rename)."""
  header: Dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
  blobs, offset = [], 0
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    if a.dtype not in _ST_NAMES:
      raise ValueError(f"tensor {name!r} has dtype {a.dtype}, which safetensors cannot store.")
    b = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
    header[name] = {"dtype": _ST_NAMES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + len(b)]}
    blobs.append(b)
    offset += len(b)
  head = json.dumps(header, separators=(",", ":")).encode()
  head += b" " * (-len(head) % 8)  # the format pads the header to 8 bytes
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(head)))
    f.write(head)
    for b in blobs:
      f.write(b)
  os.replace(tmp, path)


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
  """A state dict from a .safetensors file or a PyTorch .bin/.pt/.pth file (needs torch)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no checkpoint file at {path}.")
  if path.endswith(".safetensors"):
    return load_safetensors(path)
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError(f"reading the PyTorch file {path} needs torch: pip install -e '.[torch]' "
                      "(CPU build), or convert it to .safetensors.") from None
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise ValueError(f"could not read the PyTorch state dict {path}: {type(e).__name__}: {e}") from e
  if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
    sd = sd["state_dict"]
  if not isinstance(sd, dict):
    raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict.")
  return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in sd.items()}


# ----------------------------------------------------------------------------- config

def config_from_diffusers(cfg: Mapping[str, Any]) -> UNetConfig:
  """Translates a diffusers `UNet2DModel` config.json into a UNetConfig, refusing options
  the Flax UNet does not implement (naming each one)."""
  cls = cfg.get("_class_name", "UNet2DModel")
  if cls != "UNet2DModel":
    raise ValueError(f"only diffusers UNet2DModel checkpoints can be imported, got {cls!r}.")
  down = list(cfg.get("down_block_types", ()))
  up = list(cfg.get("up_block_types", ()))
  channels = list(cfg.get("block_out_channels", ()))
  if not down or len(down) != len(up) or len(down) != len(channels):
    raise ValueError(f"config needs matching down_block_types, up_block_types and "
                     f"block_out_channels, got {down}, {up}, {channels}.")
  unsupported = {
      "act_fn": ("silu",), "time_embedding_type": ("positional",),
      "center_input_sample": (False,), "mid_block_scale_factor": (1, 1.0),
      "resnet_time_scale_shift": ("default",), "class_embed_type": (None,),
      "num_class_embeds": (None,), "downsample_type": ("conv",), "upsample_type": ("conv",),
      "time_embedding_dim": (None, 4 * channels[0]), "mid_block_type": ("UNetMidBlock2D",),
      "attn_norm_num_groups": (None, cfg.get("norm_num_groups", 32)),
  }
  bad = [f"{k}={cfg[k]!r} (supported: {v})" for k, v in unsupported.items()
         if k in cfg and cfg[k] not in v]
  allowed_down = {"DownBlock2D": False, "AttnDownBlock2D": True}
  allowed_up = {"UpBlock2D": False, "AttnUpBlock2D": True}
  bad += [f"down block {b!r}" for b in down if b not in allowed_down]
  bad += [f"up block {b!r}" for b in up if b not in allowed_up]
  if bad:
    raise ValueError("unsupported UNet2DModel options: " + "; ".join(bad) + ".")
  attn_down = [allowed_down[b] for b in down]
  attn_up = [allowed_up[b] for b in up][::-1]
  if attn_down != attn_up:
    raise ValueError(f"up_block_types {up} must mirror down_block_types {down} (attention at "
                     "the same resolutions); other layouts are not supported.")
  sample_size = cfg.get("sample_size", 32)
  if isinstance(sample_size, (list, tuple)):
    if len(set(sample_size)) != 1:
      raise ValueError(f"only square samples are supported, got sample_size={sample_size}.")
    sample_size = sample_size[0]
  return UNetConfig(
      sample_size=int(sample_size), in_channels=int(cfg.get("in_channels", 3)),
      out_channels=int(cfg.get("out_channels", 3)), block_out_channels=tuple(channels),
      layers_per_block=int(cfg.get("layers_per_block", 2)),
      attention_levels=tuple(i for i, a in enumerate(attn_down) if a),
      attention_head_dim=cfg.get("attention_head_dim", 8),
      norm_num_groups=int(cfg.get("norm_num_groups", 32)),
      norm_eps=float(cfg.get("norm_eps", 1e-5)),
      mid_attention=bool(cfg.get("add_attention", True)),
      flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
      freq_shift=float(cfg.get("freq_shift", 0)),
      downsample_padding=int(cfg.get("downsample_padding", 1)))


def config_to_diffusers(config: UNetConfig) -> Dict[str, Any]:
  """The diffusers `UNet2DModel` config of a UNetConfig (for export)."""
  n = len(config.block_out_channels)
  attn = [i in config.attention_levels for i in range(n)]
  return {
      "_class_name": "UNet2DModel", "sample_size": config.sample_size,
      "in_channels": config.in_channels, "out_channels": config.out_channels,
      "block_out_channels": list(config.block_out_channels),
      "layers_per_block": config.layers_per_block,
      "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
      "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1]],
      "attention_head_dim": config.attention_head_dim, "norm_num_groups": config.norm_num_groups,
      "norm_eps": config.norm_eps, "add_attention": config.mid_attention,
      "flip_sin_to_cos": config.flip_sin_to_cos, "freq_shift": config.freq_shift,
      "downsample_padding": config.downsample_padding, "act_fn": "silu",
      "time_embedding_type": "positional", "center_input_sample": False,
      "mid_block_scale_factor": 1, "resnet_time_scale_shift": "default",
  }


# ----------------------------------------------------------------------------- weights

def abstract_params(config: UNetConfig):
  """Shapes of the Flax UNet's params for `config`, without running init."""
  x = jnp.zeros((1, config.sample_size, config.sample_size, config.in_channels))
  return jax.eval_shape(UNet(config).init, jax.random.key(0), x,
                        jnp.zeros((1,), jnp.int32))["params"]


def load_weights(path: str) -> Dict[str, np.ndarray]:
  """A state dict from one weights file (`load_state_dict`) or a sharded-safetensors
  index (`*.index.json`: every shard it names, next to it)."""
  if not path.endswith(".index.json"):
    return load_state_dict(path)
  with open(path) as f:
    shards = sorted(set(json.load(f)["weight_map"].values()))
  out: Dict[str, np.ndarray] = {}
  for shard in shards:
    out.update(load_state_dict(os.path.join(os.path.dirname(path), shard)))
  return out


def flax_path(torch_key: str) -> Tuple[str, ...]:
  """`down_blocks.0.attentions.1.query.weight` -> (down_blocks_0, attentions_1, to_q, weight)."""
  parts = list(torch_weights.default_path(torch_key))
  if len(parts) >= 2 and parts[-2] in LEGACY_ATTENTION:
    parts[-2] = LEGACY_ATTENTION[parts[-2]].replace(".", "_")
  return tuple(parts)


def convert_state_dict(state_dict: Mapping[str, np.ndarray], config: UNetConfig,
                       dtype=np.float32) -> Dict[str, Any]:
  """Maps a diffusers state dict onto the Flax UNet params for `config`.

  Raises ValueError naming every missing key, unexpected key and shape mismatch.
  """
  return torch_weights.map_state_dict(
      state_dict, abstract_params(config), key_map=lambda key: "/".join(flax_path(key)),
      dtype=dtype, what="the model config (is config.json the one saved with these weights?)")


def to_diffusers_state_dict(params) -> Dict[str, np.ndarray]:
  """The inverse mapping: Flax UNet params -> a diffusers `UNet2DModel` state dict."""
  out = {}
  for path, v in traverse_util.flatten_dict(jax.device_get(params)).items():
    mod = ".".join(_split_index(p) for p in path[:-1])
    leaf = "bias" if path[-1] == "bias" else "weight"
    out[f"{mod}.{leaf}"] = np.asarray(torch_weights.flax_to_torch(np.asarray(v)))
  return out


# diffusers ModuleLists, whose entries the Flax names carry as `<list>_<index>`.
_MODULE_LISTS = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers",
                 "upsamplers", "to_out")


def _split_index(name: str) -> str:
  head, _, tail = name.rpartition("_")
  return f"{head}.{tail}" if head in _MODULE_LISTS and tail.isdigit() else name


# ----------------------------------------------------------------------------- directories

def find_model(directory: str, subfolder: str = "unet",
               names: Tuple[str, ...] = WEIGHTS_NAMES) -> Tuple[str, str]:
  """(config.json, weights file) of a diffusers model in `directory` or its `subfolder`
  (a pipeline folder's "unet", "transformer", ...); the first of `names` found."""
  for d in (directory, os.path.join(directory, subfolder)):
    cfg = os.path.join(d, CONFIG_NAME)
    if os.path.isfile(cfg):
      for name in names:
        if os.path.isfile(os.path.join(d, name)):
          return cfg, os.path.join(d, name)
      raise FileNotFoundError(f"{d} has {CONFIG_NAME} but no weights file (one of "
                              f"{', '.join(names)}).")
  raise FileNotFoundError(f"no diffusers model at {directory}: expected {CONFIG_NAME} and "
                          f"{names[0]} (or .bin) there or in {directory}/{subfolder}.")


def scheduler_config_paths(directory: str) -> Tuple[str, ...]:
  """Where a diffusers scheduler config may sit for a model in `directory`: next to it,
  in its `scheduler/` or in its parent pipeline's `scheduler/` (a unet/ or transformer/)."""
  parent = os.path.dirname(os.path.normpath(directory))
  return (os.path.join(directory, SCHEDULER_CONFIG),
          os.path.join(directory, "scheduler", SCHEDULER_CONFIG),
          os.path.join(parent, "scheduler", SCHEDULER_CONFIG))


def schedule_from_config(path: str, prediction_types: Sequence[str] = ("epsilon",)
                         ) -> Dict[str, Any]:
  """make_schedule kwargs from a diffusers scheduler_config.json, checked now: a corrupt
  file, an unsupported beta_schedule, a prediction_type outside `prediction_types`, or
  values make_schedule refuses give a ValueError naming the file."""
  s = files.read_json(path, "diffusers scheduler config")
  where = f"{SCHEDULER_CONFIG} at {path}"
  kind = s.get("beta_schedule", "linear")
  if kind not in BETA_SCHEDULES:
    raise ValueError(f"{where}: beta_schedule {kind!r} is not supported; use one of "
                     f"{sorted(BETA_SCHEDULES)} (or pass the schedule explicitly).")
  if s.get("prediction_type", "epsilon") not in prediction_types:
    accepted = ("only epsilon prediction is supported" if tuple(prediction_types) == ("epsilon",)
                else f"this model takes one of {tuple(prediction_types)}")
    raise ValueError(f"{where}: prediction_type {s['prediction_type']!r}; {accepted}.")
  T = s.get("num_train_timesteps", 1000)
  if not is_integer(T) or T < 2:
    raise ValueError(f"{where}: num_train_timesteps must be an integer >= 2, got {T!r}.")
  out = {"name": BETA_SCHEDULES[kind], "num_timesteps": T}
  if kind in ("linear", "scaled_linear"):
    out.update(beta_start=s.get("beta_start", 1e-4), beta_end=s.get("beta_end", 0.02))
  try:
    make_schedule(**out)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
  return out


def schedule_from_diffusers(directory: str, prediction_types: Sequence[str] = ("epsilon",)
                            ) -> Optional[Dict[str, Any]]:
  """make_schedule kwargs from the first diffusers scheduler config found for the model in
  `directory` (`scheduler_config_paths`), checked (`schedule_from_config`); None if none."""
  path = _scheduler_config(directory)
  return None if path is None else schedule_from_config(path, prediction_types)


def prediction_type_from_diffusers(directory: str) -> str:
  """The `prediction_type` of that scheduler config ("epsilon" if none or unset)."""
  path = _scheduler_config(directory)
  if path is None:
    return "epsilon"
  return files.read_json(path, "diffusers scheduler config").get("prediction_type", "epsilon")


def _scheduler_config(directory: str) -> Optional[str]:
  return next((p for p in scheduler_config_paths(directory) if os.path.isfile(p)), None)


def read_config(path: str) -> Dict[str, Any]:
  """A diffusers config.json, with an error naming the file when it is missing or corrupt."""
  return files.read_json(path, "diffusers model config")


def import_diffusers(directory: str, weights: Optional[str] = None,
                     config: Optional[Mapping[str, Any]] = None):
  """Loads a diffusers UNet2DModel. Returns (module, params, meta) like `checkpoint.load_model`.

  `directory` holds config.json and the weights (or pass `weights` and `config` explicitly).
  """
  if weights is None or config is None:
    cfg_path, w_path = find_model(directory)
    weights = weights or w_path
    if config is None:
      config = read_config(cfg_path)
  unet_config = config_from_diffusers(config)
  params = convert_state_dict(load_state_dict(weights), unet_config)
  schedule = schedule_from_diffusers(directory) if directory else None
  meta = {"model": unet_config.to_dict(), "schedule": schedule or {},
          "source": {"diffusers": os.path.abspath(weights)}}
  return UNet(unet_config), params, meta


def export_checkpoint(directory: str, outdir: str, weights: Optional[str] = None) -> str:
  """Imports a diffusers model and saves it as a tac_jax model directory (orbax + model.json),
  which `--config.checkpoint` of the main job accepts."""
  _, params, meta = import_diffusers(directory, weights)
  return checkpoint.save_model(outdir, params, meta)


def export_diffusers(outdir: str, params, config: UNetConfig) -> str:
  """Writes Flax UNet params as a diffusers model directory (config.json + safetensors)."""
  os.makedirs(outdir, exist_ok=True)
  save_safetensors(os.path.join(outdir, WEIGHTS_NAMES[0]), to_diffusers_state_dict(params),
                   {"format": "pt"})
  files.write_json_atomic(os.path.join(outdir, CONFIG_NAME), config_to_diffusers(config))
  return outdir
