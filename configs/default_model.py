"""The embedded default model: a small UNet on colored 16x16 digits (trains on a CPU)."""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      sample_size=16, in_channels=3, out_channels=3, block_out_channels=(24, 48, 48),
      layers_per_block=1, attention_levels=(1,), attention_head_dim=48, norm_num_groups=8,
      norm_eps=1e-5, mid_attention=True))
  c.schedule = ml_collections.ConfigDict(dict(
      name="linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02))
  c.data = ml_collections.ConfigDict(dict(name="digits", num_color_seeds=4))
  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=2e-3, warmup_steps=200, weight_decay=1e-4, grad_clip=1.0, ema_decay=0.999))
  c.batch_size = 32
  c.data_parallel = True     # split each batch over all devices when there are several
  c.num_train_steps = 8000
  c.log_every = 100
  c.checkpoint_every = 2000
  # Samples drawn at the end for the PNG grid.
  c.sample_steps = 50
  c.num_samples = 64
  return c
