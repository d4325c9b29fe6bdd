"""Job configs (ml_collections) turned into typed, frozen specs, once, at the top.

The main job (`pipeline`) and the sweep (`sweep`) validate their ConfigDict here, before
anything runs or is written; nothing below them reads the ConfigDict. Every error names
the field and what to write instead.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Optional, Tuple

import ml_collections

from tac_jax import compensation, files
from tac_jax.app.stages import DIFFUSERS_PREFIX, import_user_module, resolve_factory
from tac_jax.diffusion import flow, guidance, multistep, samplers
from tac_jax.models import checkpoint as ckpt_lib
from tac_jax.quant import presets

SETTINGS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4)}
# dpm: DPM-Solver++ 2M (diffusers' defaults); euler / heun: flow matching (diffusers'
# FlowMatchEuler / FlowMatchHeun DiscreteScheduler), for models trained by flow matching.
SAMPLER_KINDS = ("ddim", "ddpm", "dpm", "euler", "heun")
FLOW_KINDS = ("euler", "heun")
MULTISTEP_KINDS = ("dpm", "heun")
DPM_SPACING = {"uniform": "linspace", "leading": "leading", "trailing": "trailing"}


def parse_list(value, allowed=None, what="value") -> List[str]:
  """A comma list (or sequence) of names: stripped, non-empty, known, no duplicates."""
  items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
  if not items:
    raise ValueError(f"empty list of {what}s.")
  if allowed is not None:
    bad = [v for v in items if v not in allowed]
    if bad:
      raise ValueError(f"unknown {what} {bad}; choose from {sorted(allowed)}.")
  dups = sorted({v for v in items if items.count(v) > 1})
  if dups:
    raise ValueError(f"{what} {dups} listed more than once; list each once.")
  return items


def parse_ints(value, field: str, minimum: int) -> Tuple[int, ...]:
  """A comma list of integers >= minimum; errors name `field` (e.g. "config.seeds")."""
  out = []
  for v in parse_list(str(value), None, f"{field} entry"):
    try:
      n = int(v)
    except ValueError:
      raise ValueError(f"{field}: {v!r} is not an integer; write a comma list such as "
                       f"{minimum},{minimum + 1}.") from None
    if n < minimum:
      raise ValueError(f"{field}: every entry must be >= {minimum}, got {n}.")
    out.append(n)
  return tuple(out)


def load_plugins(value) -> Tuple[str, ...]:
  """Imports the modules of `config.plugins` (a comma list, importable from the working
  directory or sys.path), e.g. one that registers a compensation method with
  `compensation.register`, so the job can name it in `methods`."""
  names = tuple(v.strip() for v in str(value or "").split(",") if v.strip())
  for name in names:
    import_user_module(name, "config.plugins")
  return names


def parse_methods(value) -> Tuple[str, ...]:
  """Registered compensation methods, "none" first (added when missing)."""
  methods = parse_list(value, compensation.names(), "method")
  return ("none",) + tuple(m for m in methods if m != "none")


def _integer(config, name: str, minimum: int) -> int:
  v = config[name]
  if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < minimum:
    raise ValueError(f"config.{name} must be an integer >= {minimum}, got {v!r}.")
  return int(v)


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """A sampler by name and diffusers' options (`samplers.make_sampler`)."""
  kind: str
  num_steps: int
  eta: float = 0.0
  spacing: str = "uniform"
  steps_offset: int = 0
  clip_sample: bool = False
  thresholding: float = 0.0
  sample_max_value: float = 1.0
  linearise: bool = False          # with an x0 bound: error model from the step's mean jvp
  shift: float = 0.0               # flow samplers' sigma shift; 0: the model's own

  @property
  def name(self) -> str:
    return f"{self.kind}{self.num_steps}"

  def options(self) -> Dict[str, Any]:
    return dict(spacing=self.spacing, steps_offset=self.steps_offset,
                clip_sample=self.clip_sample, thresholding=self.thresholding,
                sample_max_value=self.sample_max_value)

  def build(self, schedule) -> samplers.Sampler:
    """The sampler on the model's `Schedule` (DDPM family) or `flow.FlowConfig`; a sampler
    of the other family is refused naming the ones that fit."""
    is_flow = isinstance(schedule, flow.FlowConfig)
    if self.kind in FLOW_KINDS:
      if not is_flow:
        raise ValueError(f"config.sampler={self.kind!r} integrates a flow-matching velocity, "
                         "but this model predicts noise on a DDPM schedule; use ddim, ddpm or "
                         "dpm.")
      make = flow.flow_euler if self.kind == "euler" else flow.flow_heun
      return make(self.num_steps, self.shift or schedule.shift, schedule.num_train_timesteps)
    if is_flow:
      raise ValueError(f"config.sampler={self.kind!r} needs a noise-prediction model on a DDPM "
                       "schedule, but this model was trained by flow matching; use "
                       "--config.sampler=euler (or heun).")
    if self.kind == "dpm":
      return multistep.dpm_solver_2m(schedule, self.num_steps, DPM_SPACING[self.spacing],
                                     self.steps_offset)
    return samplers.make_sampler(self.kind, schedule, self.num_steps, self.eta, **self.options())


