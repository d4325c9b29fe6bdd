"""Quantization core: quantizers, observers, int4 storage, integer kernels, injection."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tac_jax import quant
from tac_jax.quant import core, int_ops, observers, presets


def _key(i=0):
  return jax.random.key(i)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_round_trip_error_bounded_by_half_scale_and_clips_outside(bits, symmetric):
  x = jax.random.uniform(_key(), (1000,), minval=-3.0, maxval=2.0)
  qp = observers.minmax(x, bits, symmetric=symmetric)
  err = jnp.abs(core.dequantize(core.quantize(x, qp), qp) - x)
  assert float(jnp.max(err)) <= float(qp.scale) / 2 + 1e-6
  lo, hi = core.clip_range(qp)
  outside = jnp.array([float(lo) - 10.0, float(hi) + 10.0])
  np.testing.assert_allclose(core.fake_quant(outside, qp), [lo, hi], rtol=1e-6)
  q = core.quantize(x, qp)
  assert q.dtype == jnp.int8 and int(q.min()) >= qp.qmin and int(q.max()) <= qp.qmax


def test_per_channel_beats_per_tensor_on_uneven_channels():
  ranges = jnp.array([0.01, 0.1, 1.0, 10.0])
  x = jax.random.normal(_key(1), (256, 4)) * ranges
  def err(qp):  # mean over channels of the relative (per-channel) error
    return float(jnp.mean(jnp.mean((core.fake_quant(x, qp) - x) ** 2, 0) / jnp.var(x, 0)))
  assert err(observers.minmax(x, 4, axis=-1)) < 0.1 * err(observers.minmax(x, 4, axis=None))


def test_mse_observer_beats_minmax_on_heavy_tails():
  x = jax.random.t(_key(2), 3.0, (20000,))  # Student-t, 3 degrees of freedom
  def err(qp):
    return float(jnp.mean((core.fake_quant(x, qp) - x) ** 2))
  assert err(observers.mse(x, 4)) < 0.5 * err(observers.minmax(x, 4))
  assert err(observers.percentile(x, 4, p=99.9)) < err(observers.minmax(x, 4))


def test_observers_are_deterministic():
  x = jax.random.normal(_key(3), (64, 8))
  for name in observers.OBSERVERS:
    a = observers.get_observer(name)(x, 4, axis=1, symmetric=False)
    b = observers.get_observer(name)(x, 4, axis=1, symmetric=False)
    np.testing.assert_array_equal(a.scale, b.scale)
    np.testing.assert_array_equal(a.zero_point, b.zero_point)


@pytest.mark.parametrize("n", [6, 7])
def test_int4_pack_round_trip_exact(n):
  q = jax.random.randint(_key(4), (5, n), -8, 8).astype(jnp.int8)
  packed = core.pack_int4(q)
  assert packed.dtype == jnp.int8 and packed.shape == (5, (n + 1) // 2)
  np.testing.assert_array_equal(core.unpack_int4(packed, n), q)


def test_ste_gradient_identity_inside_zero_outside():
  qp = core.params_from_range(-1.0, 1.0, 8, symmetric=True)
  x = jnp.array([-5.0, -0.5, 0.0, 0.3, 0.99, 5.0])
  g = jax.grad(lambda x: jnp.sum(core.fake_quant(x, qp)))(x)
  np.testing.assert_array_equal(g, [0.0, 1.0, 1.0, 1.0, 1.0, 0.0])


def _act_and_weight(key, x_shape, w_shape, a_bits=8, w_bits=8):
  kx, kw = jax.random.split(key)
  x = jax.nn.silu(jax.random.normal(kx, x_shape))  # asymmetric range, like a UNet
  w = jax.random.normal(kw, w_shape) * 0.2
  a_qp = observers.minmax(x, a_bits, symmetric=False)
  w_qp = observers.minmax(w, w_bits, axis=w.ndim - 1, symmetric=True)
  return x, w, a_qp, w_qp, core.quantize(w, w_qp)


@pytest.mark.parametrize("a_bits,w_bits", [(8, 8), (4, 4)])
def test_int_dot_equals_fake_quant(a_bits, w_bits):
  x, w, a_qp, w_qp, wq = _act_and_weight(_key(5), (16, 32), (32, 24), a_bits, w_bits)
  xq = core.quantize(x, a_qp)
  # Exact in the integer domain.
  acc = int_ops.int_dot(xq, wq) - a_qp.zero_point * int_ops.weight_sums(wq)
  exact = (xq.astype(jnp.float32) - a_qp.zero_point) @ wq.astype(jnp.float32)
  np.testing.assert_array_equal(acc, exact.astype(jnp.int32))
  # Float tolerance after rescale.
  y_int = int_ops.quantized_dense(x, a_qp, wq, w_qp.scale.reshape(-1), int_ops.weight_sums(wq))
  y_fake = core.fake_quant(x, a_qp) @ core.dequantize(wq, w_qp)
  np.testing.assert_allclose(y_int, y_fake, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_int_conv_equals_fake_quant_including_borders(stride):
  x, w, a_qp, w_qp, wq = _act_and_weight(_key(6), (2, 9, 9, 5), (3, 3, 5, 7))
  pads = tuple(jax.lax.padtype_to_pads((9, 9), (3, 3), (stride, stride), "SAME"))
  y_int = int_ops.quantized_conv(x, a_qp, wq, w_qp.scale.reshape(-1), int_ops.weight_sums(wq),
                                 (stride, stride), pads)
  y_fake = int_ops.float_conv(core.fake_quant(x, a_qp), core.dequantize(wq, w_qp),
                              (stride, stride), pads)
  np.testing.assert_allclose(y_int, y_fake, rtol=1e-5, atol=1e-5)
  # Exact integers: zero-point-shifted input, zero padded.
  xs = core.quantize(x, a_qp).astype(jnp.float32) - a_qp.zero_point
  exact = int_ops.float_conv(xs, wq.astype(jnp.float32), (stride, stride), pads)
  acc = int_ops.int_conv(core.quantize(x, a_qp), wq, (stride, stride), pads,
                         pad_value=a_qp.zero_point) - a_qp.zero_point * int_ops.weight_sums(wq)
  np.testing.assert_array_equal(acc, exact.astype(jnp.int32))


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x, t=None):
    x = nn.silu(nn.Dense(64, name="fc1")(x))
    x = nn.silu(nn.Dense(64, name="fc2")(x))
    return nn.Dense(8, name="out")(x)


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x, t=None):
    x = nn.silu(nn.Conv(16, (3, 3), name="conv1")(x))
    x = nn.silu(nn.Conv(16, (3, 3), strides=(2, 2), name="down")(x))
    x = nn.silu(nn.Conv(16, (1, 1), name="mix")(x))
    return nn.Conv(3, (3, 3), name="conv_out")(x)


def _rel_err(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("model_cls,shape", [(MLP, (32, 16)), (ConvNet, (4, 12, 12, 3))])
def test_flax_model_quantized_error_and_ordering(model_cls, shape):
  model = model_cls()
  x = jax.random.normal(_key(7), shape)
  params = model.init(_key(8), x)["params"]
  y = model.apply({"params": params}, x)
  calib = [(jax.random.normal(jax.random.key(10 + i), shape), None) for i in range(4)]
  errs = {}
  for w, a in [(8, 8), (4, 8), (4, 4)]:
    qm = quant.quantize_model(model, params, calib, quant.QuantConfig(w_bits=w, a_bits=a))
    y_fake, y_int = qm(x, mode="fake"), qm(x, mode="int")
    np.testing.assert_allclose(y_int, y_fake, rtol=1e-4, atol=1e-4)
    errs[(w, a)] = _rel_err(y_fake, y)
  assert errs[(8, 8)] < 0.03  # stated W8A8 bound: 3 % relative error
  assert errs[(8, 8)] < errs[(4, 8)] < errs[(4, 4)]


def test_quantized_model_stores_packed_int4_and_drops_float_kernels():
  model = MLP()
  x = jax.random.normal(_key(9), (8, 16))
  params = model.init(_key(8), x)["params"]
  qm = quant.quantize_model(model, params, [(x, None)],
                            quant.QuantConfig(w_bits=4, a_bits=8, keep_8bit="^out$"))
  q = qm.variables["quant"]
  assert q["fc1"]["w"].shape == (16, 32) and q["fc1"]["w"].dtype == jnp.int8  # packed
  assert q["out"]["w"].shape == (64, 8)  # kept at 8 bits
  assert "kernel" not in qm.variables["params"]["fc1"]
  report = qm.memory_report(params)
  assert report["layers_stored"] < report["layers_int8"] < report["layers_float32"]


def test_integer_path_lowers_to_s8_dot_and_convolution():
  model = ConvNet()
  x = jax.random.normal(_key(11), (2, 8, 8, 3))
  params = model.init(_key(8), x)["params"]
  qm = quant.quantize_model(model, params, [(x, None)], quant.QuantConfig())
  hlo = jax.jit(qm.apply_fn("int")).lower(qm.variables, x).as_text()
  assert "convolution" in hlo
  conv_lines = [l for l in hlo.splitlines() if "convolution" in l and "xi8" in l]
  assert conv_lines and all("xi32" in l for l in conv_lines), conv_lines[:2]
  mlp = MLP()
  xd = jax.random.normal(_key(12), (4, 16))
  pd = mlp.init(_key(8), xd)["params"]
  qd = quant.quantize_model(mlp, pd, [(xd, None)], quant.QuantConfig())
  hlo = jax.jit(qd.apply_fn("int")).lower(qd.variables, xd).as_text()
  dots = [l for l in hlo.splitlines() if "dot_general" in l and "xi8" in l]
  assert dots and all("-> tensor<4x64xi32>" in l or "xi32>" in l for l in dots), dots[:2]


def test_timestep_grouped_activation_ranges():
  model = MLP()
  x_small = jax.random.normal(_key(13), (16, 16)) * 0.1
  x_big = jax.random.normal(_key(14), (16, 16)) * 10.0
  params = model.init(_key(8), x_small)["params"]
  cfg = quant.QuantConfig(time_groups=2)
  qm = quant.quantize_model(model, params, [(x_small, 100), (x_big, 900)], cfg,
                            num_timesteps=1000)
  s = qm.variables["quant"]["fc1"]["a_scale"]
  assert s.shape == (2,) and float(s[1]) > 20 * float(s[0])


@pytest.mark.parametrize("bad", [1, 9, 0, 16])
def test_bits_outside_range_rejected(bad):
  with pytest.raises(ValueError, match="bits"):
    observers.minmax(jnp.ones(4), bad)
  with pytest.raises(ValueError, match="bits"):
    quant.QuantConfig(w_bits=bad)


def test_bad_inputs_have_clear_errors():
  x = jnp.ones((4, 3))
  with pytest.raises(ValueError, match="axis 2 is out of range"):
    observers.minmax(x, 8, axis=2)
  with pytest.raises(ValueError, match="empty"):
    observers.minmax(jnp.zeros((0,)), 8)
  with pytest.raises(ValueError, match="NaN/inf"):
    observers.mse(jnp.array([1.0, jnp.nan]), 8)
  qp = observers.minmax(jnp.ones((4, 3)), 8, axis=1)
  with pytest.raises(ValueError, match="does not match tensor shape"):
    core.quantize(jnp.ones((4, 5)), qp)
  model = MLP()
  params = model.init(_key(0), jnp.ones((2, 16)))["params"]
  with pytest.raises(ValueError, match="no calibration data"):
    quant.quantize_model(model, params, [], quant.QuantConfig())
  with pytest.raises(ValueError, match="NaN/inf"):
    quant.quantize_model(model, params, [(jnp.full((2, 16), jnp.inf), None)], quant.QuantConfig())
  with pytest.raises(ValueError, match="unknown observer"):
    quant.QuantConfig(a_observer="kl")
  with pytest.raises(ValueError, match=r"timestep 1000 outside the schedule \[0, 999\]"):
    quant.quantize_model(model, params, [(jnp.ones((2, 16)), 1000)], quant.QuantConfig(),
                         num_timesteps=1000)


class _WithTranspose(nn.Module):
  @nn.compact
  def __call__(self, x, t=None):
    x = nn.Conv(8, (3, 3), name="conv")(x)
    x = nn.ConvTranspose(8, (3, 3), strides=(2, 2), name="up")(nn.relu(x) - 0.3)
    x = nn.ConvTranspose(6, (2, 2), strides=(2, 2), padding="VALID", name="up_valid")(x)
    x = nn.ConvTranspose(4, (3, 3), strides=(1, 2), padding=((1, 2), (0, 1)),
                         kernel_dilation=(1, 2), name="up_explicit")(x)
    return nn.Conv(3, (3, 3), name="skip_me")(x)


def test_layers_left_in_float_are_listed_with_the_reason():
  model = _WithTranspose()
  x = jax.random.normal(_key(3), (2, 6, 6, 3))
  params = model.init(_key(4), x)["params"]
  qm = quant.quantize_model(model, params, [(x, None)], quant.QuantConfig(exclude="^skip_me$"))
  assert set(qm.specs) == {"conv", "up", "up_valid", "up_explicit"}
  assert qm.float_layers == {"skip_me": "excluded by QuantConfig.include / exclude"}
  group = quant.quantize_model(model, params, [(x, None)], quant.QuantConfig(group_size=4))
  assert set(group.float_layers) == {"up", "up_valid", "up_explicit"}
  assert "group-wise presets leave it in float" in group.float_layers["up"]


class _Heads(nn.Module):
  """Attention-style projections: [D] -> [H, Dh] and [H, Dh] -> [D] (flax DenseGeneral)."""
  @nn.compact
  def __call__(self, x, t=None):
    h = nn.DenseGeneral((4, 8), name="qkv")(x)
    h = nn.silu(h)
    y = nn.DenseGeneral(16, axis=(-2, -1), name="out")(h)
    return y + nn.DenseGeneral((2, 8), axis=-1, batch_dims=(0,), name="odd")(x).reshape(y.shape)


@pytest.mark.parametrize("preset", ["minmax", "minmax_bc", "svdquant_bc"])
def test_dense_general_layers_are_quantized_as_2d_matrices(preset):
  """flax DenseGeneral (attention q/k/v/out) runs as a Dense on its flattened contracted
  axes: quantized at every preset, int path equal to fake-quant, close to float at W8A8;
  one with batch_dims stays in float with the reason."""
  model = _Heads()
  x = jax.random.normal(_key(5), (3, 6, 16))
  params = model.init(_key(6), x)["params"]
  calib = [(jax.random.normal(jax.random.key(20 + i), x.shape), None) for i in range(3)]
  cfg = presets.quant_config({**presets.quant_defaults(), "group_size": 8, "low_rank": 2},
                             8, 8, preset)
  qm = quant.quantize_model(model, params, calib, cfg)
  assert set(qm.specs) == {"qkv", "out"} and "batch_dims" in qm.float_layers["odd"]
  assert (qm.specs["qkv"].features, qm.specs["out"].in_axes) == ((4, 8), 2)
  assert qm.variables["quant"]["qkv"]["w"].shape == (16, 32)
  assert "kernel" not in qm.variables["params"]["out"]
  y = model.apply({"params": params}, x)
  y_fake, y_int = qm(x, mode="fake"), qm(x, mode="int")
  np.testing.assert_allclose(y_int, y_fake, rtol=1e-4, atol=1e-4)
  assert y_fake.shape == y.shape and _rel_err(y_fake, y) < 0.03


class _TransposedKernel(nn.Module):
  @nn.compact
  def __call__(self, x, t=None):
    h = nn.Conv(4, (3, 3), name="conv")(x)
    return nn.ConvTranspose(3, (3, 3), transpose_kernel=True, name="up_t")(h)


def test_conv_transpose_without_an_integer_path_is_listed_in_float_at_quantization():
  """A ConvTranspose with transpose_kernel=True is left in float when the model is
  quantized (and says so), not refused at its first quantized call."""
  model = _TransposedKernel()
  x = jax.random.normal(_key(7), (2, 5, 5, 3))
  params = model.init(_key(8), x)["params"]
  qm = quant.quantize_model(model, params, [(x, None)], quant.QuantConfig())
  assert set(qm.specs) == {"conv"}
  assert "transpose_kernel=True" in qm.float_layers["up_t"]
  y_float = model.apply({"params": params}, x)
  for mode in ("fake", "int"):
    y = qm(x, mode=mode)
    assert y.shape == y_float.shape and bool(jnp.all(jnp.isfinite(y)))


def test_conv_transpose_int_path_equals_fake_quant():
  """ConvTranspose (SAME, VALID, explicit padding, kernel dilation, asymmetric int8 and
  4-bit weights): the s8 x s8 -> s32 path equals fake-quant, which tracks float."""
  model = _WithTranspose()
  x = jax.random.normal(_key(5), (2, 5, 5, 3))
  params = model.init(_key(6), x)["params"]
  y_float = model.apply({"params": params}, x)
  for w_bits in (8, 4):
    qm = quant.quantize_model(model, params, [(x, None)], quant.QuantConfig(w_bits=w_bits))
    y_fake, y_int = qm(x, mode="fake"), qm(x, mode="int")
    assert y_fake.shape == y_float.shape
    np.testing.assert_allclose(y_int, y_fake, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(y_fake))))
    rel = float(jnp.linalg.norm(y_fake - y_float) / jnp.linalg.norm(y_float))
    assert rel < (0.05 if w_bits == 8 else 0.4), rel
  assert int(qm.variables["quant"]["up"]["a_zero"][0]) != 0   # the zero-point correction is exercised
  hlo = jax.jit(qm.apply_fn("int")).lower(qm.variables, x).as_text()
  s8_convs = [l for l in hlo.splitlines() if "convolution" in l and "xi8" in l]
  assert len(s8_convs) == 5 and all("xi32" in l for l in s8_convs), s8_convs   # 2 Conv + 3 transposed


class _Concat(nn.Module):
  """A skip concatenation of a small-range and a large-range tensor into a 1x1 conv, as
  the UNet's up blocks feed their shortcut convs."""

  @nn.compact
  def __call__(self, x, t=None):
    small = 0.05 * nn.Conv(10, (3, 3), name="small")(x)
    large = 4.0 * nn.Conv(6, (3, 3), name="large")(x)
    return nn.Conv(5, (1, 1), name="shortcut")(jnp.concatenate([small, large], axis=-1))


