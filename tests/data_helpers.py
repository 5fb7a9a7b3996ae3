"""Pieces shared by the data tests: Debian's Fashion-MNIST files and a config section from keywords."""

import os

import ml_collections
import pytest

from solidmark_jax.data import tfds as tfds_source

FASHION_DIR = tfds_source.DEFAULT_FASHION_MNIST_DIR
has_fashion = pytest.mark.skipif(not all(os.path.isfile(os.path.join(FASHION_DIR, f))
                                         for f in tfds_source.FASHION_MNIST_FILES),
                                 reason="needs `apt-get install dataset-fashion-mnist`")


def cfg(**kw) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(kw)
