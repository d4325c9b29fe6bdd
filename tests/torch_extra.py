"""The optional torch extra for the tests that compare with PyTorch / diffusers."""

import pytest

REASON = "the torch extra is not installed (pip install -e '.[test,torch]')"


def torch_and_diffusers():
  """(torch, diffusers), or the calling test is skipped when the extra is missing."""
  return pytest.importorskip("torch", reason=REASON), pytest.importorskip("diffusers", reason=REASON)
