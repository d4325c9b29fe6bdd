"""The qwix base PTQ (tac_jax/quant/qwix_base.py) on a tiny random UNet: accuracy at W8A8
and W4A8, the layers qwix quantizes, keep_8bit, the integer path, hashable apply
functions, the memory report and the errors for what qwix cannot do."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

qwix = pytest.importorskip("qwix")
# qwix 0.1.8 with flax 0.12 warns on every param it inspects.
pytestmark = pytest.mark.filterwarnings("ignore:'VariableState' was removed:DeprecationWarning")

from flax import traverse_util  # pylint: disable=g-import-not-at-top
from tac_jax.models import UNetConfig, init_unet  # pylint: disable=g-import-not-at-top
from tac_jax.quant import LayerSpec, QuantConfig, presets, qwix_base  # pylint: disable=g-import-not-at-top

MEMORY_KEYS = {"model_float32", "model_quantized", "layers_float32", "layers_int8",
               "layers_stored", "layers_overhead", "low_rank_float32"}


@pytest.fixture(scope="module")
def unet():
  cfg = UNetConfig(sample_size=8, block_out_channels=(8, 16), attention_levels=(1,),
                   attention_head_dim=16, norm_num_groups=4)
  module, params = init_unet(cfg, jax.random.key(0))
  keys = jax.random.split(jax.random.key(1), 4)
  calib = [(jax.random.normal(k, (2, 8, 8, 3)), t) for k, t in zip(keys, (900, 500, 100))]
  x, t = jax.random.normal(keys[3], (2, 8, 8, 3)), jnp.array([700, 50], jnp.int32)
  ref = jax.jit(lambda p: module.apply({"params": p}, x, t))(params)
  return module, params, calib, (x, t, ref)


@pytest.fixture(scope="module")
def quantized(unet):
  """quantized(w_bits) -> the W{w_bits}A8 model (static activations, first/last layers
  and the time MLP at 8 bits), built once per module."""
  module, params, calib, _ = unet
  made = {}

  def get(w_bits: int):
    if w_bits not in made:
      config = QuantConfig(w_bits=w_bits, a_bits=8, keep_8bit=presets.KEEP_8BIT)
      made[w_bits] = qwix_base.quantize_with_qwix(module, params, calib, config)
    return made[w_bits]

  return get


def _rel(out, ref):
  return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def test_w8a8_is_close_to_float(unet, quantized):
  x, t, ref = unet[3]
  assert _rel(quantized(8)(x, t, mode="fake"), ref) < 0.1     # measured 0.05


def test_w4a8_is_worse_but_finite_and_its_integer_path_matches_fake(unet, quantized):
  x, t, ref = unet[3]
  qm = quantized(4)
  fake, ints = qm(x, t, mode="fake"), qm(x, t, mode="int")
  e8, e4 = _rel(quantized(8)(x, t, mode="fake"), ref), _rel(fake, ref)
  assert np.isfinite(e4) and e8 < e4 < 1.0        # measured 0.05 and 0.27
  # int: integer products of int4 weights (in int8 containers) and int8 activations.
  np.testing.assert_allclose(ints, fake, atol=1e-4 * float(jnp.abs(ref).max()))


def test_rules_follow_the_config():
  specs = {"a/dense": LayerSpec("dense", 4, 8, False, 64, group_size=32),
           "a/conv": LayerSpec("conv", 4, 8, False, 16),
           "a/qk": LayerSpec("matmul", 8, 8, True, 0)}
  rules = {r.module_path: r for r in qwix_base.qwix_rules(specs, QuantConfig(a_dynamic=True))}
  dense, conv, qk = rules[r"a/dense"], rules[r"a/conv"], rules[r"a/qk"]
  assert (dense.op_names, dense.weight_qtype, dense.act_qtype) == (("dot_general",), "int4",
                                                                   "int8")
  assert dense.tile_size == 32 and conv.tile_size is None and not dense.act_static_scale
  assert dense.act_calibration_method == "minmax" and qk.act_calibration_method == "absmax"
  assert conv.op_names == ("conv_general_dilated",) and qk.op_names == ("einsum",)
  static = qwix_base.qwix_rules(specs, QuantConfig())
  assert all(r.act_static_scale for r in static)


def test_qwix_quantizes_every_dense_and_conv_layer(unet, quantized):
  params = unet[1]
  kernels = {k[:-len("/kernel")] for k in traverse_util.flatten_dict(params, sep="/")
             if k.endswith("/kernel")}
  qm = quantized(4)
  assert set(qm.qwix_layers) == kernels and not qm.float_layers
  for path in ("conv_in", "down_blocks_0/resnets_0/conv1", "time_embedding/linear_1",
               "mid_block/attentions_0/to_q", "up_blocks_0/upsamplers_0/conv"):
    assert path in qm.qwix_layers
  assert {qm.specs[p].kind for p in qm.qwix_layers} == {"dense", "conv"}
  # The attention matmuls (Einsum) stay in float unless attention_matmuls=True.
  assert not any(p.endswith(("/qk", "/av")) for p in qm.specs)


def test_keep_8bit_layers_hold_int8_weights_the_others_int4(quantized):
  qm = quantized(4)
  params = qm.variables["params"]
  kept = params["conv_in"]["kernel"].array
  low = params["down_blocks_0"]["resnets_0"]["conv1"]["kernel"].array
  assert kept.qtype == "int8" and kept.qvalue.dtype == jnp.int8
  assert low.qtype == "int4" and low.qvalue.dtype == jnp.int4
  assert int(jnp.abs(low.qvalue.astype(jnp.int32)).max()) <= 8
  assert qm.specs["conv_in"].w_bits == 8 and qm.specs["time_embedding/linear_2"].w_bits == 8
  assert qm.specs["down_blocks_0/resnets_0/conv1"].w_bits == 4
  # W4A8 conv: qwix's own conv requires equal qtypes; here activations stay at 8 bits.
  rule = next(r for r in qm.rules if r.module_path == "down_blocks_0/resnets_0/conv1")
  assert (rule.weight_qtype, rule.act_qtype, rule.act_static_scale) == ("int4", "int8", True)


def test_apply_fn_is_hashable_and_a_jitted_sampler_compiles_once(unet, quantized):
  qm = quantized(8)
  a, b = qm.apply_fn("fake"), qm.apply_fn("fake")
  assert a == b and hash(a) == hash(b) and a != qm.apply_fn("int")
  with pytest.raises(ValueError, match="unknown quantization mode"):
    qm.apply_fn("bf16")

  @functools.partial(jax.jit, static_argnums=0)
  def sample(apply, variables, x):
    def step(i, x):
      return x - 0.1 * apply(variables, x, jnp.full((x.shape[0],), 900 - 300 * i, jnp.int32))
    return jax.lax.fori_loop(0, 3, step, x)

  x = unet[3][0]
  out = sample(a, qm.variables, x)
  again = sample(b, qm.variables, x)
  assert sample._cache_size() == 1
  assert bool(jnp.all(jnp.isfinite(out))) and bool(jnp.all(out == again))


def test_memory_report_shows_smaller_weights(unet, quantized):
  params = unet[1]
  r8, r4 = (quantized(b).memory_report(params) for b in (8, 4))
  assert set(r8) == set(r4) == MEMORY_KEYS and r8["low_rank_float32"] == 0
  assert r8["layers_stored"] == r8["layers_int8"] == r8["layers_float32"] // 4
  assert r4["layers_stored"] < r4["layers_int8"]          # int4 counted packed
  assert r4["model_quantized"] < r8["model_quantized"] < r8["model_float32"] // 3
  assert 0 < r8["layers_overhead"] < r8["layers_stored"]


def test_clear_errors_for_what_qwix_cannot_do(unet, monkeypatch):
  module, params, calib, _ = unet
  with pytest.raises(ValueError, match="int4 or int8 only"):
    qwix_base.quantize_with_qwix(module, params, calib, QuantConfig(w_bits=8, a_bits=6))
  with pytest.raises(ValueError, match="time_groups=2"):
    qwix_base.quantize_with_qwix(module, params, calib, QuantConfig(time_groups=2))
  with pytest.raises(ValueError, match="outside the schedule"):
    qwix_base.quantize_with_qwix(module, params, calib, QuantConfig(), num_timesteps=100)
  monkeypatch.setattr(qwix_base, "qwix", None)
  with pytest.raises(ImportError, match=r"pip install -e '\.\[qwix\]'"):
    qwix_base.quantize_with_qwix(module, params, calib, QuantConfig())


def test_main_job_runs_every_compensator_on_the_qwix_base(tiny_model_dir, tmp_path):
  """--config.ptq=qwix: the main job quantizes with qwix and runs the compensators on top
  (int path included); the artifact export refuses an external base before any work."""
  from configs_loader import load_config   # pylint: disable=import-outside-toplevel
  from tac_jax.app import pipeline   # pylint: disable=import-outside-toplevel
  cfg = load_config("quantize")
  cfg.update(dict(checkpoint=tiny_model_dir(8), ptq="qwix", num_steps=3, num_calib=4,
                  num_eval=4, settings="W8A8", methods="none,tcec,tac", default_method="tcec",
                  frechet=False, timing_repeats=0))
  res = pipeline.run(cfg, str(tmp_path / "run"), verbose=False)
  runs = {r["method"]: r for r in res["runs"]}
  assert set(runs) == {"none", "tcec", "tac"} and {r["ptq"] for r in res["runs"]} == {"qwix"}
  for r in runs.values():
    assert np.isfinite(r["psnr_fake"]["mean"])
  assert abs(runs["none"]["psnr_int"]["mean"] - runs["none"]["psnr_fake"]["mean"]) < 1.0
  bad = cfg.copy_and_resolve_references()
  bad.export = str(tmp_path / "export")
  with pytest.raises(ValueError, match="external base"):
    pipeline.validate(bad)
