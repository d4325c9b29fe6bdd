"""The stages of an evaluation, shared by the main job (`pipeline`) and the sweep (`sweep`).

Each stage is a function of values; what an evaluation repeats (float reference per
sampler and seed, fitted parameters, evaluations) is memoised by value keys (sampler
name, method or FitConfig, seed), never by object identity:

    model = load_model(checkpoint)
    noise = seed_noise(seed, num_calib, num_eval, shape)
    jit = Compiled(model, sampler)
    ref = float_reference(jit, model, noise.x_eval, noise.key_eval)
    qm = quantize(model, calibration_batches(jit, model, noise), qconfig)
    phi, report = analyse_propagation(jit, model, qm, noise)
    cal = fit_method("tcec", model, jit, qm, noise, phi)      # a compensation.Calibration
    metrics = evaluate(jit, qm, cal, noise.x_eval, noise.key_eval, ref)
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import time
from typing import Any, Callable, Dict, Hashable, List, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from tac_jax import compensation, data, metrics, parallel, quant
from tac_jax.quant import presets
from tac_jax.diffusion import flow, samplers
from tac_jax.diffusion.schedules import make_schedule
from tac_jax.compensation import propagation
from tac_jax.host import to_host
from tac_jax.metrics import frechet
from tac_jax.models import checkpoint as ckpt_lib
from tac_jax.models import dit_factory, latent
from tac_jax.validate import check_applies


class Progress:
  """Progress lines with the seconds since the job started."""

  def __init__(self, verbose: bool = True):
    self.t0 = time.time()
    self.verbose = verbose

  def __call__(self, msg: str):
    if self.verbose:
      print(f"[{time.time() - self.t0:7.1f}s] {msg}", flush=True)


class Memo:
  """A cache keyed by values (strings, numbers, frozen dataclasses), not by identity."""

  def __init__(self):
    self._store: Dict[Hashable, Any] = {}

  def __call__(self, key: Hashable, compute: Callable[[], Any]) -> Any:
    if key not in self._store:
      self._store[key] = compute()
    return self._store[key]

  def clear(self) -> None:
    self._store.clear()


# ----------------------------------------------------------------------------- model and noise

@dataclasses.dataclass(frozen=True, eq=False)
class Model:
  """A float model: a Flax module (or an object with its `apply`) called as
  `module.apply({"params": params}, x, t)` with x [B, H, W, C] and t [B], and what it was
  trained with: a DDPM `Schedule` (it predicts the noise, t int32) or a `flow.FlowConfig`
  (it predicts the velocity eps - x0, t = s T float32); the image shape (H, W, C) and a
  description. A class-conditional model guided at a fixed scale (`models.dit_factory`)
  has `labels`: sample i is asked for class labels[i % len(labels)], guided at
  `guidance_scale`."""
  module: Any
  params: Any
  schedule: Any
  meta: Dict[str, Any]
  checkpoint: str
  shape: Tuple[int, int, int]
  labels: Optional[Tuple[int, ...]] = None
  guidance_scale: Optional[float] = None
  # latents -> images (a latent model, e.g. a diffusers SD folder: its VAE decoder); the
  # metrics and grids compare images, the error model the latents. None: samples are images.
  decode: Optional[Callable[[jax.Array], jax.Array]] = None

  def image(self, x):
    """The images of samples `x` (decoded latents, or x itself)."""
    return x if self.decode is None else self.decode(x)

  @property
  def channels(self) -> int:
    return self.shape[-1]

  @property
  def prediction(self) -> str:
    return "flow" if isinstance(self.schedule, flow.FlowConfig) else "epsilon"

  def requested_labels(self, num: int) -> Optional[np.ndarray]:
    """[num] the class each of `num` samples is asked for (None: unconditional)."""
    if self.labels is None:
      return None
    return np.asarray(self.labels)[np.arange(num) % len(self.labels)]

  @property
  def variables(self):
    return {"params": self.params}

  @property
  def net(self) -> compensation.Net:
    return compensation.Net(self.module.apply, self.variables)


def schedule_of(meta: Dict[str, Any]):
  """A checkpoint's `flow.FlowConfig` (flow objective) or DDPM `Schedule` (make_schedule's
  defaults when its model.json records none)."""
  if meta.get("objective", "epsilon") == "flow":
    return flow.flow_config(**meta.get("flow", {}))
  return make_schedule(**meta.get("schedule", {}))


def load_model(checkpoint: str = "", factory: str = "", guidance_scale: Optional[float] = None,
               labels: Optional[Tuple[int, ...]] = None, conditions: str = "") -> Model:
  """A checkpoint directory or shipped name ("" = the shipped default model; UNet or DiT,
  epsilon or flow),
  or any Flax model from `factory` = "package.module:function" (see `model_from_factory`).

  A class-conditional DiT checkpoint is guided (classifier-free, one batched call) at
  `guidance_scale` (None: the scale its model.json records, else 1) on `labels` (None:
  every class), sample i asking for labels[i % len(labels)]. `factory` = "diffusers:PATH"
  is a diffusers SD-family folder guided on the prompts of the `conditions` .npz
  (`diffusers_model`)."""
  if factory.startswith(DIFFUSERS_PREFIX):
    return diffusers_model(factory[len(DIFFUSERS_PREFIX):], conditions, guidance_scale)
  if factory:
    return model_from_factory(factory)
  if checkpoint in ckpt_lib.SHIPPED:
    checkpoint = ckpt_lib.pretrained_dir(checkpoint)
  directory = checkpoint or ckpt_lib.default_model_dir()
  module, params, meta = ckpt_lib.load_model(directory)
  return checkpoint_model(module, params, meta, directory, guidance_scale, labels)


def checkpoint_model(module, params, meta: Dict[str, Any], directory: str,
                     guidance_scale: Optional[float] = None,
                     labels: Optional[Tuple[int, ...]] = None) -> Model:
  """The `Model` of a checkpoint's bare module, params and model.json record (a
  class-conditional DiT guided as `load_model` says)."""
  c = module.config
  shape = (c.sample_size, c.sample_size, c.in_channels)
  if getattr(c, "class_conditional", False):
    scale = meta.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale
    labels = tuple(range(c.num_embeds_ada_norm)) if labels is None else labels
    module = dit_factory.guided_module(c, labels, scale)
    params = {"dit": params}
    labels = module.labels
  elif labels is not None:
    raise ValueError(f"config.labels: {directory} holds an unconditional model; leave labels "
                     "empty.")
  return Model(module, params, schedule_of(meta), meta, directory, shape, labels,
               None if labels is None else module.scale)


DIFFUSERS_PREFIX = "diffusers:"


def diffusers_model(directory: str, conditions: str, guidance_scale: Optional[float] = None
                    ) -> Model:
  """A diffusers SD-family folder (unet/, vae/, scheduler/) as a latent `Model`: the UNet
  guided at `guidance_scale` (None: 7.5) on the prompt embeddings of `conditions`
  (`models.latent`), sampled in latent space, decoded by its VAE for the metrics."""
  if not conditions:
    raise ValueError("config.model=diffusers:PATH needs config.conditions: an .npz of the text "
                     "encoder's embeddings (encoder_hidden_states, null_encoder_hidden_states; "
                     "tac_jax.models.latent).")
  pipe = latent.load_pipeline(directory, conditions, guidance_scale)
  meta = {"factory": DIFFUSERS_PREFIX + directory, "conditions": conditions,
          "prompts": pipe.num_prompts, "vae_scaling_factor": pipe.vae_config.scaling_factor}
  return Model(pipe.module, pipe.params, make_schedule(**pipe.schedule), meta,
               DIFFUSERS_PREFIX + directory, pipe.shape, None, pipe.module.scale, pipe.decode)


def import_user_module(name: str, what: str):
  """A module a config names, importable from the working directory or sys.path; `what`
  says which config field named it, in the error."""
  if os.getcwd() not in sys.path:   # launchers run with experiments/ as sys.path[0]
    sys.path.append(os.getcwd())
  try:
    return importlib.import_module(name)
  except ImportError as e:
    raise ValueError(f"{what}: cannot import {name} ({e}); run from the folder that holds it "
                     "or add it to PYTHONPATH.") from None


def resolve_factory(spec: str) -> Callable[[], Any]:
  """The function named by "package.module:function" (importable from the working
  directory or sys.path), with errors that say what is wrong."""
  mod_name, sep, fn_name = spec.partition(":")
  if not sep or not mod_name or not fn_name:
    raise ValueError(f"model factory {spec!r}: write it as package.module:function.")
  mod = import_user_module(mod_name, f"model factory {spec!r}")
  fn = getattr(mod, fn_name, None)
  if not callable(fn):
    raise ValueError(f"model factory {spec!r}: {mod_name} has no function {fn_name}.")
  return fn


def model_from_factory(spec: str) -> Model:
  """Calls the factory, which returns (module, params, schedule, shape): a Flax module
  called as `module.apply({"params": params}, x, t)` (x [B, H, W, C], t [B]), its float
  params, what it was trained with, and the image shape (H, W, C). The schedule is either
  the make_schedule(...) keyword dict of a noise-prediction model (t int32), or a flow
  declaration {"type": "flow", ...} of a velocity model (`flow.flow_model`: its time
  scale, which end is noise, the velocity's sign; t float32). A module with a `labels`
  attribute (a guided DiT, `models.dit_factory`, `diffusion.ClassGuided`) is
  class-conditional. An optional fifth element is a dict of what the model was trained on,
  as a checkpoint's model.json records it: {"data": {"name": "digits"}} gives the main job
  FD against that data set and, for a conditional model, label accuracy."""
  out = resolve_factory(spec)()
  if not isinstance(out, tuple) or len(out) not in (4, 5) or (
      len(out) == 5 and not isinstance(out[4], dict)):
    raise ValueError(f"model factory {spec!r} must return (module, params, schedule dict, "
                     f"(H, W, C)[, meta dict]), got {type(out).__name__}.")
  module, params, schedule, shape = out[:4]
  meta = {**(out[4] if len(out) == 5 else {}), "factory": spec}
  shape = tuple(int(v) for v in shape)
  if len(shape) != 3:
    raise ValueError(f"model factory {spec!r}: the image shape must be (H, W, C), got {shape}.")
  labels = getattr(module, "labels", None)
  scale = getattr(module, "scale", None) if labels is not None else None
  if flow.is_flow_declaration(schedule):
    try:
      schedule, module = flow.flow_model(schedule, module)
    except ValueError as e:
      raise ValueError(f"model factory {spec!r}: {e}") from None
    t0 = jnp.full((1,), float(schedule.num_train_timesteps), jnp.float32)
  else:
    schedule = make_schedule(**dict(schedule))
    t0 = jnp.zeros((1,), jnp.int32)
  x = jnp.zeros((1,) + shape)
  y = check_applies(module.apply, {"params": params}, (x, t0),
                    f"model factory {spec!r}", "the factory's params must be its module's, and "
                    "its image shape (H, W, C) the module's input")
  if y.shape != x.shape:
    raise ValueError(f"model factory {spec!r}: the model maps {x.shape} to {y.shape}; a "
                     "noise or velocity prediction has its input's shape.")
  return Model(module, params, schedule, meta, spec, shape,
               None if labels is None else tuple(labels), scale)


class Noise(NamedTuple):
  """Starting noise and step-noise keys of the calibration and evaluation seeds."""
  x_cal: jax.Array
  key_cal: jax.Array
  x_eval: jax.Array
  key_eval: jax.Array


def seed_noise(seed: int, num_calib: int, num_eval: int, shape) -> Noise:
  """The calibration and evaluation noise derived from `seed` (disjoint streams)."""
  k_cal, k_eval = jax.random.split(jax.random.key(seed))
  x_cal = jax.random.normal(jax.random.fold_in(k_cal, 0), (num_calib,) + tuple(shape))
  x_eval = jax.random.normal(jax.random.fold_in(k_eval, 0), (num_eval,) + tuple(shape))
  return Noise(x_cal, jax.random.fold_in(k_cal, 1), x_eval, jax.random.fold_in(k_eval, 1))


def shard_noise(spec, model: Model, noise: Noise, log) -> Tuple[Model, Noise]:
  """Data parallel when several devices are there (and `spec.data_parallel`; `spec` a
  settings.EvalSpec): the seeds split over the devices, the model replicated, or its large
  params split over them with `spec.shard_params` (both jobs go through this)."""
  mesh = parallel.auto_mesh(spec.data_parallel)
  if mesh is None:
    return model, noise
  n = mesh.shape[parallel.DATA_AXIS]
  for name in ("num_calib", "num_eval"):
    parallel.check_divisible(getattr(spec, name), mesh, f"config.{name}={getattr(spec, name)}",
                             " or --config.data_parallel=False")
  noise = noise._replace(x_cal=parallel.shard_batch(noise.x_cal, mesh),
                         x_eval=parallel.shard_batch(noise.x_eval, mesh))
  place = parallel.shard_params if spec.shard_params else parallel.replicate
  model = dataclasses.replace(model, params=place(model.params, mesh))
  log(f"data parallel over {n} devices ({jax.process_count()} process(es)): "
      f"{spec.num_calib // n} calibration + {spec.num_eval // n} evaluation seeds each"
      + ("; float params sharded over them" if spec.shard_params else ""))
  return model, noise


class Compiled:
  """The jitted runs of one model and sampler. The network's apply function and the
  method's `online` (how it applies its params while sampling) are static arguments (a
  hashable `QuantizedApply` or the float apply; a function), so models that share one
  (same bits, different observers) and methods that share one (every method applied by
  `compensate`: plain PTQ, tcec, tcec_safe, tac, ...) share the compiled code."""

  def __init__(self, model: Model, sampler: samplers.Sampler):
    self.sampler = sampler
    apply_fp = model.module.apply

    def run(apply_fn, online, variables, params, x_T, key):
      online = online(sampler, params, compensation.Net(apply_fn, variables))
      state, traj = samplers.sample(apply_fn, variables, online, x_T, key, return_trajectory=True)
      return state.x, traj, state.error.e_hat

    def joint(q, var_fp, x_T, key):
      return propagation.joint_run(compensation.Net(apply_fp, var_fp), q, sampler, x_T, key)

    def analyse(q, var_fp, noise):
      c = sampler.coeffs
      cal = joint(q, var_fp, noise.x_cal, noise.key_cal)
      phi = propagation.fit_channel_gains(cal, c.a, c.b)
      trace = joint(q, var_fp, noise.x_eval, noise.key_eval)
      if compensation.is_multistep(sampler):
        return phi, propagation.multistep_report_arrays(
            trace, c, *propagation.fit_channel_gains2(cal, c))
      return phi, propagation.report_arrays(trace, c.a, c.b, phi)

    self.run = jax.jit(run, static_argnums=(0, 1))
    self.analyse = jax.jit(analyse)
    self.none = compensation.Calibration("none", compensation.zero_params(
        sampler.coeffs.num_steps, model.channels, sampler.coeffs.t), 0.0)

  def sample(self, apply_fn, variables, cal: compensation.Calibration, x_T, key):
    """(final samples, trajectory, e_hat) of `cal`'s method and params."""
    return self.run(apply_fn, compensation.get(cal.method).online, variables, cal.params,
                    x_T, key)


