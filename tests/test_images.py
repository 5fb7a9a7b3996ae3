"""Tests for solidmark_jax.data.images: conversion to square uint8, decoding, index and channel checks."""

import io

import numpy as np
import pytest
from PIL import Image

from solidmark_jax.data import images


def test_to_square_crops_the_centre_and_converts_the_mode():
  a = np.zeros((30, 20, 3), np.uint8)  # 20 wide, 30 high: the centre 20 x 20 is rows 5..24
  a[5:25] = (0, 200, 0)
  x = images.to_square(Image.fromarray(a), 10, 1)
  assert x.shape == (10, 10, 1) and x.dtype == np.uint8
  np.testing.assert_array_equal(x, round(0.587 * 200))  # PIL's luma of pure green 200
  grey = images.to_square(Image.new("L", (6, 6), 90), None, 3)  # native size kept, grey repeated to RGB
  np.testing.assert_array_equal(grey, np.full((6, 6, 3), 90))
  with pytest.raises(ValueError, match="not square.*data.image_size"):
    images.to_square(Image.new("L", (6, 4)), None, 1)


def test_array_to_square_passes_matching_arrays_through():
  a = np.arange(16, dtype=np.uint8).reshape(4, 4, 1)
  np.testing.assert_array_equal(images.array_to_square(a, 4, 1), a)
  assert images.array_to_square(a, 2, 3).shape == (2, 2, 3)


def test_decode_image_returns_the_reason_instead_of_raising():
  buf = io.BytesIO()
  Image.new("RGB", (8, 6), (10, 20, 30)).save(buf, format="PNG")
  x, reason = images.decode_image(io.BytesIO(buf.getvalue()), 4, 3)
  assert reason == "" and x.shape == (4, 4, 3)
  np.testing.assert_array_equal(x, np.broadcast_to([10, 20, 30], (4, 4, 3)))
  x, reason = images.decode_image(io.BytesIO(buf.getvalue()[:30]), 4, 3)
  assert x is None and reason.startswith("cannot decode image (truncated or not an image)")


def test_checks_name_what_is_wrong():
  assert images.check_channels(3) == 3
  with pytest.raises(ValueError, match="data.channels must be 1 or 3, got 4"):
    images.check_channels(4)
  np.testing.assert_array_equal(images.check_indices(np.array([[2], [0]]), 3), [2, 0])
  with pytest.raises(IndexError, match=r"record indices must lie in \[0, 3\), got min 0 max 3"):
    images.check_indices(np.array([0, 3]), 3)
