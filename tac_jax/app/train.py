"""Training loop for diffusion UNets and DiTs: optax AdamW, EMA, resumable orbax checkpoints.

`config.architecture` is "unet" (`UNetConfig` fields in config.model, the default) or "dit"
(`DiTConfig` fields; class-conditional, ada_norm_zero). `config.objective` is

    "epsilon" (default):  E || eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, t) - noise ||^2
                          on config.schedule (make_schedule keywords), int timesteps t;
    "flow":               E || v_theta((1 - s) x0 + s noise, s T) - (noise - x0) ||^2
                          (rectified flow, `flow.flow_matching_loss`), s ~ U[0, 1), on
                          config.flow (num_train_timesteps T, the sampling `shift`).

A class-conditional model trains on the data set's labels (`data.labels`), each replaced by
the null label with probability `config.label_dropout` (classifier-free guidance needs the
unconditional model too; Ho & Salimans use 0.1-0.2).

Bad input is refused before any data loading or compiling: `check_config` names the config
field, and a workdir whose checkpoints belong to another model config (recorded in its
train_model.json) is named with the first differing field. A NaN/inf loss (checked where it
is pulled to the host anyway: at each log line and checkpoint) or NaN/inf final params stop
training with a FloatingPointError, and nothing is exported.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from tac_jax.models import checkpoint as ckpt_lib
from tac_jax import data as data_lib
from tac_jax import files
from tac_jax import parallel
from tac_jax.diffusion import flow, guidance, samplers
from tac_jax.diffusion.schedules import make_schedule, timestep_subsequence
from tac_jax.host import to_host
from tac_jax.models.dit import init_dit
from tac_jax.models.dit_config import DiTConfig
from tac_jax.models.unet import UNetConfig, init_unet
from tac_jax.validate import is_integer, is_real

# In the workdir: the model config its checkpoints were written for.
RECORD_JSON = "train_model.json"
CHECKPOINTS = "checkpoints"
# config.architecture -> (its config class, init(config, key) -> (module, params)).
ARCHITECTURES = {"unet": (UNetConfig, init_unet), "dit": (DiTConfig, init_dit)}
OBJECTIVES = ("epsilon", "flow")
# (field, smallest value, what the field is / how to fix it) of the integer fields training
# reads; the optional ones are checked only when present.
_INT_FIELDS = (
    ("seed", 0, ""),
    ("num_train_steps", 1, "0 steps would export the untrained initialisation"),
    ("batch_size", 1, ""),
    ("log_every", 1, "the steps between two loss lines"),
    ("checkpoint_every", 1, "the steps between two checkpoints"),
    ("optim.warmup_steps", 0, "0 for no warm-up"))
_OPTIONAL_INT_FIELDS = (
    ("data.num_color_seeds", 1, "copies of the data set, each colored with another seed"),
    ("sample_steps", 1, "DDIM steps of the sample grid"),
    ("num_samples", 1, "images in the sample grid"))
# (field, low, high, low included, requirement, hint): low <= / < value < high, finite.
_REAL_FIELDS = (
    ("optim.learning_rate", 0.0, math.inf, False, "a finite number > 0",
     "configs/default_model.py uses 2e-3"),
    ("optim.weight_decay", 0.0, math.inf, True, "a finite number >= 0", "0 for none"),
    ("optim.grad_clip", 0.0, math.inf, False, "a finite number > 0",
     "the global gradient norm clipped to; configs/default_model.py uses 1.0"),
    ("optim.ema_decay", 0.0, 1.0, True, "a number in [0, 1)",
     "configs/default_model.py uses 0.999"))
_MISSING = object()


class TrainState(NamedTuple):
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


def _field(config, path: str, required: bool = True):
  """config's value at the dotted `path` (_MISSING if absent and not `required`)."""
  node = config
  for part in path.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      if not required:
        return _MISSING
      raise ValueError(f"config.{path} is missing; set it (configs/default_model.py has every "
                       "field training reads).") from None
  return node


def _bad(path: str, requirement: str, value, hint: str) -> ValueError:
  got = str(value) if is_real(value) else repr(value)
  return ValueError(f"config.{path} must be {requirement}, got {got}"
                    + (f" ({hint})" if hint else "") + ".")


