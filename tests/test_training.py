"""The training loop (tac_jax.app.train): the loss goes down, training resumes from its
checkpoints, and the exported model loads back as a model checkpoint."""

import jax
import ml_collections
import numpy as np

from tac_jax.app import train as train_lib
from tac_jax.models import UNetConfig
from tac_jax.models import checkpoint as ckpt_lib

TINY = UNetConfig(sample_size=8, block_out_channels=(8, 16), attention_levels=(1,),
                  attention_head_dim=16, norm_num_groups=4)


def _tiny_train_config(steps):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict(TINY.to_dict())
  c.schedule = ml_collections.ConfigDict(dict(name="linear", num_timesteps=1000,
                                              beta_start=1e-4, beta_end=0.02))
  c.data = ml_collections.ConfigDict(dict(name="digits", num_color_seeds=1))
  c.optim = ml_collections.ConfigDict(dict(learning_rate=3e-3, warmup_steps=5, weight_decay=0.0,
                                           grad_clip=1.0, ema_decay=0.9))
  c.batch_size = 8
  c.num_train_steps = steps
  c.log_every = 10
  c.checkpoint_every = 30
  return c


def test_training_lowers_loss_resumes_and_round_trips(tmp_path):
  out = train_lib.train(_tiny_train_config(60), str(tmp_path / "work"),
                        export_dir=str(tmp_path / "model"))
  losses = [l for _, l in out["losses"]]
  assert losses[-1] < 0.7 * losses[0], losses
  module, params, meta = ckpt_lib.load_model(str(tmp_path / "model"))
  jax.tree.map(np.testing.assert_array_equal, params, out["params"])
  assert meta["train_steps"] == 60 and UNetConfig.from_dict(meta["model"]) == TINY
  assert module.config == TINY
  # Resuming from the step-60 checkpoint continues the step count.
  out2 = train_lib.train(_tiny_train_config(70), str(tmp_path / "work"))
  assert out2["losses"][0][0] == 70
