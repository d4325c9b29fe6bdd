"""Conditioned models and classifier-free guidance (tac_jax.diffusion.guidance): the guided
output against two separate calls, one network call per step, PTQ of a conditioned DiT on
the batches guidance really makes, TCEC on the guided output end to end, the main job's
factory, and the errors for bad inputs. Tiny random DiT (8x8x4, patch 2, 2 layers, 2 heads
x 8, 10 classes, learned sigma)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tac_jax import compensation, metrics, quant
from tac_jax.app import stages
from tac_jax.diffusion import guidance, samplers, schedules
from tac_jax.diffusion.guidance import Condition
from tac_jax.models import dit, dit_factory

CFG = dit_factory.TINY
NULL = CFG.null_class_label
SCALE = 4.0
B = 4


@pytest.fixture(scope="module")
def tiny():
  module, params = dit.init_dit(CFG, jax.random.key(0))
  return module, params, dit_factory.EpsilonApply(module.apply, CFG)


def _inputs(seed, b=B):
  x = jax.random.normal(jax.random.key(seed), (b, 8, 8, 4))
  return x, jnp.full((b,), 600, jnp.int32), jnp.arange(b, dtype=jnp.int32) % 10


@pytest.mark.parametrize("w", [0.0, 1.0, 4.0])
def test_guided_output_equals_two_separate_calls(tiny, w):
  _, params, eps = tiny
  x, t, labels = _inputs(1)
  v = {"params": params}
  g = guidance.guided(eps, Condition(labels), Condition(jnp.full((B,), NULL)), w)
  got = jax.jit(g.apply)(g.bind(v), x, t)
  eps_c, eps_u = eps(v, x, t, labels), eps(v, x, t, jnp.full((B,), NULL, jnp.int32))
  assert got.shape == x.shape
  np.testing.assert_allclose(got, eps_u + w * (eps_c - eps_u), atol=2e-5, rtol=1e-5)
  # A batch-1 null condition is broadcast; the factory's module gives the same output.
  g1 = guidance.guided(eps, labels, jnp.array([NULL]), w)
  np.testing.assert_allclose(g1.apply(g1.bind(v), x, t), got, atol=2e-5)
  module = dit_factory.guided_module(CFG, tuple(int(y) for y in labels), w)
  np.testing.assert_allclose(module.apply({"params": {"dit": params}}, x, t), got, atol=2e-5)


@pytest.mark.parametrize("w,calls", [(1.0, [B]), (None, [B]), (0.0, [B]), (4.0, [2 * B])])
def test_one_batched_network_call_per_evaluation(tiny, w, calls):
  _, params, eps = tiny
  seen = []

  def counted(variables, x, t, cond):
    seen.append((x.shape[0], t.shape[0], cond.shape[0]))
    return eps(variables, x, t, cond)

  x, t, labels = _inputs(2)
  g = guidance.guided(counted, labels, jnp.full((B,), NULL), w)
  jax.jit(g.apply).lower(g.bind({"params": params}), x, t)     # traces once
  assert seen == [(n, n, n) for n in calls]
  u = guidance.unconditional(counted, labels)
  seen.clear()
  jax.eval_shape(u.apply, u.bind({"params": params}), x, t)
  assert seen == [(B, B, B)]


def _masked_toy(variables, x, t, value, mask):
  """A caption-conditioned toy: eps = v x * (mean of the kept tokens' embeddings)."""
  keep = mask.astype(jnp.float32)[..., None]
  mean = jnp.sum(value * keep, axis=(1, 2)) / jnp.sum(keep, axis=(1, 2))
  return variables * x * mean[:, None, None, None]


def test_masked_conditions_travel_with_their_masks():
  """PixArt-style (embeddings [B, L, D], mask [B, L]): the null is broadcast, both batched."""
  x, t = jax.random.normal(jax.random.key(9), (2, 4, 4, 3)), jnp.full((2,), 300, jnp.int32)
  emb = jax.random.normal(jax.random.key(10), (2, 5, 6))
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  null = Condition(jnp.full((1, 5, 6), 0.3), jnp.ones((1, 5), jnp.int32))
  g = guidance.guided(_masked_toy, Condition(emb, mask), null, 3.0)
  got = g.apply(g.bind(jnp.float32(0.5)), x, t)
  eps_u = _masked_toy(0.5, x, t, jnp.full((2, 5, 6), 0.3), jnp.ones((2, 5)))
  np.testing.assert_allclose(got, guidance.combine(_masked_toy(0.5, x, t, emb, mask), eps_u, 3.0),
                             rtol=1e-5, atol=1e-6)
  batches = guidance.calibration_batches(jnp.stack([x, x]), samplers.StepCoeffs(
      jnp.array([300, 200]), *(jnp.ones(2),) * 3), Condition(emb, mask), null, 3.0)
  shapes = [tuple(np.shape(a) for a in b) for b in batches]
  assert shapes == [((4, 4, 4, 3), (), (4, 5, 6), (4, 5))] * 2
  # cycle=True: any batch of samples, sample i on condition row i % 2 (tcec_safe's halves).
  x3 = jnp.concatenate([x, x[:1]])
  cyc = guidance.guided(_masked_toy, Condition(emb, mask), null, 3.0, cycle=True)
  want = guidance.guided(_masked_toy, Condition(emb[jnp.array([0, 1, 0])],
                                                mask[jnp.array([0, 1, 0])]), null, 3.0)
  np.testing.assert_allclose(cyc.apply(cyc.bind(0.5), x3, t[0]),
                             want.apply(want.bind(0.5), x3, t[0]))
  with pytest.raises(ValueError, match="cycle=True"):
    g.apply(g.bind(0.5), x3, t[0])
  g = guidance.guided(_masked_toy, Condition(emb, mask), Condition(jnp.zeros((1, 5, 6))), 3.0)
  with pytest.raises(ValueError, match="must both have a mask or neither"):
    g.apply(g.bind(0.5), x, t)
  g = guidance.guided(_masked_toy, Condition(emb, mask[:1]), null, 3.0)
  with pytest.raises(ValueError, match="mask has shape"):
    g.apply(g.bind(0.5), x, t)


def _psnr(x, ref):
  return float(jnp.mean(metrics.psnr(x, ref, data_range=float(jnp.ptp(ref)))))


def test_quantized_guided_dit_with_tcec_end_to_end(tiny):
  """W8A8 PTQ of the bare DiT on the (x, t, labels) batches CFG feeds it, then TCEC fitted
  on the guided outputs (float vs quantized) and applied online, DDIM 6 steps."""
  module, params, eps = tiny
  sampler = samplers.ddim(schedules.make_schedule("linear", 1000), 6)
  x_cal, key_cal = jax.random.normal(jax.random.key(3), (8, 8, 8, 4)), jax.random.key(4)
  y_cal = jnp.arange(8, dtype=jnp.int32) % 10
  null = Condition(jnp.full((1,), NULL, jnp.int32))
  g_fp = guidance.guided(eps, y_cal, null, SCALE)
  fp = compensation.Net(g_fp.apply, g_fp.bind({"params": params}))
  _, traj = samplers.sample(fp.apply, fp.variables, sampler, x_cal, key_cal, return_trajectory=True)
  calib = guidance.calibration_batches(traj, sampler.coeffs, y_cal, null, SCALE)
  assert calib[0][0].shape[0] == 16 and calib[0][2].shape == (16,)
  qm = quant.quantize_model(module, params, calib, quant.QuantConfig(w_bits=8, a_bits=8), 1000)
  q_eps = dit_factory.EpsilonApply(qm.apply_fn("fake"), CFG)
  g_q = guidance.guided(q_eps, y_cal, null, SCALE)
  q = compensation.Net(g_q.apply, g_q.bind(qm.variables))
  cal = compensation.calibrate(fp, q, sampler, x_cal, key_cal, method="tcec")
  online = compensation.online_sampler("tcec", sampler, cal.params, q)
  # Held-out seeds and labels: equal (static) applies, other conditions in the variables.
  x_ev, key_ev = jax.random.normal(jax.random.key(5), (8, 8, 8, 4)), jax.random.key(6)
  y_ev = (jnp.arange(8, dtype=jnp.int32) * 3 + 1) % 10
  g_fp_ev, g_q_ev = (guidance.guided(e, y_ev, null, SCALE) for e in (eps, q_eps))
  assert g_fp_ev.apply == g_fp.apply and hash(g_q_ev.apply) == hash(g_q.apply)
  v_fp, v_q = g_fp_ev.bind({"params": params}), g_q_ev.bind(qm.variables)
  run = lambda apply, v, s: jax.jit(lambda v: samplers.sample(apply, v, s, x_ev, key_ev)[0].x)(v)
  ref, plain = run(g_fp.apply, v_fp, sampler), run(g_q.apply, v_q, sampler)
  tcec = run(g_q.apply, v_q, online)
  assert all(bool(jnp.all(jnp.isfinite(s))) for s in (ref, plain, tcec))
  assert _psnr(tcec, ref) > _psnr(plain, ref) + 1.0, (_psnr(tcec, ref), _psnr(plain, ref))


def test_factory_runs_through_the_main_jobs_loader():
  model = stages.model_from_factory("tac_jax.models.dit_factory:tiny")
  assert model.shape == (8, 8, 4) and model.schedule.num_timesteps == 1000
  x, t, _ = _inputs(7, 3)
  y = model.module.apply(model.variables, x, t)
  assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))
  # Through PTQ's plain (x, t) path: the wrapper makes the guided 2B call itself.
  qm = quant.quantize_model(model.module, model.params, [(x, 600)], quant.QuantConfig(), 1000)
  assert all(p.startswith("dit/") for p in qm.specs)
  rel = float(jnp.sqrt(jnp.mean((qm(x, t) - y) ** 2) / jnp.mean(y ** 2)))
  assert 0 < rel < 0.1, rel      # W8A8 of the guided output (the error is amplified ~w)


