"""Training loop for the eps-prediction UNet: optax AdamW, EMA, resumable orbax checkpoints.

    loss = E_{x0, t, noise} || eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, t) - noise ||^2

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
from tac_jax.diffusion.schedules import make_schedule, timestep_subsequence
from tac_jax.host import to_host
from tac_jax.models.unet import UNetConfig, init_unet

# In the workdir: the model config its checkpoints were written for.
RECORD_JSON = "train_model.json"
CHECKPOINTS = "checkpoints"
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


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _bad(path: str, requirement: str, value, hint: str) -> ValueError:
  got = str(value) if _is_real(value) else repr(value)
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
      if v is not _MISSING and not (_is_int(v) and v >= low):
        raise _bad(path, f"an integer >= {low}", v, hint)
  for path, low, high, closed, requirement, hint in _REAL_FIELDS:
    v = _field(config, path)
    if not (_is_real(v) and math.isfinite(v) and (low <= v if closed else low < v) and v < high):
      raise _bad(path, requirement, v, hint)
  if not isinstance(_field(config, "data.name"), str):
    raise _bad("data.name", "a data set name", config.data.name, "e.g. 'digits'")
  flag = config.get("data_parallel", True)
  if not isinstance(flag, (bool, np.bool_)):
    raise _bad("data_parallel", "True or False", flag, "split each batch over the devices")
  _build(config, "model", model_config)
  _check_sampling(config, _build(config, "schedule", schedule_from_config).num_timesteps)


def model_config(config: ml_collections.ConfigDict) -> UNetConfig:
  return UNetConfig.from_dict(config.model.to_dict())


def schedule_from_config(config: ml_collections.ConfigDict):
  return make_schedule(**config.schedule.to_dict())


def load_training_data(config: ml_collections.ConfigDict) -> np.ndarray:
  d = config.data
  sets = [data_lib.load(d.name, size=config.model.sample_size, seed=config.seed + k)
          for k in range(d.get("num_color_seeds", 1))]
  return np.concatenate(sets)


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


_START_OVER = "use another --workdir, or delete {} to train from scratch"


def _first_difference(old: Dict[str, Any], new: Dict[str, Any]) -> Optional[str]:
  """'config.model.<field> was <old> there, is <new> now' for the first differing field."""
  try:   # fields added to UNetConfig since the record was written take their defaults
    old = UNetConfig.from_dict(old).to_dict()
  except (TypeError, ValueError):
    pass
  for k in sorted(set(old) | set(new)):
    if old.get(k, _MISSING) != new.get(k, _MISSING):
      shown = [repr(d[k]) if k in d else "unset" for d in (old, new)]
      return f"config.model.{k} was {shown[0]} there, is {shown[1]} now"
  return None


def check_workdir(workdir: str, cfg_model: UNetConfig) -> None:
  """ValueError when `workdir` holds checkpoints whose recorded model config (RECORD_JSON)
  is not `cfg_model`, naming the first differing field. Reads only the record."""
  ckpts = os.path.join(workdir, CHECKPOINTS)
  path = os.path.join(workdir, RECORD_JSON)
  if not (os.path.isfile(path) and os.path.isdir(ckpts) and ocp.utils.checkpoint_steps(ckpts)):
    return
  old = files.read_json(path, "training record").get("model")
  if not isinstance(old, dict):
    raise ValueError(f"corrupt training record: {path} has no 'model' object; "
                     + _START_OVER.format(workdir) + ".")
  diff = _first_difference(old, cfg_model.to_dict())
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


def make_train_step(module, tx, abar, ema_decay: float):
  """Jitted (state, x0, key) -> (state, loss): AdamW step and EMA with warm-up."""

  @jax.jit
  def train_step(state: TrainState, x0, key):
    loss, grads = jax.value_and_grad(
        lambda p: diffusion_loss(module.apply, p, abar, x0, key))(state.params)
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
  rng = np.random.default_rng(config.seed)
  start = int(state.step)
  for _ in range(start):  # keep the data order identical when resuming
    rng.integers(0, data.shape[0], config.batch_size)
  losses, window, t0 = [], [], time.time()
  for step in range(start, config.num_train_steps):
    idx = rng.integers(0, data.shape[0], config.batch_size)
    state, loss = train_step(state, put(data[idx]), jax.random.fold_in(key, step))
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


def train(config: ml_collections.ConfigDict, workdir: str,
          export_dir: Optional[str] = None) -> Dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints); exports EMA params.

  Returns {'params': ema params, 'module': module, 'losses': [(step, loss)]}. Bad input is
  refused before any data loading or compiling (`check_config`, `check_workdir`); a NaN/inf
  loss or NaN/inf final params raise FloatingPointError and export nothing.
  """
  check_config(config)
  cfg_model = model_config(config)
  workdir = os.path.abspath(workdir)
  check_workdir(workdir, cfg_model)
  # Data parallel over all devices (when several): batch split, state replicated; jit turns
  # the gradient's batch mean into an all-reduce.
  mesh = parallel.auto_mesh(config.get("data_parallel", True))
  if mesh is not None:
    parallel.check_divisible(config.batch_size, mesh, what=f"config.batch_size={config.batch_size}")
  abar = jnp.asarray(schedule_from_config(config).alphas_cumprod, jnp.float32)
  data = load_training_data(config)
  if data.shape[1:] != (cfg_model.sample_size, cfg_model.sample_size, cfg_model.in_channels):
    raise ValueError(f"data shape {data.shape[1:]} does not match the model config "
                     f"({cfg_model.sample_size}, {cfg_model.sample_size}, {cfg_model.in_channels}).")
  key, init_key = jax.random.split(jax.random.key(config.seed))
  module, params = init_unet(cfg_model, init_key)
  tx = make_optimizer(config)
  manager = ocp.CheckpointManager(
      os.path.join(workdir, CHECKPOINTS),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
  state = _restore(manager, TrainState(jnp.zeros((), jnp.int32), params, params,
                                       tx.init(params)), workdir)
  if jax.process_index() == 0:
    files.write_json_atomic(os.path.join(workdir, RECORD_JSON), {"model": cfg_model.to_dict()})
  put = jnp.asarray
  if mesh is not None:
    state = parallel.replicate(state, mesh)
    put = lambda x: parallel.shard_batch(x, mesh)
  train_step = make_train_step(module, tx, abar, config.optim.ema_decay)
  state, losses = _loop(config, state, train_step, data, put, key, manager)
  _check_params(state.ema_params, int(state.step), config)
  meta = {"model": cfg_model.to_dict(), "schedule": config.schedule.to_dict(),
          "data": config.data.to_dict(), "train_steps": int(state.step), "seed": config.seed}
  if export_dir and jax.process_index() == 0:
    ckpt_lib.save_model(export_dir, state.ema_params, meta)
    print(f"exported EMA params to {export_dir}", flush=True)
  return {"params": state.ema_params, "module": module, "losses": losses, "meta": meta}