# ----------------------------------------------------------------------------- stages

class FloatReference(NamedTuple):
  x: jax.Array        # final float samples
  out: jax.Array      # [N+1, B, ...] the float run's step outputs (x_T first)
  image: Optional[jax.Array] = None   # their images (decoded latents); None: x itself

  @property
  def images(self) -> jax.Array:
    return self.x if self.image is None else self.image


def float_reference(jit: Compiled, model: Model, x_T, key) -> FloatReference:
  x, traj, _ = jit.sample(model.module.apply, model.variables, jit.none, x_T, key)
  return FloatReference(x, samplers.step_outputs(traj, x),
                        None if model.decode is None else model.decode(x))


def calibration_batches(jit: Compiled, model: Model, noise: Noise) -> List[Any]:
  """(x_t, t) batches of the float sampler's trajectories on the calibration seeds, t as
  the network gets it (an int, or a float for flow samplers)."""
  _, traj, _ = jit.sample(model.module.apply, model.variables, jit.none, noise.x_cal,
                          noise.key_cal)
  return samplers.calibration_batches(traj, jit.sampler)


def quantize(model: Model, calib, qconfig: quant.QuantConfig, preset: str = "minmax"):
  """The PTQ of `model` with `qconfig`: tac_jax's own (`quant.quantize_model`), or, for an
  external base preset (presets.EXTERNAL: "qwix"), that library's through its adapter
  (imported only then: an optional dependency)."""
  if preset in presets.EXTERNAL:
    module_name, fn = presets.EXTERNAL[preset].split(":")
    quantize_fn = getattr(importlib.import_module(module_name), fn)
  else:
    quantize_fn = quant.quantize_model
  return quantize_fn(model.module, model.params, calib, qconfig, model.schedule.num_timesteps)