def test_split_shortcut_finds_the_concat_and_beats_one_range():
  from tac_jax.quant import act_stats
  assert act_stats.choose_split(np.r_[[-0.1] * 10, [-5.0] * 6], np.r_[[0.1] * 10, [5.0] * 6]) == 10
  assert act_stats.choose_split(np.array([-1.0]), np.array([1.0])) == 0
  model = _Concat()
  x = jax.random.normal(_key(21), (4, 6, 6, 3))
  params = model.init(_key(22), x)["params"]
  # Both parts matter in the output: the large part's weights scaled down by its range.
  k = params["shortcut"]["kernel"]
  params["shortcut"]["kernel"] = k.at[..., 10:, :].multiply(0.05 / 4.0)
  y = model.apply({"params": params}, x)
  keep = r"^(small|large)$"   # only the shortcut conv at 4-bit activations
  one = quant.quantize_model(model, params, [(x, None)], quant.QuantConfig(a_bits=4, keep_8bit=keep))
  two = quant.quantize_model(model, params, [(x, None)],
                             quant.QuantConfig(a_bits=4, keep_8bit=keep, split_layers="^shortcut$"))
  assert two.specs["shortcut"].split == 10 and one.specs["shortcut"].split == 0
  assert two.variables["quant"]["shortcut"]["a_scale"].shape == (1, 2)
  err = lambda qm: float(jnp.linalg.norm(qm(x) - y) / jnp.linalg.norm(y))
  assert err(two) < 0.5 * err(one), (err(two), err(one))
  np.testing.assert_allclose(two(x, mode="int"), two(x), rtol=1e-4, atol=1e-4)
  qd = presets.quant_config(presets.quant_defaults(), 4, 4, "qdiff")
  assert qd.a_observer == "mse" and "conv_shortcut" in qd.split_layers


