"""One registry of compensators: every method, ours and the field's, registers a `Method`
next to its code, and `calibrate` / the launchers only look names up here.

A method is either a per-step fit for the shared calibration scan (`fit`, with whether it
is `sequential` and its initial carried pytree), or a whole calibration of its own (`run`,
e.g. the validated default `tcec_safe`). `online` builds the sampler that applies fitted
params at run time (default: `compensate`); methods that call the network again while
sampling (QNCD) close over the quantized network there. To add a method, write its fit
and call `register(Method(...))` in one module (a test may do it too).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

from tac_jax.compensation.online import compensate
from tac_jax.compensation.scan import FitContext, FitStep, Net
from tac_jax.diffusion.samplers import Sampler


def plain_online(sampler: Sampler, params, q: Net) -> Sampler:
  """The default `Method.online`: `compensate(sampler, params)` (q unused)."""
  del q
  return compensate(sampler, params)


@dataclasses.dataclass(frozen=True)
class Method:
  """A compensation method.

  name: its name in configs and reports.
  summary: one line for reports and `--help`.
  fit: ctx -> per-step fit (`scan.FitStep`) for the calibration scan; None when the method
    fits nothing (the identity) or only calibrates through `run`.
  run: (ctx, x_T, key, phi) -> (params, report), for methods that calibrate outside one scan
    (`calibrate` then calls it). A method may have both: `run` selects its options on
    held-out seeds around scans of `fit` (tac), and `fit_scan` / tcec_safe's bases use `fit`
    at the options given.
  options: the default options (a frozen dataclass; `calibrate(options=...)` overrides).
  sequential: fit on trajectories already compensated at earlier steps (None: the
    options' own `sequential` field decides).
  init_aux: x_T -> the method's initial carried pytree (None: zeros like x_T).
  online: (sampler, params, q) -> the sampler that applies `params` while sampling.
  needs_schedule: the sampler must carry its noise schedule (`Sampler.schedule`).
  extra_calls: extra network calls per sampling step at run time (QNCD: 1 / interval).
  calibration_calls: network calls per calibration step (float + quantized).
  multistep: the fit holds for samplers whose step also mixes the previous output
    (DPM-Solver++ 2M, Heun: `multistep.MultistepCoeffs`); methods whose target is the
    one-step affine error model (x_{i+1} = a_i x_i + b_i eps) refuse them.
  """
  name: str
  summary: str
  fit: Optional[Callable[[FitContext], FitStep]] = None
  run: Optional[Callable[..., Any]] = None
  options: Any = None
  sequential: Optional[bool] = True
  init_aux: Optional[Callable[[Any], Any]] = None
  online: Callable[[Sampler, Any, Net], Sampler] = plain_online
  needs_schedule: bool = False
  extra_calls: float = 0.0
  calibration_calls: int = 2
  multistep: bool = False

  def __post_init__(self):
    if not self.name or not self.name.replace("_", "").isalnum():
      raise ValueError(f"method name {self.name!r}: use letters, digits and underscores.")


_REGISTRY: Dict[str, Method] = {}
DEFAULT_METHOD = "tcec_safe"


def register(method: Method, replace: bool = False) -> Method:
  """Adds `method` to the registry (a second method of the same name is refused unless
  `replace`)."""
  if method.name in _REGISTRY and not replace:
    raise ValueError(f"a compensation method named {method.name!r} is already registered; "
                     "pick another name or pass replace=True.")
  _REGISTRY[method.name] = method
  return method


def unregister(name: str) -> None:
  _REGISTRY.pop(name, None)


def get(name: str) -> Method:
  if name not in _REGISTRY:
    raise ValueError(f"unknown compensation method {name!r}; choose one of {list(_REGISTRY)}.")
  return _REGISTRY[name]


def names() -> Tuple[str, ...]:
  """Every registered method, in registration order ("none" first)."""
  return tuple(_REGISTRY)


def is_sequential(method: Method, options) -> bool:
  return bool(options.sequential if method.sequential is None else method.sequential)


def resolve_options(method: Method, options):
  """The method's options: its defaults, or `options` if of the same type."""
  if options is None:
    return method.options
  if method.options is not None and not isinstance(options, type(method.options)):
    raise TypeError(f"method {method.name!r} takes options of type "
                    f"{type(method.options).__name__}, got {type(options).__name__}.")
  return options
