"""The second shipped model: unlike the default in every axis that matters for PTQ
(one channel, 28x28, cosine schedule, narrower GroupNorm residual blocks with attention,
gray digits instead of colored ones). Trains on a CPU in under 30 minutes.

  python experiments/train.py --config=configs/gray28_model.py --workdir=runs/gray28_model \
      --export_dir=tac_jax/assets/gray28_model --figure=docs/gray28_model_samples.png --overwrite
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 1
  c.model = ml_collections.ConfigDict(dict(
      sample_size=28, in_channels=1, out_channels=1, block_out_channels=(16, 32, 32),
      layers_per_block=1, attention_levels=(1,), attention_head_dim=16, norm_num_groups=8,
      norm_eps=1e-5, mid_attention=True))
  c.schedule = ml_collections.ConfigDict(dict(name="cosine", num_timesteps=1000))
  c.data = ml_collections.ConfigDict(dict(name="digits_gray", num_color_seeds=1))
  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=2e-3, warmup_steps=200, weight_decay=1e-4, grad_clip=1.0, ema_decay=0.999))
  c.batch_size = 32
  c.data_parallel = True
  c.num_train_steps = 3000
  c.log_every = 250
  c.checkpoint_every = 1000
  c.sample_steps = 50
  c.sample_spacing = "leading"   # abar(999) ~ 0 on the cosine schedule: start at t = 980
  c.num_samples = 64
  return c
