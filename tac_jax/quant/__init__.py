"""Quantization core: pure quantizers, observers, integer kernels, Flax injection, PTQ."""

from tac_jax.quant.core import (QuantParams, check_bits, dequantize, fake_quant, pack_int4,
                                params_from_range, quantize, unpack_int4)
from tac_jax.quant.spec import MODES, LayerSpec, QuantConfig
from tac_jax.quant.int_ops import int_conv, int_dot, quantized_conv, quantized_dense
from tac_jax.quant.observers import get_observer, minmax, mse, percentile
from tac_jax.quant.ptq import CalibBatch, QuantizedApply, QuantizedModel, quantize_model
from tac_jax.quant import presets