def _check_dpm(spec: SamplerSpec) -> None:
  """DPM-Solver++ 2M here is deterministic, unclipped, on diffusers' spacings."""
  if spec.eta != 0.0:
    raise ValueError(f"config.eta={spec.eta}: DPM-Solver++ 2M is deterministic; leave eta at 0.")
  if spec.clip_sample or spec.thresholding or spec.linearise:
    raise ValueError("config.clip_sample / thresholding / linearise apply to DDIM and DDPM "
                     "only; turn them off for --config.sampler=dpm.")
  if spec.spacing not in DPM_SPACING:
    raise ValueError(f"config.spacing={spec.spacing!r}: DPM-Solver++ 2M takes one of "
                     f"{sorted(DPM_SPACING)} (uniform = diffusers' linspace).")
  multistep.check_num_steps(spec.num_steps)


def _check_flow(spec: SamplerSpec) -> None:
  """Flow samplers here are deterministic, unclipped, on diffusers' shifted sigmas."""
  if spec.eta != 0.0:
    raise ValueError(f"config.eta={spec.eta}: the flow samplers are deterministic; leave eta at 0.")
  if spec.clip_sample or spec.thresholding or spec.linearise:
    raise ValueError("config.clip_sample / thresholding / linearise apply to DDIM and DDPM "
                     f"only; turn them off for --config.sampler={spec.kind}.")
  if spec.spacing != "uniform" or spec.steps_offset:
    raise ValueError(f"config.spacing / steps_offset are DDPM-family options; the flow grid "
                     f"is set by config.shift (got spacing={spec.spacing!r}, steps_offset="
                     f"{spec.steps_offset}).")
  if spec.shift:
    flow.flow_config(shift=spec.shift)
  flow.flow_sigmas(spec.num_steps)   # checks num_steps
  if spec.kind == "heun":
    multistep.check_num_steps(spec.num_steps)


def sampler_spec(config, kind: str, num_steps: int, eta: float = 0.0) -> SamplerSpec:
  """The sampler `kind` with `num_steps` and the config's diffusers options, checked."""
  shift = config.get("shift", 0.0)
  if isinstance(shift, bool) or not isinstance(shift, (int, float)) or shift < 0:
    raise ValueError(f"config.shift must be a number > 0 (0: the model's own), got {shift!r}.")
  spec = SamplerSpec(kind, num_steps, eta, config.spacing, config.steps_offset,
                     bool(config.clip_sample), config.thresholding, config.sample_max_value,
                     bool(config.get("linearise", False)), float(shift))
  if kind not in SAMPLER_KINDS:
    raise ValueError(f"config.sampler={kind!r}: choose one of {list(SAMPLER_KINDS)}.")
  if kind in FLOW_KINDS:
    _check_flow(spec)
  elif spec.shift:
    raise ValueError(f"config.shift={spec.shift} is for the flow samplers (euler, heun); "
                     f"leave it at 0 for {kind}.")
  elif kind == "dpm":
    _check_dpm(spec)
  else:
    samplers.check_sampler_args(kind, num_steps, eta, **spec.options())
  return spec


