#!/usr/bin/env bash
# The accelerator check, one short script for a machine with a GPU or TPU (about 5 minutes):
# int8 vs bfloat16 vs float32 on the UNet's matmul and conv shapes, then end to end the
# default model's 20 DDIM steps with tac_jax float / bf16 / fake-quant / int8 (+ TCEC).
#   bash benchmarks/accelerator.sh
# Not run by the project yet: no accelerator was lent to a session that had this script.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import jax; print('devices:', jax.devices())"
python benchmarks/int_ops.py --repeats 20
python benchmarks/peers.py --peers jax-float,jax-bf16,jax-fake,jax-int,jax-int+tcec \
  --batches 1,32,256 --repeats 10
