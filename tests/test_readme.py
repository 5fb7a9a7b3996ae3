"""The README's library example runs as written (it drifts otherwise): any denoiser, SamplerSpec, chance."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_library_example_runs():
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
  assert blocks, "README.md has no python example"
  scope: dict = {}
  exec(compile(blocks[0], "README.md", "exec"), scope)  # pylint: disable=exec-used
  s = scope["s"]
  assert len(s["counts"]) == 4 and scope["out"]["k_pred"].shape == (8, 2)
  assert all(0.0 <= p <= 1.0 for p in s["chance"]["p_value"])