def parse_sampler(name: str) -> Tuple[str, int]:
  """'ddim25' -> ('ddim', 25)."""
  for kind in SAMPLER_KINDS:
    if name.startswith(kind) and name[len(kind):].isdigit():
      return kind, int(name[len(kind):])
  raise ValueError(f"sampler {name!r}: use ddim<steps>, ddpm<steps>, dpm<steps> "
                   "(DPM-Solver++ 2M), euler<steps> or heun<steps> (flow models), e.g. ddim25.")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Where the model comes from: a factory "package.module:function" or a checkpoint
  directory ("" = the shipped default model)."""
  factory: str = ""
  checkpoint: str = ""
  guidance_scale: Optional[float] = None   # class-conditional checkpoints: None = the model's
  labels: Optional[Tuple[int, ...]] = None  # requested classes, cycled; None = every class
  conditions: str = ""   # factory "diffusers:PATH": the prompt embeddings .npz (models.latent)


def model_spec(config) -> ModelSpec:
  """The model fields, checked; a checkpoint may be a shipped model's name (e.g. dit_flow)."""
  checkpoint = config.checkpoint or ""
  if checkpoint and not config.get("model", ""):
    checkpoint = ckpt_lib.pretrained_dir(checkpoint)
  scale = config.get("guidance_scale", None)
  if scale is not None and scale != "":
    scale = guidance.check_scale(scale)
  else:
    scale = None
  labels = config.get("labels", "") or ""
  labels = parse_ints(labels, "config.labels", 0) if str(labels).strip() else None
  spec = ModelSpec(config.get("model", "") or "", checkpoint, scale, labels,
                   config.get("conditions", "") or "")
  if spec.factory.startswith(DIFFUSERS_PREFIX):
    if labels is not None or checkpoint:
      raise ValueError("config.model=diffusers:PATH is a text-conditioned pipeline: give its "
                       "prompts as config.conditions, not config.labels / config.checkpoint.")
    if not spec.conditions:
      raise ValueError("config.model=diffusers:PATH needs config.conditions: an .npz of the "
                       "prompts' text-encoder embeddings (tac_jax.models.latent).")
  elif spec.conditions:
    raise ValueError("config.conditions is for config.model=diffusers:PATH (a text-conditioned "
                     "diffusers pipeline).")
  elif spec.factory:
    resolve_factory(spec.factory)
    if scale is not None or labels is not None:
      raise ValueError("config.guidance_scale / config.labels apply to shipped or trained "
                       "class-conditional checkpoints; a factory sets its own guidance "
                       "(models.dit_factory.make_guided_factory).")
  else:
    files.load_meta(spec.checkpoint or ckpt_lib.default_model_dir())
  return spec