def _check_sampling(config, num_timesteps: int) -> None:
  """The sample grid's DDIM steps and spacing, which the launcher uses after training."""
  steps = _field(config, "sample_steps", required=False)
  if steps is _MISSING:
    return
  spacing = config.get("sample_spacing", "uniform")
  try:
    timestep_subsequence(num_timesteps, steps, spacing)
  except ValueError as e:
    raise ValueError(f"config.sample_steps={steps} / config.sample_spacing={spacing!r}: "
                     f"{e}") from None


def _build(config, section: str, build):
  """build(config), its TypeError / ValueError as a ValueError naming config.<section>."""
  _field(config, section)
  try:
    return build(config)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.{section}: {e}") from None


def check_config(config: ml_collections.ConfigDict) -> None:
  """ValueError naming the first bad field (`config.<path>`) of the ones training reads:
  the integer counts (bools are not integers), the optimizer's numbers, the model, the
  schedule and the sample grid's steps. Reads no data and compiles nothing."""
  for fields, required in ((_INT_FIELDS, True), (_OPTIONAL_INT_FIELDS, False)):
    for path, low, hint in fields:
      v = _field(config, path, required)
      if v is not _MISSING and not (is_integer(v) and v >= low):
        raise _bad(path, f"an integer >= {low}", v, hint)
  for path, low, high, closed, requirement, hint in _REAL_FIELDS:
    v = _field(config, path)
    if not (is_real(v) and math.isfinite(v) and (low <= v if closed else low < v) and v < high):
      raise _bad(path, requirement, v, hint)
  if not isinstance(_field(config, "data.name"), str):
    raise _bad("data.name", "a data set name", config.data.name, "e.g. 'digits'")
  flag = config.get("data_parallel", True)
  if not isinstance(flag, (bool, np.bool_)):
    raise _bad("data_parallel", "True or False", flag, "split each batch over the devices")
  arch, objective = architecture(config), objective_of(config)
  if arch not in ARCHITECTURES:
    raise _bad("architecture", f"one of {sorted(ARCHITECTURES)}", arch, "the default is 'unet'")
  if objective not in OBJECTIVES:
    raise _bad("objective", f"one of {list(OBJECTIVES)}", objective, "the default is 'epsilon'")
  cfg_model = _build(config, "model", model_config)
  _check_conditioning(config, cfg_model)
  sched = _build(config, "flow" if objective == "flow" else "schedule", schedule_from_config)
  if objective == "epsilon":
    _check_sampling(config, sched.num_timesteps)


def architecture(config) -> str:
  return config.get("architecture", "unet")


def objective_of(config) -> str:
  return config.get("objective", "epsilon")


def is_class_conditional(cfg_model) -> bool:
  return isinstance(cfg_model, DiTConfig) and cfg_model.class_conditional


def _check_conditioning(config, cfg_model) -> None:
  """A DiT trained here: class-conditional, no learned-sigma head, labels from the data."""
  if isinstance(cfg_model, DiTConfig):
    if not cfg_model.class_conditional:
      raise _bad("model.norm_type", "'ada_norm_zero' (a class-conditional DiT)",
                 cfg_model.norm_type, "text-conditioned PixArt models are imported, not "
                 "trained here")
    if cfg_model.out_channels != cfg_model.in_channels:
      raise _bad("model.out_channels", f"in_channels = {cfg_model.in_channels}",
                 cfg_model.out_channels, "the loss trains the prediction only, not a learned-"
                 "sigma head")
  dropout = config.get("label_dropout", 0.0)
  if not (is_real(dropout) and 0.0 <= dropout < 1.0):
    raise _bad("label_dropout", "a number in [0, 1)", dropout,
               "the share of labels replaced by the null label")
  if is_class_conditional(cfg_model):
    name = _field(config, "data.name")
    n = cfg_model.num_embeds_ada_norm
    if data_lib.labels(name) is None:
      raise _bad("data.name", "a labelled data set for a class-conditional model", name,
                 f"labelled: {list(data_lib.LABELLED)}")
    if int(data_lib.labels(name).max()) >= n:
      raise _bad("model.num_embeds_ada_norm", f"the class count of {name!r} or more", n,
                 f"{name!r} has labels up to {int(data_lib.labels(name).max())}")


def model_config(config: ml_collections.ConfigDict):
  """The UNetConfig or DiTConfig of config.model (by config.architecture)."""
  cls, _ = ARCHITECTURES[architecture(config)]
  return cls.from_dict(config.model.to_dict())


