"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # TensorFlow (for TFDS) must not claim accelerators
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory):
  """A TFDS data dir with Fashion-MNIST prepared offline from Debian's files, once per session.

  Set SOLIDMARK_TEST_TFDS_DIR to reuse a prepared dir across sessions (it is created if missing).
  """
  from ml_collections import ConfigDict
  from solidmark_jax.data import open_source
  data_dir = os.environ.get("SOLIDMARK_TEST_TFDS_DIR") or str(tmp_path_factory.mktemp("tfds"))
  open_source(ConfigDict({"name": "fashion_mnist", "data_dir": data_dir}), "train")  # ~20 s the first time
  return data_dir