def safe_config(config) -> compensation.SafeConfig:
  """config.safe as a SafeConfig (fields of compensation.SafeConfig; `bases` a comma list)."""
  fields = dict(config.safe.to_dict() if "safe" in config else {})
  if "base" in fields:
    raise ValueError("config.safe.base is now config.safe.bases: a comma list of fitted "
                     "methods whose strengths tcec_safe searches (e.g. 'tcec' or 'tcec,tac').")
  if "bases" in fields:
    fields["bases"] = tuple(parse_list(fields["bases"], compensation.names(), "safe base"))
  if "strengths" in fields and isinstance(fields["strengths"], str):
    fields["strengths"] = tuple(float(v) for v in parse_list(fields["strengths"], None, "strength"))
  try:
    return compensation.SafeConfig(**fields)
  except TypeError as e:
    raise ValueError(f"config.safe: {e}; fields are those of compensation.SafeConfig.") from None


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  """What both jobs share: model, seeds, PTQ, compensation and Frechet settings."""
  model: ModelSpec
  num_calib: int
  num_eval: int
  settings: Tuple[str, ...]
  methods: Tuple[str, ...]          # "none" first
  quant: Dict[str, Any]             # the config's quant section (presets.quant_config)
  safe: compensation.SafeConfig
  fd_data_seed: int = 1000
  data_parallel: bool = True
  shard_params: bool = False        # with data_parallel: the float params FSDP-style


def eval_spec(config, methods, ptq0: str) -> EvalSpec:
  quant = config.quant.to_dict()
  presets.quant_config(quant, 8, 8, ptq0)   # unknown / bits fields
  safe = safe_config(config)
  num_calib = _integer(config, "num_calib", 1)
  if compensation.DEFAULT_METHOD in methods:
    compensation.check_split(num_calib, safe.val_fraction)
  if "tac" in methods:   # its mask threshold search holds out seeds too
    tac = compensation.get("tac").options
    compensation.check_split(num_calib, tac.val_fraction, who="tac's mask threshold search")
  return EvalSpec(model=model_spec(config),
                  num_calib=num_calib,
                  num_eval=_integer(config, "num_eval", 1),
                  settings=tuple(parse_list(config.settings, SETTINGS, "setting")),
                  methods=methods, quant=quant, safe=safe,
                  fd_data_seed=_integer(config, "fd_data_seed", 0),
                  data_parallel=bool(config.get("data_parallel", True)),
                  shard_params=bool(config.get("shard_params", False)))


@dataclasses.dataclass(frozen=True)
class JobSpec:
  """A validated main-job config."""
  common: EvalSpec
  seed: int
  sampler: SamplerSpec
  ptq: Tuple[str, ...]              # base-PTQ presets (quant/presets.py)
  default: str                      # the method shown in grids and timed
  frechet: bool
  int_path: bool
  timing_repeats: int
  export: str = ""                  # folder for one quantized artifact per setting ("" = none)


def job_spec(config: ml_collections.ConfigDict) -> JobSpec:
  """Checks every main-job field before anything runs or is written."""
  ptq = tuple(parse_list(config.ptq, presets.PRESETS, "PTQ preset"))
  load_plugins(config.get("plugins", ""))
  methods = parse_methods(config.methods)
  default = config.default_method
  if default not in compensation.names():
    raise ValueError(f"config.default_method {default!r} is not a compensation method; choose "
                     f"one of {list(compensation.names())}.")
  if config.sampler in MULTISTEP_KINDS:
    one_step = [m for m in methods if not compensation.get(m).multistep]
    if one_step:
      raise ValueError(f"config.methods {one_step} model each step as x_next = a x + b eps and "
                       f"do not hold for the multistep --config.sampler={config.sampler}; drop "
                       "them.")
  if config.sampler in FLOW_KINDS:
    ddpm_only = [m for m in methods if compensation.get(m).needs_schedule]
    if ddpm_only:
      raise ValueError(f"config.methods {ddpm_only} re-derive the sampler's steps from a DDPM "
                       f"noise schedule, which the flow sampler {config.sampler!r} has not; "
                       "drop them.")
  if default not in methods:   # e.g. a short list of methods: show the last one
    default = methods[-1]
  external = [p for p in ptq if p in presets.EXTERNAL]
  if external and config.get("export", ""):
    raise ValueError(f"config.export: the artifact stores tac_jax's own PTQ, not the external "
                     f"base {external}; leave config.export empty or pick another config.ptq.")
  return JobSpec(common=eval_spec(config, methods, ptq[0]),
                 seed=_integer(config, "seed", 0),
                 sampler=sampler_spec(config, config.sampler, _integer(config, "num_steps", 1),
                                      config.eta),
                 ptq=ptq, default=default, frechet=bool(config.frechet),
                 int_path=bool(config.int_path),
                 timing_repeats=_integer(config, "timing_repeats", 0),
                 export=_export_dir(config.get("export", "")))


