"""How per-step quantization error propagates through an affine sampler (docs/METHOD.md s.1).

Scan position i = 0..N-1 runs step k = N - i. With e_i the cumulative error at the
input of position i (e_0 = 0) and d_i the per-step error of the quantized network at the
quantized input,

    e_{i+1} = a_i e_i + b_i [eps(xq_i) - eps(x_i)] + b_i d_i  ~  Phi_i e_i + b_i d_i,
    Phi_i = a_i I + b_i J_i               (first order, "m = 1")

and, with the channel-wise approximation Phi_i = diag(phi_i), the closed form

    e_{i+1} = sum_{j <= i} ( prod_{l=j+1..i} phi_l ) b_j d_j.

Three equivalent solvers are provided: the step-by-step recurrence, an associative scan
(cumulative products), and a lower-bidiagonal triangular solve over the timeline.
"""

from __future__ import annotations

from typing import Dict, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tac_jax.compensation.scan import Net
from tac_jax.diffusion.samplers import Sampler, batch_timestep
from tac_jax.host import to_host


class PropagationTrace(NamedTuple):
  """Per step i (leading axis N): errors of a joint float / quantized run."""
  e: jax.Array            # cumulative error at the step's input, xq_i - x_i (e[0] = 0)
  d: jax.Array            # per-step error eps_q(xq_i) - eps(xq_i)
  jvp: jax.Array          # J_i e_i (Jacobian of the float eps at x_i, exact via jax.jvp)
  e_next: jax.Array       # cumulative error at the step's output, xq_{i+1} - x_{i+1}
  x_fp_final: jax.Array   # final float sample
  x_q_final: jax.Array    # final quantized sample


def joint_run(fp: Net, q: Net, sampler: Sampler, x_T: jax.Array,
              key: jax.Array) -> PropagationTrace:
  """Runs the float and the quantized sampler from the same x_T and noise (one scan).

  Args:
    fp: the float noise model, `Net(apply, variables)`.
    q: the quantized one (e.g. `Net(qm.apply_fn("fake"), qm.variables)`).
    sampler: an affine sampler; x_T: [B, H, W, C] starting noise; key: step-noise key.
  Returns:
    PropagationTrace: per step the accumulated error e, the per-step quantization error d
    (quantized minus float output at the quantized state), the float Jacobian applied to
    e, and the error after the step, each [N, B, H, W, C].
  """
  c = sampler.coeffs

  def body(carry, i):
    s_fp, s_q = carry
    t = batch_timestep(c.t[i], x_T)
    e = s_q.x - s_fp.x
    eps_fp, j_e = jax.jvp(lambda x: fp(x, t), (s_fp.x,), (e,))
    eps_q = q(s_q.x, t)
    d = eps_q - fp(s_q.x, t)
    s_fp, s_q = sampler.step(s_fp, eps_fp, i), sampler.step(s_q, eps_q, i)
    return (s_fp, s_q), (e, d, j_e, s_q.x - s_fp.x)

  init = (sampler.init(x_T, key), sampler.init(x_T, key))
  (s_fp, s_q), (e, d, j_e, e_next) = jax.lax.scan(body, init, jnp.arange(c.num_steps))
  return PropagationTrace(e=e, d=d, jvp=j_e, e_next=e_next, x_fp_final=s_fp.x, x_q_final=s_q.x)


# ----------------------------------------------------------------------------- gains phi

def _bcast(v, x):
  """Per-step per-channel [N, C] (or [N]) -> broadcastable to [N, B, ..., C]."""
  v = jnp.asarray(v)
  if v.ndim == 1:
    return v.reshape((-1,) + (1,) * (x.ndim - 1))
  return v.reshape((v.shape[0],) + (1,) * (x.ndim - 2) + (v.shape[-1],))


def fit_channel_gains(trace: PropagationTrace, a: jax.Array, b: jax.Array,
                      min_energy: float = 1e-12) -> jax.Array:
  """Least-squares phi_i per channel from e_{i+1} - b_i d_i ~ phi_i e_i. [N, C].

  Steps where a channel carries no error yet (e_0 = 0) fall back to phi = a_i, the
  gain of the error when the Jacobian term is negligible.
  """
  r = trace.e_next - _bcast(b, trace.d) * trace.d
  axes = tuple(range(1, trace.e.ndim - 1))
  num = jnp.sum(trace.e * r, axis=axes)
  den = jnp.sum(trace.e * trace.e, axis=axes)
  a_full = jnp.broadcast_to(jnp.asarray(a)[:, None], num.shape)
  return jnp.where(den > min_energy, num / jnp.maximum(den, min_energy), a_full)