def analyse_propagation(jit: Compiled, model: Model, qm: quant.QuantizedModel, noise: Noise):
  """(phi, report): channel gains fitted on the calibration seeds, and the first-order
  model checked against the measured error on the evaluation seeds."""
  phi, report = jit.analyse(qnet(qm), model.variables, noise)
  return phi, {k: to_host(v) for k, v in report.items()}


def qnet(qm: quant.QuantizedModel, mode: str = "fake") -> compensation.Net:
  """The quantized model as a Net (fake-quant, or the integer path with mode="int")."""
  return compensation.Net(qm.apply_fn(mode), qm.variables)


def fit_method(method: str, model: Model, jit: Compiled, qm: quant.QuantizedModel,
               noise: Noise, phi=None, options=None) -> compensation.Calibration:
  """Fits one registered compensation method on the calibration seeds of `noise` (with
  the method's `options`, default its own)."""
  return compensation.calibrate(model.net, qnet(qm), jit.sampler, noise.x_cal, noise.key_cal,
                                method, options, phi)


@jax.jit
def _sample_metrics(x, ref):
  """Per-sample PSNR / SSIM and the quality ratios, as one compiled program (eager ops on
  arrays sharded over several processes would each need their own collective launch)."""
  return (metrics.psnr(x, ref), metrics.ssim(x, ref), metrics.quality_ratios(x, ref))


