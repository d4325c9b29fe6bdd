"""SVDQuant-class base PTQ: group-wise W4A4, SmoothQuant migration, low-rank branch, bias
correction; each checked against what it must preserve or remove."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from tac_jax import quant
from tac_jax.quant import groupwise, int_ops


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x, t=None):
    x = nn.silu(nn.Conv(24, (3, 3), name="conv1")(x))
    x = nn.silu(nn.Conv(24, (3, 3), strides=(2, 2), name="down")(x))
    x = nn.Dense(16, name="proj")(x)
    return nn.Conv(3, (3, 3), name="conv_out")(x)


def _model(seed=0, shape=(4, 10, 10, 5)):
  model = ConvNet()
  x = jax.random.normal(jax.random.key(seed), shape)
  # An outlier channel, as in diffusion UNets: what smoothing and the low-rank branch target.
  x = x.at[..., 1].multiply(20.0)
  params = model.init(jax.random.key(1), x)["params"]
  calib = [(x[i:i + 2] * (1 + 0.1 * i), None) for i in range(0, 4, 2)]
  return model, params, x, calib


@pytest.mark.parametrize("stride,padding", [(1, "SAME"), (2, "SAME"), (1, "VALID")])
def test_conv_as_a_matmul_over_patches(stride, padding):
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 5))
  k = jax.random.normal(jax.random.key(1), (3, 3, 5, 7))
  pads = lax.padtype_to_pads((9, 9), (3, 3), (stride, stride), padding)
  want = int_ops.float_conv(x, k, (stride, stride), pads)
  got = groupwise.conv_patches(x, (3, 3), (stride, stride), pads, (1, 1)) @ \
      groupwise.conv_matrix(k)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_group_product_integer_path_equals_fake_quant_in_the_integer_domain():
  x = jax.random.normal(jax.random.key(2), (6, 40))
  w = jax.random.normal(jax.random.key(3), (40, 9))
  wq, ws = groupwise.quantize_weight_groups(w, 4, 16)          # K = 40 -> 48 padded
  xq, xs = groupwise.quantize_tokens(x, 4, 16)
  assert wq.shape == (48, 9) and ws.shape == (3, 9) and xq.shape == (6, 3, 16)
  assert int(jnp.max(jnp.abs(wq))) <= 7 and int(jnp.max(jnp.abs(xq))) <= 7
  # int32 partial sums per group are the exact integer products.
  acc = lax.dot_general(xq, wq.reshape(3, 16, 9), (((2,), (1,)), ((1,), (0,))),
                        preferred_element_type=jnp.int32)
  exact = jnp.einsum("tgk,gkn->gtn", xq.astype(jnp.float32),
                     wq.reshape(3, 16, 9).astype(jnp.float32))
  np.testing.assert_array_equal(acc, exact.astype(jnp.int32))
  np.testing.assert_allclose(groupwise.group_dot_int(xq, xs, wq, ws),
                             groupwise.group_dot_fake(xq, xs, wq, ws), rtol=1e-5, atol=1e-5)
  # and the product approximates the float one (4-bit groups of 16: a few % error).
  y = groupwise.group_dot_fake(xq, xs, wq, ws)
  assert float(jnp.linalg.norm(y - x @ w) / jnp.linalg.norm(x @ w)) < 0.25


def test_smoothing_leaves_the_float_function_unchanged():
  model, params, x, calib = _model()
  k = params["conv1"]["kernel"]
  s = groupwise.smooth_scales(jnp.max(jnp.abs(x.reshape(-1, 5)), 0), k, 0.5)
  rows = groupwise.channel_of_row(k.shape)
  w_smoothed = groupwise.conv_matrix(k) * s[rows][:, None]
  pads = lax.padtype_to_pads((10, 10), (3, 3), (1, 1), "SAME")
  y = groupwise.conv_patches(x / s, (3, 3), (1, 1), pads, (1, 1)) @ w_smoothed
  np.testing.assert_allclose(y, int_ops.float_conv(x, k, (1, 1), pads), rtol=1e-4, atol=1e-3)
  assert float(s[1]) > 3 * float(jnp.median(s))   # the outlier channel is scaled down most


def test_low_rank_split_reconstructs_and_takes_the_outliers():
  w = jax.random.normal(jax.random.key(4), (64, 32)) * 0.05
  w = w.at[:, 3].add(2.0).at[7].add(1.5)                         # rank-2 outliers
  l1, l2, r = groupwise.low_rank_split(w, 4)
  np.testing.assert_allclose(l1 @ l2 + r, w, rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(r))) < 0.3 * float(jnp.max(jnp.abs(w)))


def _errors(model, params, x, calib, **kw):
  y = model.apply({"params": params}, x)
  qm = quant.quantize_model(model, params, calib, quant.QuantConfig(w_bits=4, a_bits=4, **kw))
  yf, yi = qm(x, mode="fake"), qm(x, mode="int")
  np.testing.assert_allclose(yi, yf, rtol=1e-3, atol=1e-3)
  return float(jnp.linalg.norm(yf - y) / jnp.linalg.norm(y)), qm


def test_svdquant_ladder_on_a_conv_net_with_an_outlier_channel():
  model, params, x, calib = _model()
  plain, _ = _errors(model, params, x, calib)
  group, _ = _errors(model, params, x, calib, group_size=8)
  smooth, _ = _errors(model, params, x, calib, group_size=8, smooth_alpha=0.5)
  svd, qm = _errors(model, params, x, calib, group_size=8, smooth_alpha=0.5, low_rank=4)
  assert group < plain and svd < plain, (plain, group, smooth, svd)
  assert min(smooth, svd) < group
  mem = qm.memory_report(params)
  assert mem["low_rank_float32"] > 0 and mem["layers_overhead"] > 0
  assert mem["layers_stored"] <= 1.1 * mem["layers_float32"] / 8   # padding to groups


def test_bias_correction_removes_the_mean_output_error():
  model, params, x, calib = _model()
  y = model.apply({"params": params}, calib[0][0])
  qm0 = quant.quantize_model(model, params, calib, quant.QuantConfig(w_bits=4, a_bits=8))
  qm1 = quant.quantize_model(model, params, calib,
                             quant.QuantConfig(w_bits=4, a_bits=8, bias_correction=True))
  bias0 = jnp.abs(jnp.mean(qm0(calib[0][0]) - y, axis=(0, 1, 2)))
  bias1 = jnp.abs(jnp.mean(qm1(calib[0][0]) - y, axis=(0, 1, 2)))
  assert float(jnp.mean(bias1)) < 0.7 * float(jnp.mean(bias0))
  assert "bias_corr" in qm1.variables["quant"]["conv1"]


def test_group_path_lowers_to_s8_dot_with_int32_accumulation():
  model, params, x, calib = _model()
  qm = quant.quantize_model(model, params, calib,
                            quant.QuantConfig(w_bits=4, a_bits=4, group_size=8, low_rank=2))
  hlo = jax.jit(qm.apply_fn("int")).lower(qm.variables, x).as_text()
  dots = [l for l in hlo.splitlines() if "dot_general" in l and "xi8" in l]
  assert dots and all("xi32>" in l.split("->")[-1] for l in dots), dots[:2]


def test_options_that_need_groups_say_so():
  with pytest.raises(ValueError, match="set group_size"):
    quant.QuantConfig(low_rank=8)
  with pytest.raises(ValueError, match="smooth_alpha in"):
    quant.QuantConfig(group_size=8, smooth_alpha=1.5)