def _export_dir(value) -> str:
  """config.export: "" or a folder path (not a file)."""
  if not isinstance(value, str):
    raise ValueError(f"config.export must be a folder path or empty, got {value!r}.")
  if value and os.path.isfile(value):
    raise ValueError(f"config.export={value!r} is a file; name a folder (one artifact per "
                     "setting goes below it).")
  return value


def ptq_option(name: str) -> Tuple[str, int]:
  """'minmax', 'svdquant', 'minmax_tg4' (4 timestep groups of activation ranges):
  (preset, timestep groups)."""
  preset, _, tg = name.partition("_tg")
  if preset not in presets.PRESETS or (tg and not tg.isdigit()) or tg == "0":
    raise ValueError(f"PTQ option {name!r}: use <preset>[_tg<groups>] with a preset in "
                     f"{sorted(presets.PRESETS)} and groups >= 1.")
  return preset, int(tg) if tg else 1


@dataclasses.dataclass(frozen=True)
class SweepSpec:
  """A validated sweep config."""
  common: EvalSpec
  samplers: Tuple[SamplerSpec, ...]
  ref: str                          # the reference sampler's name (e.g. ddim25)
  seeds: Tuple[int, ...]
  ptq_options: Tuple[str, ...]
  ablation_settings: Tuple[str, ...]
  ablations: Tuple[str, ...]
  fd_methods: Tuple[str, ...]
  calib_sizes: Tuple[int, ...]
  num_fd: int
  fd_data: str

  @property
  def sampler_names(self) -> Tuple[str, ...]:
    return tuple(s.name for s in self.samplers)


def sweep_spec(cfg: ml_collections.ConfigDict, ablations: Tuple[str, ...]) -> SweepSpec:
  """Checks every sweep field before anything runs or is written."""
  load_plugins(cfg.get("plugins", ""))
  methods = parse_methods(cfg.methods)
  names = parse_list(cfg.samplers, None, "sampler")
  specs = tuple(sampler_spec(cfg, *parse_sampler(n)) for n in names)
  if cfg.ref_sampler not in names:
    raise ValueError(f"ref_sampler {cfg.ref_sampler!r} must be one of samplers {names}.")
  options = tuple(parse_list(cfg.ptq_options, None, "PTQ option"))
  for p in options:
    ptq_option(p)
  num_fd = _integer(cfg, "num_fd", 0)
  fd_methods = tuple(parse_list(cfg.fd_methods, methods, "FD method")) if num_fd > 0 else ()
  return SweepSpec(
      common=eval_spec(cfg, methods, ptq_option(options[0])[0]),
      samplers=specs, ref=cfg.ref_sampler, seeds=parse_ints(cfg.seeds, "config.seeds", 0),
      ptq_options=options,
      ablation_settings=tuple(parse_list(cfg.ablation_settings, SETTINGS, "setting")),
      ablations=tuple(parse_list(cfg.get("ablations", ",".join(ablations)), ablations, "ablation")),
      fd_methods=fd_methods, calib_sizes=parse_ints(cfg.calib_sizes, "config.calib_sizes", 1),
      num_fd=num_fd, fd_data=cfg.fd_data)


def method_options(method: str, spec: EvalSpec, features: Optional[Any]):
  """The options a job passes to `method`: the config's SafeConfig (with the job's FD
  feature space) for tcec_safe, the method's own defaults otherwise."""
  if method == compensation.DEFAULT_METHOD:
    return dataclasses.replace(spec.safe, features=features) if features is not None else spec.safe
  return None
