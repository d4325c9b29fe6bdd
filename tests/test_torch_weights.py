"""PyTorch state dict -> Flax params with a key map (tac_jax.models.torch_weights)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from examples.own_model import TinyEpsNet
from tac_jax.models import torch_weights as tw

# TinyEpsNet's layers under the names a PyTorch port would give them.
KEY_MAP = {"time_mlp.weight": "time/kernel", "time_mlp.bias": "time/bias",
           "convs.0.weight": "conv_in/kernel", "convs.0.bias": "conv_in/bias",
           "convs.1.weight": "mid/kernel", "convs.1.bias": "mid/bias",
           "head.weight": "conv_out/kernel", "head.bias": "conv_out/bias",
           "num_batches_tracked": None}


def _tiny():
  module = TinyEpsNet(channels=8)
  params = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))
  return module, params["params"]


def _torch_layout(params):
  """The state dict a PyTorch twin of TinyEpsNet would save (KEY_MAP's keys)."""
  flat = {"/".join(k): np.asarray(v) for k, v in
          traverse_util.flatten_dict(params).items()}
  sd = {k: tw.flax_to_torch(flat[v]) for k, v in KEY_MAP.items() if v is not None}
  sd["num_batches_tracked"] = np.array(3)
  return sd


def test_key_map_round_trip_and_default_rule():
  _, params = _tiny()
  back = tw.map_state_dict(_torch_layout(params), params, KEY_MAP)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  # Without a key map, torch keys that follow Flax's names map by the default rule.
  same_names = {k.replace("/kernel", ".weight").replace("/", "."): tw.flax_to_torch(np.asarray(v))
                for k, v in {"/".join(p): v for p, v in
                             traverse_util.flatten_dict(params).items()}.items()}
  jax.tree.map(np.testing.assert_array_equal, tw.map_state_dict(same_names, params), params)
  assert tw.default_path("down.0.resnets.1.conv.weight") == ("down_0", "resnets_1", "conv", "weight")


def test_errors_name_every_problem():
  _, params = _tiny()
  sd = _torch_layout(params)
  bad = {k: v for k, v in sd.items() if k != "head.bias"}
  bad["extra.weight"] = np.zeros(3)
  bad["convs.1.weight"] = np.zeros((8, 8, 5, 5), np.float32)
  with pytest.raises(ValueError) as e:
    tw.map_state_dict(bad, params, KEY_MAP, what="TinyEpsNet")
  msg = str(e.value)
  assert "1 parameters missing from the checkpoint: conv_out/bias;" in msg
  assert "unexpected checkpoint keys: extra.weight" in msg
  assert "convs.1.weight: (8, 8, 5, 5) -> (5, 5, 8, 8) (kernel), TinyEpsNet expects (3, 3, 8, 8)" in msg
  with pytest.raises(ValueError, match="unknown transform 'deconv'"):
    tw.map_state_dict(sd, params, dict(KEY_MAP, **{"head.weight": ("conv_out/kernel", "deconv")}))


def test_torch_layers_match_flax_after_mapping():
  """nn.Linear, nn.Conv2d and nn.ConvTranspose2d (stride 2, padding 1, output_padding 1)
  give the Flax layers' outputs once mapped (torch extra)."""
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  lin, conv = torch.nn.Linear(5, 7), torch.nn.Conv2d(3, 4, 3, padding=1)
  up = torch.nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1)

  class Twin(nn.Module):
    @nn.compact
    def __call__(self, v, x):
      h = nn.Conv(4, (3, 3), padding=1, name="conv")(x)
      k, p = 3, 1
      up_pad = ((k - 1 - p, k - 1 - p + 1),) * 2
      return nn.Dense(7, name="lin")(v), nn.ConvTranspose(6, (3, 3), strides=(2, 2),
                                                          padding=up_pad, name="up")(h)

  v = np.random.default_rng(0).normal(size=(2, 5)).astype(np.float32)
  x = np.random.default_rng(1).normal(size=(2, 6, 6, 3)).astype(np.float32)
  shapes = jax.eval_shape(Twin().init, jax.random.key(0), v, x)["params"]
  sd = {f"{n}.{k}": t.detach().numpy() for n, m in (("lin", lin), ("conv", conv), ("up", up))
        for k, t in m.state_dict().items()}
  params = tw.map_state_dict(sd, shapes, {"up.weight": ("up/kernel", "conv_transpose")})
  y_lin, y_up = Twin().apply({"params": params}, v, x)
  with torch.no_grad():
    want_lin = lin(torch.tensor(v)).numpy()
    want_up = up(conv(torch.tensor(x).permute(0, 3, 1, 2))).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(y_lin, want_lin, rtol=1e-5, atol=1e-5)
  assert y_up.shape == want_up.shape == (2, 12, 12, 6)
  np.testing.assert_allclose(y_up, want_up, rtol=1e-4, atol=1e-4)
