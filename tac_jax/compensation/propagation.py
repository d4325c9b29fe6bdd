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

A multistep step (DPM-Solver++ 2M, Heun: x_{i+1} = a_i x_i + b_i eps_i + c_i eps_{i-1} +
d_i x_{i-1}) feeds each per-step error into two steps, and the error recurrence has two
terms (the "full form"; the paper's cached-output reading keeps only the first):

    e_{i+1} = phi_i e_i + psi_i e_{i-1} + b_i d_i + c_i d_{i-1},
    phi_i = a_i + b_i J_i,   psi_i = d_i + c_i J_{i-1},

whose closed form is one banded lower-triangular system per channel
(`cumulative_error_solve2`, checked against `cumulative_error_recurrence2`).
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


def _report(trace: PropagationTrace, closed, closed_j0, one_step, u) -> Dict[str, jax.Array]:
  measured = trace.e_next
  rel = lambda p: rms_per_step(p - measured) / jnp.maximum(rms_per_step(measured), 1e-30)
  return {
      "measured_rms": rms_per_step(measured),
      "closed_form_rms": rms_per_step(closed),
      "closed_form_rel_err": rel(closed),
      "closed_form_corr": _corr(closed, measured),
      "closed_form_j0_rel_err": rel(closed_j0),
      "one_step_jvp_rel_err": rel(one_step),
      "per_step_error_rms": rms_per_step(u),
  }


def report_arrays(trace: PropagationTrace, a, b, phi) -> Dict[str, jax.Array]:
  """`propagation_report` as device arrays (traceable: jit it with the joint run).
  `closed_form_j0_rel_err`: the closed form with the Jacobian ignored (phi = a)."""
  u = _bcast(b, trace.d) * trace.d
  # the parallel scan (equal to cumulative_error_solve): two triangular solves in this jitted
  # analysis hung XLA's CPU runtime on the shipped DiT (jax 0.10.2, 2 cores)
  closed = cumulative_error_scan(phi, b, trace.d)
  closed_j0 = cumulative_error_scan(a, b, trace.d)
  one_step = _bcast(a, trace.e) * trace.e + _bcast(b, trace.e) * (trace.jvp + trace.d)
  return _report(trace, closed, closed_j0, one_step, u)


def multistep_report_arrays(trace: PropagationTrace, coeffs, phi, psi) -> Dict[str, jax.Array]:
  """`report_arrays` of the two-term model (`fit_channel_gains2`): the closed form
  `cumulative_error_solve2`, its J ~ 0 reading (phi = a, psi = d), and the exact
  first-order step a e_i + d e_{i-1} + b (J_i e_i + d_i) + c (J_{i-1} e_{i-1} + d_{i-1})."""
  c, d = multistep_terms(coeffs)
  u = step_inputs(coeffs.b, c, trace.d)
  # the recurrence (equal to cumulative_error_solve2): two banded triangular solves in one
  # jitted analysis hung XLA's CPU runtime on the default model (jax 0.10.2, 2 cores)
  closed = cumulative_error_recurrence2(phi, psi, u)
  closed_j0 = cumulative_error_recurrence2(coeffs.a, d, u)
  e, prev = trace.e, _previous
  one_step = (_bcast(coeffs.a, e) * e + _bcast(d, e) * prev(e)
              + _bcast(coeffs.b, e) * (trace.jvp + trace.d)
              + _bcast(c, e) * (prev(trace.jvp) + prev(trace.d)))
  return _report(trace, closed, closed_j0, one_step, u)


# ----------------------------------------------------------------------------- two-term form

def multistep_terms(coeffs):
  """(c, d) of a multistep sampler's steps (x_{i+1} = a x_i + b eps_i + c eps_{i-1} +
  d x_{i-1}), zeros for a one-step sampler."""
  zeros = jnp.zeros_like(jnp.asarray(coeffs.a))
  return (jnp.asarray(getattr(coeffs, "c", zeros)), jnp.asarray(getattr(coeffs, "d", zeros)))


def _previous(x):
  """x shifted one step later along the leading axis (x_{i-1}; zeros at i = 0)."""
  return jnp.concatenate([jnp.zeros_like(x[:1]), x[:-1]], axis=0)


def step_inputs(b, c, d) -> jax.Array:
  """u_i = b_i d_i + c_i d_{i-1}: what step i's own and the previous step's per-step
  errors add to the cumulative error (c = 0 for one-step samplers)."""
  return _bcast(b, d) * d + _bcast(c, d) * _previous(d)


def fit_channel_gains2(trace: PropagationTrace, coeffs, min_energy: float = 1e-12,
                       min_rel_det: float = 1e-4):
  """Least-squares (phi_i, psi_i) per channel of the two-term model
  e_{i+1} - u_i ~ phi_i e_i + psi_i e_{i-1} ([N, C] each), fitted as deviations from the
  Jacobian-free gains (a_i, d_i).

  Where e_i and e_{i-1} are too close to collinear to tell the two gains apart (relative
  Gram determinant below `min_rel_det`, float32 sums), or e_{i-1} carries no error (the
  first steps), psi stays d_i and phi alone is fitted; where e_i carries none, phi = a_i.
  """
  c, d = multistep_terms(coeffs)
  e, e_prev = trace.e, _previous(trace.e)
  a_b, d_b = _bcast(coeffs.a, e), _bcast(d, e)
  r = trace.e_next - step_inputs(coeffs.b, c, trace.d) - a_b * e - d_b * e_prev
  axes = tuple(range(1, e.ndim - 1))
  dot = lambda u, v: jnp.sum(u * v, axis=axes)
  ee, pp, ep = dot(e, e), dot(e_prev, e_prev), dot(e, e_prev)
  re, rp = dot(r, e), dot(r, e_prev)
  det = ee * pp - ep * ep
  two = (pp > min_energy) & (det > min_rel_det * ee * pp)
  safe_det = jnp.where(two, det, 1.0)
  dphi2, dpsi2 = (re * pp - rp * ep) / safe_det, (rp * ee - re * ep) / safe_det
  dphi1 = jnp.where(ee > min_energy, re / jnp.maximum(ee, min_energy), 0.0)
  a_full = jnp.broadcast_to(jnp.asarray(coeffs.a)[:, None], ee.shape)
  d_full = jnp.broadcast_to(d[:, None], ee.shape)
  return (a_full + jnp.where(two, dphi2, dphi1), d_full + jnp.where(two, dpsi2, 0.0))


def cumulative_error_recurrence2(phi, psi, u) -> jax.Array:
  """e_{i+1} = phi_i e_i + psi_i e_{i-1} + u_i (e_0 = e_{-1} = 0), step by step; [N, ...]."""
  phi = jnp.broadcast_to(_bcast(phi, u), u.shape)
  psi = jnp.broadcast_to(_bcast(psi, u), u.shape)

  def body(carry, inputs):
    e, e_prev = carry
    p, q, v = inputs
    e_next = p * e + q * e_prev + v
    return (e_next, e), e_next

  zero = jnp.zeros_like(u[0])
  _, out = jax.lax.scan(body, (zero, zero), (phi, psi, u))
  return out


def cumulative_error_solve2(phi, psi, u) -> jax.Array:
  """The two-term closed form as one banded lower-triangular system per channel,
  (I - S diag(phi) - S^2 diag(psi)) e = u, with S the one-step shift: row i reads
  e_{i+1} - phi_i e_i - psi_i e_{i-1} = u_i."""
  n, c = u.shape[0], u.shape[-1]
  phi = jnp.broadcast_to(jnp.asarray(phi).reshape(n, -1), (n, c))
  psi = jnp.broadcast_to(jnp.asarray(psi).reshape(n, -1), (n, c))
  flat = u.reshape(n, -1, c)
  eye = jnp.eye(n, dtype=u.dtype)
  s1, s2 = jnp.eye(n, k=-1, dtype=u.dtype), jnp.eye(n, k=-2, dtype=u.dtype)

  def solve_channel(phi_c, psi_c, u_c):
    lower = eye - s1 * phi_c[:, None] - s2 * psi_c[:, None]
    return jax.scipy.linalg.solve_triangular(lower, u_c, lower=True, unit_diagonal=True)

  e = jax.vmap(solve_channel, in_axes=(1, 1, 2), out_axes=2)(phi, psi, flat)
  return e.reshape(u.shape)