@jax.jit
def _error_rms(traj, x, ref_out):
  return propagation.rms_per_step(samplers.step_outputs(traj, x) - ref_out)


def psnr_stats(x, ref) -> Dict[str, float]:
  """{mean, std} over samples of PSNR against `ref`."""
  return stats(_sample_metrics(x, ref)[0])


def stats(values) -> Dict[str, float]:
  v = to_host(values).astype(np.float64)
  return {"mean": float(v.mean()), "std": float(v.std())}


def evaluate(jit: Compiled, qm: quant.QuantizedModel, cal: compensation.Calibration, x_T, key,
             ref: FloatReference, fd: Optional["FrechetReference"] = None,
             labels: Optional[np.ndarray] = None,
             decode: Optional[Callable] = None) -> Dict[str, Any]:
  """Samples with `cal` (fake-quant) and compares with the float samples on the same
  noise: PSNR / SSIM ({mean, std} over samples), contrast and sharpness ratios, per-step
  error RMS, Frechet distances when `fd` is given (with the samples' "features"), the
  label accuracy when `labels` (each sample's requested class) are given too, and the
  samples themselves ("x", on the host); with `decode` (latents -> images) the metrics and
  samples are the images', the per-step error the latents'."""
  x_q, traj, _ = jit.sample(qm.apply_fn("fake"), qm.variables, cal, x_T, key)
  image = x_q if decode is None else decode(x_q)
  p, s, q = _sample_metrics(image, ref.images)
  out = {"psnr": stats(p), "ssim": stats(s), "psnr_samples": to_host(p).astype(float).tolist(),
         "std_ratio": float(to_host(q["std_ratio"])),
         "sharpness_ratio": float(to_host(q["sharpness_ratio"])),
         "error_rms_per_step": to_host(_error_rms(traj, x_q, ref.out)).tolist(),
         "x": to_host(image)}
  if fd is not None:
    out.update(fd.distances(out["x"]))
    if labels is not None:
      out["label_accuracy"] = fd.label_accuracy(out["x"], labels)
  return out


