"""The README's Python example runs as written, and its claims hold on the shipped model."""

import os
import re

import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_example_runs():
  with open(os.path.join(ROOT, "README.md")) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
  assert blocks, "README.md has no python example"
  scope = {}
  exec(compile(blocks[0], "README.md", "exec"), scope)  # noqa: S102
  images = scope["images"]
  assert images.shape == (8, 16, 16, 3) and bool(jnp.all(jnp.isfinite(images)))
  # The example's compensator really corrected something, and the estimate is finite.
  tcec = scope["tcec"]
  assert float(jnp.max(jnp.abs(tcec.beta))) > 0
  assert np.isfinite(np.asarray(scope["plain_ptq_error"])).all()
