"""The sweep's config checks (its end-to-end run on a tiny model: tests/test_launchers.py)."""

import pytest

from configs_loader import load_config
from tac_jax.app import report, settings, sweep


def test_sweep_rejects_bad_names():
  with pytest.raises(ValueError, match="ddim<steps>"):
    settings.parse_sampler("lms20")
  with pytest.raises(ValueError, match="PTQ option"):
    settings.ptq_option("minmax_tgx")
  # The sweep takes the main job's sampler options and checks them before running.
  cfg = load_config("sweep")
  cfg.spacing = "leading"
  cfg.steps_offset = 1
  spec = sweep.validate(cfg)
  assert isinstance(spec, settings.SweepSpec)
  assert tuple(s.name for s in spec.samplers) == ("ddim10", "ddim25", "ddim50", "ddpm50")
  assert all(s.spacing == "leading" and s.steps_offset == 1 for s in spec.samplers)
  cfg.spacing = "cosine"
  with pytest.raises(ValueError, match="unknown spacing 'cosine'"):
    sweep.validate(cfg)
  cfg.spacing, cfg.thresholding = "leading", 2.0
  with pytest.raises(ValueError, match="dynamic_thresholding_ratio"):
    sweep.validate(cfg)
  cfg.thresholding = 0.0
  for field, value, match in (("calib_sizes", "0", "config.calib_sizes: every entry must be >= 1"),
                              ("calib_sizes", "-4", "config.calib_sizes: every entry must be >= 1"),
                              ("seeds", "a,b", "config.seeds: 'a' is not an integer")):
    bad = cfg.copy_and_resolve_references()
    bad[field] = value
    with pytest.raises(ValueError, match=match):
      sweep.validate(bad)


def test_report_spread_is_over_seeds_and_left_out_for_one():
  assert report.mean_std([1.0, 3.0]) == "2.00 ± 1.00"
  assert report.mean_std([1.234]) == "1.23"
  assert report.mean_std([]) == "-"
