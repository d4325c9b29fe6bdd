"""Latent text-to-image (issue: latent text-to-image): a tiny random Stable Diffusion-like
diffusers folder (UNet2DConditionModel, AutoencoderKL, DDIM scheduler with SD's
scaled_linear betas) runs through the main job: the guided UNet and the VAE decoder equal
diffusers', and the job quantizes and compensates it at W8A8 and W4A4."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tac_jax.app import pipeline
from tac_jax.diffusion import make_schedule
from tac_jax.models import latent
from configs_loader import load_config
from torch_extra import torch_and_diffusers

UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
            layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
            attention_head_dim=8, norm_num_groups=8)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
           layers_per_block=1, norm_num_groups=4, sample_size=16,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
PROMPTS, TOKENS = 2, 5


def _randomise(torch, model, seed):
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0, 0.2)
  return model.eval()


def write_tiny_sd(root: str, torch, diffusers):
  """Writes a tiny random SD-like folder (unet/, vae/, scheduler/) and its prompts.npz in
  `root`; returns (torch unet, torch vae, conditions path). Also experiments/tiny_sd_folder.py."""
  unet = _randomise(torch, diffusers.UNet2DConditionModel(**UNET), 0)
  vae = _randomise(torch, diffusers.AutoencoderKL(**VAE), 1)
  unet.save_pretrained(os.path.join(root, "unet"))
  vae.save_pretrained(os.path.join(root, "vae"))
  diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012).save_pretrained(os.path.join(root, "scheduler"))
  rng = np.random.RandomState(2)
  conds = os.path.join(root, "prompts.npz")
  np.savez(conds, encoder_hidden_states=rng.randn(PROMPTS, TOKENS, 16).astype(np.float32),
           null_encoder_hidden_states=rng.randn(1, TOKENS, 16).astype(np.float32))
  return unet, vae, conds


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
  """(torch, unet, vae, folder, conditions .npz) of a tiny random SD-like pipeline."""
  torch, diffusers = torch_and_diffusers()
  root = str(tmp_path_factory.mktemp("sd"))
  unet, vae, conds = write_tiny_sd(root, torch, diffusers)
  return torch, unet, vae, root, conds


def test_guided_unet_and_decoder_equal_diffusers(sd_folder):
  torch, unet, vae, folder, conds = sd_folder
  pipe = latent.load_pipeline(folder, conds, scale=3.0)
  assert pipe.shape == (8, 8, 4) and pipe.schedule["name"] == "scaled_linear"
  want = make_schedule("scaled_linear", 1000, 0.00085, 0.012).betas
  import diffusers   # pylint: disable=import-outside-toplevel
  ref = diffusers.DDIMScheduler.from_pretrained(os.path.join(folder, "scheduler")).betas
  np.testing.assert_allclose(want, ref.double().numpy(), rtol=1e-6)
  rng = np.random.RandomState(3)
  z = rng.randn(3, 4, 8, 8).astype(np.float32)   # 3 samples over 2 prompts: 0, 1, 0
  t = np.array([999, 500, 10])
  ours = jax.jit(pipe.module.apply)({"params": pipe.params}, jnp.asarray(z.transpose(0, 2, 3, 1)),
                                    jnp.asarray(t))
  f = np.load(conds)
  ctx = f["encoder_hidden_states"][[0, 1, 0]]
  null = np.repeat(f["null_encoder_hidden_states"], 3, axis=0)
  with torch.no_grad():
    run = lambda c: unet(torch.from_numpy(z), torch.from_numpy(t), torch.from_numpy(c)).sample
    e_c, e_u = run(ctx).numpy(), run(null).numpy()
  np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), e_u + 3.0 * (e_c - e_u),
                             atol=1e-4)
  with torch.no_grad():
    img = vae.decode(torch.from_numpy(z / vae.config.scaling_factor)).sample.clamp(-1, 1).numpy()
  np.testing.assert_allclose(np.asarray(pipe.decode(jnp.asarray(z.transpose(0, 2, 3, 1)))),
                             img.transpose(0, 2, 3, 1), atol=1e-4)


def test_v_prediction_folder_gives_the_eps_diffusers_steps_with(sd_folder, tmp_path):
  """An SD 2.x-style scheduler (prediction_type v_prediction): the guided output is
  converted to eps, and our DDIM step on it equals diffusers' DDIMScheduler step on the
  guided v."""
  torch, unet, _, folder, conds = sd_folder
  import diffusers   # pylint: disable=import-outside-toplevel
  from tac_jax.diffusion import samplers   # pylint: disable=import-outside-toplevel
  vdir = tmp_path / "sd2"
  vdir.mkdir()
  for sub in ("unet", "vae"):
    os.symlink(os.path.join(folder, sub), vdir / sub)
  ref = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                beta_end=0.012, prediction_type="v_prediction",
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1)
  ref.save_pretrained(str(vdir / "scheduler"))
  pipe = latent.load_pipeline(str(vdir), conds, scale=3.0)
  assert pipe.module.prediction_type == "v_prediction"
  ref.set_timesteps(10)
  ours = samplers.ddim(make_schedule(**pipe.schedule), 10, spacing="leading", steps_offset=1)
  np.testing.assert_array_equal(np.asarray(ours.coeffs.t), ref.timesteps.numpy())
  z = np.random.RandomState(4).randn(2, 4, 8, 8).astype(np.float32)
  f = np.load(conds)
  for i in (0, 6):
    t = int(ref.timesteps[i])
    with torch.no_grad():
      run = lambda c, t=t: unet(torch.from_numpy(z), t, torch.from_numpy(c)).sample
      v_c = run(f["encoder_hidden_states"])
      v_u = run(np.repeat(f["null_encoder_hidden_states"], 2, axis=0))
    want = ref.step(v_u + 3.0 * (v_c - v_u), t, torch.from_numpy(z)).prev_sample.numpy()
    x = jnp.asarray(z.transpose(0, 2, 3, 1))
    eps = pipe.module.apply({"params": pipe.params}, x, jnp.full((2,), t, jnp.int32))
    got = ours.step(ours.init(x, jax.random.key(0)), eps, i).x
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, atol=1e-4)


def test_conditions_file_errors(sd_folder, tmp_path):
  _, _, _, folder, _ = sd_folder
  with pytest.raises(FileNotFoundError, match="conditions file"):
    latent.load_pipeline(folder, str(tmp_path / "none.npz"))
  bad = str(tmp_path / "bad.npz")
  np.savez(bad, encoder_hidden_states=np.zeros((2, 5, 16), np.float32))
  with pytest.raises(ValueError, match="null_encoder_hidden_states"):
    latent.load_pipeline(folder, bad)
  np.savez(bad, encoder_hidden_states=np.zeros((2, 5, 8), np.float32),
           null_encoder_hidden_states=np.zeros((1, 5, 8), np.float32))
  with pytest.raises(ValueError, match=r"\[P, L, 16\]"):
    latent.load_pipeline(folder, bad)
  cfg = load_config("quantize")
  cfg.model = f"diffusers:{folder}"
  with pytest.raises(ValueError, match="config.conditions"):
    pipeline.validate(cfg)


def test_main_job_quantizes_and_compensates_the_sd_pipeline(sd_folder, tmp_path):
  _, _, _, folder, conds = sd_folder
  cfg = load_config("quantize")
  cfg.update(dict(model=f"diffusers:{folder}", conditions=conds, guidance_scale=3.0,
                  num_steps=3, num_calib=4, num_eval=4, settings="W4A4",
                  methods="none,tcec", default_method="tcec", frechet=False,
                  timing_repeats=0))
  res = pipeline.run(cfg, str(tmp_path / "run"), verbose=False)
  runs = {(r["setting"], r["method"]): r for r in res["runs"]}
  assert set(runs) == {("W4A4", "none"), ("W4A4", "tcec")}
  for r in runs.values():   # metrics are on decoded 16x16 images, the error on 8x8 latents
    assert np.isfinite(r["psnr_fake"]["mean"]) and len(r["error_rms_per_step"]) == 3
  # the int8 kernels compute what fake-quant does (up to rounding), on decoded images too
  for m in ("none", "tcec"):
    r = runs[("W4A4", m)]
    assert abs(r["psnr_int"]["mean"] - r["psnr_fake"]["mean"]) < 1.0, r
  with open(os.path.join(str(tmp_path / "run"), "results.json")) as f:
    assert json.load(f)["config"]["conditions"] == conds