def schedule_from_config(config: ml_collections.ConfigDict):
  """The model's DDPM `Schedule` (epsilon), or its `flow.FlowConfig` (flow)."""
  if objective_of(config) == "flow":
    return flow.flow_config(**config.flow.to_dict())
  return make_schedule(**config.schedule.to_dict())


def load_training_data(config: ml_collections.ConfigDict):
  """(images [N, H, W, C], labels [N] int32 or None): num_color_seeds colorings of the data
  set, with its labels (repeated) when the model is class-conditional."""
  d = config.data
  copies = d.get("num_color_seeds", 1)
  sets = [data_lib.load(d.name, size=config.model.sample_size, seed=config.seed + k)
          for k in range(copies)]
  labels = None
  if is_class_conditional(model_config(config)):
    labels = np.tile(data_lib.labels(d.name), copies)
  return np.concatenate(sets), labels


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  o = config.optim
  lr = optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, o.warmup_steps,
                                          max(config.num_train_steps, o.warmup_steps + 1),
                                          end_value=o.learning_rate * 0.05)
  return optax.chain(optax.clip_by_global_norm(o.grad_clip),
                     optax.adamw(lr, weight_decay=o.weight_decay))


def diffusion_loss(apply_fn, params, schedule_abar, x0, key):
  kt, kn = jax.random.split(key)
  t = jax.random.randint(kt, (x0.shape[0],), 0, schedule_abar.shape[0])
  noise = jax.random.normal(kn, x0.shape)
  ab = schedule_abar[t][:, None, None, None]
  x_t = jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * noise
  return jnp.mean((apply_fn({"params": params}, x_t, t) - noise) ** 2)


def drop_labels(labels, null_label: int, p: float, key):
  """Each label replaced by `null_label` with probability p (classifier-free guidance)."""
  return jnp.where(jax.random.uniform(key, labels.shape) < p, null_label, labels)


def make_loss(config, module, sched, cfg_model):
  """loss(params, x0, labels, key) -> scalar of config.objective; `labels` None for an
  unconditional model, else dropped to the null label at config.label_dropout."""
  p = float(config.get("label_dropout", 0.0))
  null = cfg_model.null_class_label if is_class_conditional(cfg_model) else None
  flow_T = sched.num_train_timesteps if isinstance(sched, flow.FlowConfig) else None
  abar = None if flow_T else jnp.asarray(sched.alphas_cumprod, jnp.float32)

  def loss(params, x0, labels, key):
    apply = module.apply
    if labels is not None:
      key, k_drop = jax.random.split(key)
      y = drop_labels(labels, null, p, k_drop)
      apply = lambda v, x, t: module.apply(v, x, t, y)
    if flow_T:
      return flow.flow_matching_loss(apply, {"params": params}, x0, key, flow_T)
    return diffusion_loss(apply, params, abar, x0, key)

  return loss


_DEFAULT_KIND = {"architecture": "unet", "objective": "epsilon"}
_START_OVER = "use another --workdir, or delete {} to train from scratch"


def _first_difference(old: Dict[str, Any], new: Dict[str, Any], cls=UNetConfig) -> Optional[str]:
  """'config.model.<field> was <old> there, is <new> now' for the first differing field."""
  try:   # fields added to the config class since the record was written take their defaults
    old = cls.from_dict(old).to_dict()
  except (TypeError, ValueError):
    pass
  for k in sorted(set(old) | set(new)):
    if old.get(k, _MISSING) != new.get(k, _MISSING):
      shown = [repr(d[k]) if k in d else "unset" for d in (old, new)]
      return f"config.model.{k} was {shown[0]} there, is {shown[1]} now"
  return None


def check_workdir(workdir: str, cfg_model, kind: Optional[Dict[str, str]] = None) -> None:
  """ValueError when `workdir` holds checkpoints whose recorded model config (RECORD_JSON)
  is not `cfg_model` (or whose architecture / objective are not `kind`'s), naming the first
  differing field. Reads only the record."""
  ckpts = os.path.join(workdir, CHECKPOINTS)
  path = os.path.join(workdir, RECORD_JSON)
  if not (os.path.isfile(path) and os.path.isdir(ckpts) and ocp.utils.checkpoint_steps(ckpts)):
    return
  record = files.read_json(path, "training record")
  old = record.get("model")
  if not isinstance(old, dict):
    raise ValueError(f"corrupt training record: {path} has no 'model' object; "
                     + _START_OVER.format(workdir) + ".")
  diff = None
  for field, value in (kind or {}).items():
    was = record.get(field, _DEFAULT_KIND[field])
    if was != value:
      diff = f"config.{field} was {was!r} there, is {value!r} now"
      break
  diff = diff or _first_difference(old, cfg_model.to_dict(), type(cfg_model))
  if diff:
    raise ValueError(f"workdir {workdir} holds checkpoints of another model ({diff}); "
                     + _START_OVER.format(workdir) + ".")