@dataclasses.dataclass
class FrechetReference:
  """Features of the float model's samples and of real data, in the shipped classifier's
  feature space; `distances(x)` gives a sample set's FD to both."""
  extractor: frechet.FeatureExtractor
  float_features: np.ndarray
  data_features: np.ndarray

  @classmethod
  def build(cls, x_fp, data_name: str, data_seed: int) -> "FrechetReference":
    fx = frechet.FeatureExtractor()
    x_fp = np.clip(to_host(x_fp), -1, 1)
    real = data.load(data_name, size=x_fp.shape[1], seed=data_seed)[:x_fp.shape[0]]
    return cls(fx, fx(x_fp), fx(real))

  @property
  def floor(self) -> float:
    """The float model's own FD to data."""
    return frechet.frechet_distance(self.float_features, self.data_features)

  def features(self, x) -> np.ndarray:
    return self.extractor(np.clip(to_host(x), -1, 1))

  def label_accuracy(self, x, labels) -> float:
    """Share of the samples `x` the classifier assigns to their requested `labels`."""
    return frechet.label_accuracy(self.extractor.classify(np.clip(to_host(x), -1, 1)), labels)

  def distances(self, x) -> Dict[str, Any]:
    """FD vs float and vs data, and the features they came from ("features")."""
    f = self.features(x)
    return {"fd_vs_float": frechet.frechet_distance(f, self.float_features),
            "fd_vs_data": frechet.frechet_distance(f, self.data_features), "features": f}