def test_bad_inputs_raise_readable_errors(tiny):
  module, params, eps = tiny
  x, t, labels = _inputs(8)
  v = {"params": params}
  g = guidance.guided(eps, labels[:3], jnp.full((B,), NULL), SCALE)
  with pytest.raises(ValueError, match="conditional condition has batch 3 but x has 4"):
    g.apply(g.bind(v), x, t)
  g = guidance.guided(eps, labels, jnp.full((2,), NULL), SCALE)
  with pytest.raises(ValueError, match="null condition has batch 2 but x has 4"):
    g.apply(g.bind(v), x, t)
  for bad in (-1.0, float("nan"), "strong"):
    with pytest.raises(ValueError, match="guidance scale must be a finite number >= 0"):
      guidance.guided(eps, labels, jnp.full((B,), NULL), bad)
  with pytest.raises(ValueError, match="needs a null condition"):
    guidance.guided(eps, labels, None, SCALE)
  with pytest.raises(ValueError, match="GuidedVariables"):
    g.apply(v, x, t)
  with pytest.raises(ValueError, match="guidance scale must be"):
    dit_factory.guided_module(CFG, (1, 2), -2.0)
  with pytest.raises(ValueError, match=r"class indices in \[0, 10\)"):
    dit_factory.guided_module(CFG, (3, 10), SCALE)
  # PTQ: condition rows must match x, and every batch must carry the same conditions.
  with pytest.raises(ValueError, match="x has 4 samples but a condition array has shape"):
    quant.quantize_model(module, params, [(x, 600, labels[:2])], quant.QuantConfig())
  with pytest.raises(ValueError, match="batch 1 has conditions"):
    quant.quantize_model(module, params, [(x, 600, labels), (x, 600)], quant.QuantConfig())
  with pytest.raises(ValueError, match=r"must be a tuple \(x, t\) or \(x, t, \*cond\)"):
    quant.quantize_model(module, params, [x], quant.QuantConfig())