def _restore(manager: ocp.CheckpointManager, state: TrainState, workdir: str) -> TrainState:
  """The latest checkpoint in `manager` (if any) restored over `state`'s structure; a
  checkpoint that does not fit (another model's, in a workdir older than its training
  record) is a one-line ValueError."""
  step = manager.latest_step()
  if step is None:
    return state
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
  except (ValueError, TypeError, KeyError) as e:
    first = (str(e).strip().splitlines() or [""])[0][:200].rstrip(":. ")
    raise ValueError(f"cannot resume from the step-{step} checkpoint in workdir {workdir}: it "
                     f"does not fit this config's model, it was probably written for another "
                     f"({type(e).__name__}: {first}); " + _START_OVER.format(workdir) + "."
                     ) from None
  logging.info("resumed from %s at step %d", workdir, step)
  print(f"resumed from step {step}", flush=True)
  return TrainState(*restored["state"])


def _check_loss(mean_loss: float, step: int, config) -> None:
  if not math.isfinite(mean_loss):
    raise FloatingPointError(
        f"training diverged: the mean loss up to step {step} is {mean_loss}; nothing was "
        f"exported. Lower config.optim.learning_rate (now {config.optim.learning_rate}) or "
        f"check the training data (config.data) for NaN/inf values.")


def _check_params(params, step: int, config) -> None:
  """FloatingPointError when the (EMA) params to export hold NaN/inf."""
  if not all(to_host(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params)):
    raise FloatingPointError(
        f"the EMA params after step {step} hold NaN/inf values; nothing was exported. Lower "
        f"config.optim.learning_rate (now {config.optim.learning_rate}) or check the training "
        f"data (config.data) for NaN/inf values.")


