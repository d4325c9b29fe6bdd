"""Training loop for the eps-prediction UNet: optax AdamW, EMA, resumable orbax checkpoints.

    loss = E_{x0, t, noise} || eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, t) - noise ||^2
"""

from __future__ import annotations

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
from tac_jax import parallel
from tac_jax.diffusion.schedules import make_schedule
from tac_jax.models.unet import UNetConfig, init_unet


class TrainState(NamedTuple):
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


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


def _restore(manager: ocp.CheckpointManager, state: TrainState, workdir: str) -> TrainState:
  """The latest checkpoint in `manager` (if any) restored over `state`'s structure."""
  step = manager.latest_step()
  if step is None:
    return state
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract)))
  logging.info("resumed from %s at step %d", workdir, step)
  print(f"resumed from step {step}", flush=True)
  return TrainState(*restored["state"])


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
    if done % config.log_every == 0 or done == config.num_train_steps:
      mean_loss = float(jnp.mean(jnp.stack(window)))
      rate = len(window) / (time.time() - t0)
      losses.append((done, mean_loss))
      print(f"step {done}/{config.num_train_steps}  loss {mean_loss:.4f}  {rate:.1f} steps/s",
            flush=True)
      window, t0 = [], time.time()
    if done % config.checkpoint_every == 0 or done == config.num_train_steps:
      manager.save(done, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
  manager.wait_until_finished()
  return state, losses


def train(config: ml_collections.ConfigDict, workdir: str,
          export_dir: Optional[str] = None) -> Dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints); exports EMA params.

  Returns {'params': ema params, 'module': module, 'losses': [(step, loss)]}.
  """
  cfg_model = model_config(config)
  abar = jnp.asarray(schedule_from_config(config).alphas_cumprod, jnp.float32)
  data = load_training_data(config)
  if data.shape[1:] != (cfg_model.sample_size, cfg_model.sample_size, cfg_model.in_channels):
    raise ValueError(f"data shape {data.shape[1:]} does not match the model config "
                     f"({cfg_model.sample_size}, {cfg_model.sample_size}, {cfg_model.in_channels}).")
  key, init_key = jax.random.split(jax.random.key(config.seed))
  module, params = init_unet(cfg_model, init_key)
  tx = make_optimizer(config)
  workdir = os.path.abspath(workdir)
  manager = ocp.CheckpointManager(
      os.path.join(workdir, "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
  state = _restore(manager, TrainState(jnp.zeros((), jnp.int32), params, params,
                                       tx.init(params)), workdir)
  # Data parallel over all devices (when several): batch split, state replicated; jit turns
  # the gradient's batch mean into an all-reduce.
  mesh = parallel.auto_mesh(config.get("data_parallel", True))
  put = jnp.asarray
  if mesh is not None:
    parallel.check_divisible(config.batch_size, mesh)
    state = parallel.replicate(state, mesh)
    put = lambda x: parallel.shard_batch(x, mesh)
  train_step = make_train_step(module, tx, abar, config.optim.ema_decay)
  state, losses = _loop(config, state, train_step, data, put, key, manager)
  meta = {"model": cfg_model.to_dict(), "schedule": config.schedule.to_dict(),
          "data": config.data.to_dict(), "train_steps": int(state.step), "seed": config.seed}
  if export_dir and jax.process_index() == 0:
    ckpt_lib.save_model(export_dir, state.ema_params, meta)
    print(f"exported EMA params to {export_dir}", flush=True)
  return {"params": state.ema_params, "module": module, "losses": losses, "meta": meta}