# ----------------------------------------------------------------------------- closed form

def cumulative_error_recurrence(phi, b, d) -> jax.Array:
  """e_{i+1} = phi_i e_i + b_i d_i, e_0 = 0, step by step. Returns [N, ...] (outputs)."""
  phi, bd = _bcast(phi, d), _bcast(b, d) * d

  def body(e, inputs):
    p, u = inputs
    e = p * e + u
    return e, e

  _, out = jax.lax.scan(body, jnp.zeros_like(d[0]), (jnp.broadcast_to(phi, d.shape), bd))
  return out


def cumulative_error_scan(phi, b, d) -> jax.Array:
  """The closed form as a parallel prefix (associative) scan over affine maps."""
  phi = jnp.broadcast_to(_bcast(phi, d), d.shape)
  bd = _bcast(b, d) * d

  def combine(first, second):  # apply `first`, then `second`
    a1, u1 = first
    a2, u2 = second
    return a2 * a1, a2 * u1 + u2

  _, e = jax.lax.associative_scan(combine, (phi, bd))
  return e


def cumulative_error_solve(phi, b, d) -> jax.Array:
  """The closed form as a lower-bidiagonal system (I - S diag(phi)) e = B d per channel."""
  n = d.shape[0]
  c = d.shape[-1]
  phi = jnp.broadcast_to(jnp.asarray(phi).reshape(n, -1), (n, c))
  u = (_bcast(b, d) * d).reshape(n, -1, c)                       # [N, M, C]
  eye = jnp.eye(n, dtype=d.dtype)
  shift = jnp.eye(n, k=-1, dtype=d.dtype)

  def solve_channel(phi_c, u_c):                                  # [N], [N, M]
    lower = eye - shift * phi_c[:, None]                          # row i: e_i - phi_i e_{i-1}
    return jax.scipy.linalg.solve_triangular(lower, u_c, lower=True, unit_diagonal=True)

  e = jax.vmap(solve_channel, in_axes=(1, 2), out_axes=2)(phi, u)
  return e.reshape(d.shape)


# ----------------------------------------------------------------------------- report

def rms_per_step(x):
  """RMS per pixel of each step's entry of a [N, ...] stack."""
  return jnp.sqrt(jnp.mean(x.reshape(x.shape[0], -1) ** 2, axis=1))


def _corr(p, m):
  p = p.reshape(p.shape[0], -1)
  m = m.reshape(m.shape[0], -1)
  p = p - p.mean(1, keepdims=True)
  m = m - m.mean(1, keepdims=True)
  return jnp.sum(p * m, 1) / jnp.sqrt(jnp.sum(p * p, 1) * jnp.sum(m * m, 1) + 1e-30)


def propagation_report(trace: PropagationTrace, a, b, phi) -> Dict[str, np.ndarray]:
  """Per step: measured vs predicted cumulative error (RMS, relative error, correlation).

  * `closed_form`: the diagonal-phi closed form driven by the measured d_i alone.
  * `one_step_jvp`: a_i e_i + b_i J_i e_i + b_i d_i from the measured e_i (the exact
    first-order model, one step ahead): how well linearisation holds.
  """
  return {k: to_host(v) for k, v in report_arrays(trace, a, b, phi).items()}


def report_arrays(trace: PropagationTrace, a, b, phi) -> Dict[str, jax.Array]:
  """`propagation_report` as device arrays (traceable: jit it with the joint run)."""
  measured = trace.e_next
  closed = cumulative_error_solve(phi, b, trace.d)
  one_step = _bcast(a, trace.e) * trace.e + _bcast(b, trace.e) * (trace.jvp + trace.d)
  rel = lambda p: rms_per_step(p - measured) / jnp.maximum(rms_per_step(measured), 1e-30)
  out = {
      "measured_rms": rms_per_step(measured),
      "closed_form_rms": rms_per_step(closed),
      "closed_form_rel_err": rel(closed),
      "closed_form_corr": _corr(closed, measured),
      "one_step_jvp_rel_err": rel(one_step),
      "per_step_error_rms": rms_per_step(_bcast(b, trace.d) * trace.d),
  }
  return out
