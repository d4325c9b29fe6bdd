"""The sweep's config checks (its end-to-end run on a tiny model: tests/test_launchers.py)."""

import pytest

from configs_loader import load_config
from tac_jax import sweep


def test_sweep_rejects_bad_names():
  with pytest.raises(ValueError, match="ddim<steps>"):
    sweep.parse_sampler("euler20")
  with pytest.raises(ValueError, match="PTQ option"):
    sweep.ptq_option("minmax_tgx")
  # The sweep takes the main job's sampler options and checks them before running.
  cfg = load_config("sweep")
  cfg.spacing = "leading"
  cfg.steps_offset = 1
  assert sweep.validate(cfg).samplers == ("ddim10", "ddim25", "ddim50", "ddpm50")
  cfg.spacing = "cosine"
  with pytest.raises(ValueError, match="unknown spacing 'cosine'"):
    sweep.validate(cfg)
  cfg.spacing, cfg.thresholding = "leading", 2.0
  with pytest.raises(ValueError, match="dynamic_thresholding_ratio"):
    sweep.validate(cfg)


def test_report_spread_is_over_seeds_and_left_out_for_one():
  from tac_jax import report  # pylint: disable=import-outside-toplevel
  assert report.mean_std([1.0, 3.0]) == "2.00 ± 1.00"
  assert report.mean_std([1.234]) == "1.23"
  assert report.mean_std([]) == "-"
