"""benchmarks/peers.py samples what it says: the PyTorch peers run the same network and
sampler as tac_jax (so the speed table compares like with like), and the int8 peer is
quantized (torch extra)."""

import json
import os
import sys

import numpy as np

from tac_jax.app import stages
from tac_jax.models import convert
from torch_extra import torch_and_diffusers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import peers  # noqa: E402  pylint: disable=wrong-import-position


def test_torch_peers_sample_the_same_network_and_sampler_as_tac_jax(tmp_path):
  torch_and_diffusers()
  model = stages.load_model("default")
  convert.export_diffusers(str(tmp_path / "diffusers"), model.params, model.module.config)
  (tmp_path / "prep.json").write_text(json.dumps({"schedule": model.meta["schedule"]}))
  x = np.random.default_rng(0).standard_normal((2,) + model.shape).astype(np.float32)
  steps = 4
  ours = peers.jax_runner("jax-float", str(tmp_path), steps, x)[0]()
  eager, share = peers.torch_runner("torch-eager", str(tmp_path), steps, x)
  np.testing.assert_allclose(eager(), ours, atol=1e-4)
  assert share == 0.0
  int8, share = peers.torch_runner("torch-int8", str(tmp_path), steps, x)
  got = int8()
  assert 0.0 < share < 0.5          # dynamic quantization reaches nn.Linear only
  assert not np.allclose(got, ours, atol=1e-5) and peers.psnr(got, ours) > 20