def make_train_step(loss_fn, tx, ema_decay: float):
  """Jitted (state, x0, labels, key) -> (state, loss): AdamW step on
  loss_fn(params, x0, labels, key) (`make_loss`) and EMA with warm-up."""

  @jax.jit
  def train_step(state: TrainState, x0, labels, key):
    loss, grads = jax.value_and_grad(
        lambda p: loss_fn(p, x0, labels, key))(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # EMA with warm-up: early averages must not keep a share of the random init.
    step = state.step.astype(jnp.float32)
    decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
    ema = optax.incremental_update(params, state.ema_params, 1.0 - decay)
    return TrainState(state.step + 1, params, ema, opt_state), loss

  return train_step


def _loop(config, state: TrainState, train_step, data, put, key, manager):
  """Steps from state.step to num_train_steps, logging and checkpointing; (state, losses)."""
  images, labels = data
  rng = np.random.default_rng(config.seed)
  start = int(state.step)
  for _ in range(start):  # keep the data order identical when resuming
    rng.integers(0, images.shape[0], config.batch_size)
  losses, window, t0 = [], [], time.time()
  for step in range(start, config.num_train_steps):
    idx = rng.integers(0, images.shape[0], config.batch_size)
    y = None if labels is None else put(labels[idx])
    state, loss = train_step(state, put(images[idx]), y, jax.random.fold_in(key, step))
    window.append(loss)
    done = step + 1
    log = done % config.log_every == 0 or done == config.num_train_steps
    save = done % config.checkpoint_every == 0 or done == config.num_train_steps
    if log or save:   # the loss comes to the host here anyway (a checkpoint syncs too)
      mean_loss = float(jnp.mean(jnp.stack(window)))
      _check_loss(mean_loss, done, config)
    if log:
      rate = len(window) / (time.time() - t0)
      losses.append((done, mean_loss))
      print(f"step {done}/{config.num_train_steps}  loss {mean_loss:.4f}  {rate:.1f} steps/s",
            flush=True)
      window, t0 = [], time.time()
    if save:
      manager.save(done, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
  manager.wait_until_finished()
  return state, losses


def sample_grid(config: ml_collections.ConfigDict, out: Dict[str, Any]):
  """(images [num_samples, H, W, C] in [-1, 1], columns) of the trained model `out`: DDIM
  (epsilon) or Euler (flow) with config.sample_steps; a class-conditional model's sample
  i has label i % classes (one column per class), guided at config.guidance_scale (1 if
  unset: conditional only)."""
  sched = schedule_from_config(config)
  if isinstance(sched, flow.FlowConfig):
    sampler = flow.flow_euler(config.sample_steps, sched.shift, sched.num_train_timesteps)
  else:
    sampler = samplers.ddim(sched, config.sample_steps,
                            spacing=config.get("sample_spacing", "uniform"))
  mc = model_config(config)
  key = jax.random.key(config.seed + 1)
  x_T = jax.random.normal(key, (config.num_samples, mc.sample_size, mc.sample_size,
                                mc.in_channels))
  apply, variables, cols = out["module"].apply, {"params": out["params"]}, 8
  if is_class_conditional(mc):
    cols = mc.num_embeds_ada_norm
    labels = jnp.arange(config.num_samples, dtype=jnp.int32) % cols
    g = guidance.guided(apply, labels, jnp.full_like(labels, mc.null_class_label),
                        config.get("guidance_scale", 1.0))
    apply, variables = g.apply, g.bind(variables)
  run = jax.jit(lambda v, x, k: samplers.sample(apply, v, sampler, x, k)[0].x)
  return jnp.clip(run(variables, x_T, key), -1, 1), cols


def train(config: ml_collections.ConfigDict, workdir: str,
          export_dir: Optional[str] = None) -> Dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints); exports EMA params.

  Returns {'params': ema params, 'module': module, 'losses': [(step, loss)]}. Bad input is
  refused before any data loading or compiling (`check_config`, `check_workdir`); a NaN/inf
  loss or NaN/inf final params raise FloatingPointError and export nothing.
  """
  check_config(config)
  cfg_model = model_config(config)
  kind = {"architecture": architecture(config), "objective": objective_of(config)}
  workdir = os.path.abspath(workdir)
  check_workdir(workdir, cfg_model, kind)
  # Data parallel over all devices (when several): batch split, state replicated; jit turns
  # the gradient's batch mean into an all-reduce.
  mesh = parallel.auto_mesh(config.get("data_parallel", True))
  if mesh is not None:
    parallel.check_divisible(config.batch_size, mesh, what=f"config.batch_size={config.batch_size}")
  sched = schedule_from_config(config)
  data = load_training_data(config)
  if data[0].shape[1:] != (cfg_model.sample_size, cfg_model.sample_size, cfg_model.in_channels):
    raise ValueError(f"data shape {data[0].shape[1:]} does not match the model config "
                     f"({cfg_model.sample_size}, {cfg_model.sample_size}, {cfg_model.in_channels}).")
  key, init_key = jax.random.split(jax.random.key(config.seed))
  module, params = ARCHITECTURES[kind["architecture"]][1](cfg_model, init_key)
  tx = make_optimizer(config)
  manager = ocp.CheckpointManager(
      os.path.join(workdir, CHECKPOINTS),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
  state = _restore(manager, TrainState(jnp.zeros((), jnp.int32), params, params,
                                       tx.init(params)), workdir)
  if jax.process_index() == 0:
    files.write_json_atomic(os.path.join(workdir, RECORD_JSON),
                            {"model": cfg_model.to_dict(), **kind})
  put = jnp.asarray
  if mesh is not None:
    state = parallel.replicate(state, mesh)
    put = lambda x: parallel.shard_batch(x, mesh)
  train_step = make_train_step(make_loss(config, module, sched, cfg_model), tx,
                               config.optim.ema_decay)
  state, losses = _loop(config, state, train_step, data, put, key, manager)
  _check_params(state.ema_params, int(state.step), config)
  meta = {"model": cfg_model.to_dict(), **kind, "data": config.data.to_dict(),
          "train_steps": int(state.step), "seed": config.seed}
  if kind["objective"] == "flow":
    meta["flow"] = sched.to_dict()
  else:
    meta["schedule"] = config.schedule.to_dict()
  if is_class_conditional(cfg_model):
    meta["label_dropout"] = float(config.get("label_dropout", 0.0))
    if "guidance_scale" in config:
      meta["guidance_scale"] = float(config.guidance_scale)
  if export_dir and jax.process_index() == 0:
    ckpt_lib.save_model(export_dir, state.ema_params, meta)
    print(f"exported EMA params to {export_dir}", flush=True)
  return {"params": state.ema_params, "module": module, "losses": losses, "meta": meta}
