"""What the README and docs/ publish is what the committed result folders say: the
leaderboard page and the README's headline table regenerate byte for byte, and every
published folder's manifest names the revision that produced it."""

import json
import os

import pytest

from configs_loader import load_config
from tac_jax.app import leaderboard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("folder", leaderboard.PUBLISHED + ("docs/results_dpm",
                                                                "docs/results_third_party_dit",
                                                                "docs/results_cfg_error",
                                                                "docs/results_tiny_sd",
                                                                "docs/results_qwix",
                                                                "docs/results_peers",
                                                                "docs/results_dit_layers",
                                                                "docs/results_dit_ladder"))
def test_published_folders_have_a_manifest_with_a_revision(folder):
  with open(os.path.join(ROOT, folder, "manifest.json")) as f:
    man = json.load(f)
  assert man["git_revision"], f"{folder}: no git revision in its manifest"
  assert set(man["files"]) == set(os.listdir(os.path.join(ROOT, folder))) - {"manifest.json"}


def test_leaderboard_and_readme_table_regenerate_from_the_result_folders():
  cwd = os.getcwd()
  os.chdir(ROOT)   # the page names the folders as the command does (relative)
  try:
    page, table = leaderboard.publish(leaderboard.PUBLISHED, resamples=leaderboard.RESAMPLES)
  finally:
    os.chdir(cwd)
  with open(os.path.join(ROOT, "docs", "leaderboard.md")) as f:
    assert f.read() == page, f"docs/leaderboard.md is stale: run `{leaderboard.COMMAND}`"
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  assert leaderboard.replace_block(readme, table) == readme, (
      f"README.md's results table is stale: run `{leaderboard.COMMAND}`")


# Config fields added after the folders were published, at values that keep the earlier
# behaviour (guidance and shift act on conditional / flow models; export is off): a recorded config without them equals one
# with these values.
ADDED_SINCE = {"guidance_scale": None, "labels": "", "shift": 0.0, "export": "",
               "conditions": "", "shard_params": False}


@pytest.mark.parametrize("folder, config, overrides", [
    ("docs/results", "full", {}),
    ("docs/results_svdquant", "full", {"ptq": "svdquant_bc", "settings": "W4A4"}),
    ("docs/results_gray28", "full",
     {"checkpoint": "tac_jax/assets/gray28_model", "spacing": "leading"}),
    ("docs/results_dit_flow", "quantize_dit", {}),
    ("docs/results_dit_flow_svdquant", "quantize_dit", {"ptq": "svdquant_bc"})])
def test_published_folders_are_reproduced_by_the_named_config(folder, config, overrides):
  """The README names `--config=configs/<config>.py` (plus the overrides) as the command of
  each published folder: that config must be the one its manifest recorded."""
  with open(os.path.join(ROOT, folder, "manifest.json")) as f:
    recorded = {**ADDED_SINCE, **json.load(f)["config"]}
  want = load_config(config)
  want.update(overrides)
  want = want.to_dict()
  diff = sorted(k for k in set(want) | set(recorded) if want.get(k) != recorded.get(k))
  assert not diff, {k: (recorded.get(k), want.get(k)) for k in diff}
