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


def _layout() -> dict[str, str]:
  """The README's layout block: {entry: its text}, an entry being a top-level line's first word (a
  package folder keeps its indented lines)."""
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    text = f.read()
  block = re.search(r"## Layout\n\n```\n(.*?)```", text, re.S)
  assert block, "README.md has no '## Layout' code block"
  entries: dict[str, str] = {}
  name = None
  for line in block.group(1).splitlines():
    if line[:1].strip() or line.startswith("  ") and line[2:3].strip():  # an entry at depth 0 or 1
      name = line.split()[0].rstrip(",")
      entries[name] = ""
    entries[name] += " " + line
  return entries


def test_readme_layout_names_every_module_and_doc():
  """Every package module, subpackage module, entry point and docs page is named in the layout."""
  entries = _layout()
  text = " ".join(entries.values())
  missing = []
  pkg = os.path.join(ROOT, "solidmark_jax")
  for name in sorted(os.listdir(pkg)):
    path = os.path.join(pkg, name)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "__init__.py")):
      if f"{name}/" not in entries:
        missing.append(f"solidmark_jax/{name}/")
        continue
      for module in sorted(os.listdir(path)):
        stem = module[:-3]
        if module.endswith(".py") and not module.startswith("_") and not re.search(rf"\b{stem}\b", entries[f"{name}/"]):
          missing.append(f"solidmark_jax/{name}/{module}")
    elif name.endswith(".py") and not name.startswith("_") and name not in text:
      missing.append(f"solidmark_jax/{name}")
  for name in sorted(os.listdir(ROOT)):
    if name.endswith(".py") and name not in text:
      missing.append(name)
  for name in sorted(os.listdir(os.path.join(ROOT, "docs"))):
    if name.endswith(".md") and name not in text:
      missing.append(f"docs/{name}")
  assert not missing, f"README.md's layout does not name: {missing}"
