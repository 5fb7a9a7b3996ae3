"""Every config in configs/ loads, and no config builds on a config that builds on another."""

import ast
import importlib
import os

import ml_collections
import pytest

from solidmark_jax.training import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs")
HELPERS = ("__init__", "common")  # modules of configs/ that are not configs
CONFIGS = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and f[:-3] not in HELPERS)


def _configs_imported(name: str) -> set[str]:
  """The configs (not helpers) that configs/<name>.py imports."""
  with open(os.path.join(CONFIG_DIR, f"{name}.py"), encoding="utf-8") as f:
    tree = ast.parse(f.read())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module == "configs":
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("configs."):
      out.add(node.module.split(".")[1])
    elif isinstance(node, ast.Import):
      out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("configs."))
  return out - set(HELPERS)


def test_configs_are_found():
  assert {"tiny", "cifar10", "paper_border", "sd21_pretrain"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads(name):
  c = importlib.import_module(f"configs.{name}").get_config()
  assert isinstance(c, ml_collections.ConfigDict) and c.data.name


@pytest.mark.parametrize("name", CONFIGS)
def test_config_chain_is_at_most_two_files(name):
  for parent in _configs_imported(name):
    assert parent in CONFIGS, f"configs/{name}.py imports configs.{parent}, which is no config"
    grand = _configs_imported(parent)
    assert not grand, (f"configs/{name}.py -> configs/{parent}.py -> configs/{sorted(grand)[0]}.py: build on "
                       "configs/common.py instead")


def test_text_miniatures_share_one_checkpoint():
  """The text sweeps train the same model on the same data: one workdir serves them all."""
  names = ("paper_table3_mitigations", "paper_gni_figure", "paper_table4_augment", "paper_pruning",
           "paper_dori_table", "paper_dori_defaults")
  prints = {checkpoint.config_fingerprint(importlib.import_module(f"configs.{n}").get_config()) for n in names}
  assert len(prints) == 1
  texts = [importlib.import_module(f"configs.{n}").get_config().text.to_dict() for n in names]
  assert all(t == texts[0] for t in texts)