# ----------------------------------------------------------------------------- overhead

def final_sampler_run(apply_fn, sampler: samplers.Sampler, method: Optional[str]):
  """Jitted (variables, params, x_T, key) -> x_0 only (for timing; method None: the plain
  sampler, params ignored)."""

  @jax.jit
  def run(variables, params, x_T, key):
    s = sampler if method is None else compensation.online_sampler(
        method, sampler, params, compensation.Net(apply_fn, variables))
    return samplers.sample(apply_fn, variables, s, x_T, key)[0].x

  return run


def compensation_only(sampler: samplers.Sampler):
  """The compensated sampler's steps for a whole run with given network outputs, no
  network: the correction, the error-state update and the step itself (an upper bound of
  the compensation's own work), through the same `compensation.compensate` as sampling."""

  @jax.jit
  def run(params, eps_seq, x_T):
    comp = compensation.compensate(sampler, params)

    def body(state, inputs):
      i, eps = inputs
      return comp.step(state, eps, i), None
    state, _ = jax.lax.scan(body, comp.init(x_T, jax.random.key(0)),
                            (jnp.arange(sampler.coeffs.num_steps), eps_seq))
    return state.x, state.error.e_hat

  return run


def _time(fn, *args, repeats: int) -> List[float]:
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    out.append(time.perf_counter() - t0)
  return out


def measure_overhead(q: compensation.Net, sampler, cal: compensation.Calibration, x_T, key,
                     repeats: int, comp_only: Optional[Callable] = None) -> Dict[str, float]:
  """Median times of plain vs compensated sampling (`cal`'s method and params),
  interleaved to share machine noise, and of the compensation ops alone (same shapes, no
  network).

  `overhead_ab` is the honest end-to-end figure but on a busy CPU its noise (a few %)
  exceeds the effect; `overhead_ops` times the extra work in isolation.
  """
  variables, params = q.variables, cal.params
  plain = final_sampler_run(q.apply, sampler, None)
  compensated = final_sampler_run(q.apply, sampler, cal.method)
  comp_only = comp_only or compensation_only(sampler)
  eps_seq = jax.random.normal(jax.random.key(0), (sampler.coeffs.num_steps,) + x_T.shape)
  for fn, args in ((plain, (variables, params, x_T, key)),
                   (compensated, (variables, params, x_T, key)), (comp_only, (params, eps_seq, x_T))):
    jax.block_until_ready(fn(*args))  # compile outside the timed runs
  t_plain, t_comp, t_ops = [], [], []
  for r in range(repeats):  # ABBA order, so drifts in machine speed cancel
    for which in ((0, 1) if r % 2 == 0 else (1, 0)):
      if which == 0:
        t_plain += _time(plain, variables, params, x_T, key, repeats=1)
      else:
        t_comp += _time(compensated, variables, params, x_T, key, repeats=1)
    t_ops += _time(comp_only, params, eps_seq, x_T, repeats=3)
  med = lambda v: float(np.median(v))
  return {"plain_s": med(t_plain), "compensated_s": med(t_comp), "compensation_ops_s": med(t_ops),
          "overhead_ab": med(t_comp) / med(t_plain) - 1.0,
          "overhead_ops": med(t_ops) / med(t_plain)}