def test_attention_matmuls_quantized_behind_a_flag():
  """The UNet's attention block: q k^T and softmax(.) v are Einsum layers, left in float
  (and listed) by default, quantized at run time with an s8 x s8 -> s32 path when asked."""
  from tac_jax.models.unet import AttentionBlock
  model = AttentionBlock(head_dim=4, groups=4, eps=1e-5)
  x = jax.random.normal(_key(31), (2, 4, 4, 8))
  params = model.init(_key(32), x)["params"]
  y = model.apply({"params": params}, x)
  off = quant.quantize_model(model, params, [(x, None)], quant.QuantConfig())
  assert set(off.specs) == {"group_norm", "to_q", "to_k", "to_v", "to_out_0"} - {"group_norm"}
  assert "attention matmul" in off.float_layers["qk"] and "av" in off.float_layers
  on = quant.quantize_model(model, params, [(x, None)], quant.QuantConfig(attention_matmuls=True))
  assert on.specs["qk"].kind == on.specs["av"].kind == "matmul" and not on.float_layers
  np.testing.assert_allclose(on(x, mode="int"), on(x), rtol=1e-4, atol=1e-4)
  rel = lambda qm: float(jnp.linalg.norm(qm(x) - y) / jnp.linalg.norm(y))
  assert rel(off) < rel(on) < 0.05, (rel(off), rel(on))
  hlo = jax.jit(on.apply_fn("int")).lower(on.variables, x).as_text()
  s8_dots = [l for l in hlo.splitlines() if "dot_general" in l and "xi8" in l]
  assert len(s8_dots) == 6 and all("xi32" in l for l in s8_dots)   # 4 Dense + 2 matmuls
  assert on.memory_report(params)["layers_float32"] == off.memory_report(params)["layers_float32"]
