import json

import jax.numpy as jnp
import numpy as np
import pytest

from solidmark_jax import marks


def test_keys_reproducible_independent_and_uniform():
  ids = np.arange(20000)
  k = marks.keys_for(7, ids)
  np.testing.assert_array_equal(k, marks.keys_for(7, ids))
  # a key depends on (seed, id) only, not on which other ids are asked for
  np.testing.assert_array_equal(marks.keys_for(7, ids[[5, 123, 19999]]), k[[5, 123, 19999]])
  assert not np.array_equal(k, marks.keys_for(8, ids))
  assert 0 < k.min() and k.max() < 1
  hist, _ = np.histogram(k, bins=10, range=(0, 1))
  assert np.all(np.abs(hist - 2000) < 5 * np.sqrt(2000))
  # on the float32-exact grid, in [0, 1] and as 2k - 1
  k32 = k.astype(np.float32)
  np.testing.assert_array_equal(k32.astype(np.float64), k)
  np.testing.assert_array_equal(((2 * k32 - 1) + 1) / 2, k32)


def test_border_values_in_both_spaces_and_centre_untouched():
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(3, 5, 7, 3)).astype(np.float32)
  keys = marks.keys_for(0, [0, 1, 2]).astype(np.float32)
  pad = 4
  for out in (marks.apply_border(images, keys, pad), np.asarray(marks.apply_border(jnp.asarray(images), keys, pad))):
    assert out.shape == (3, 13, 15, 3)
    mask = marks.key_mask(13, 15, pad)[..., 0].astype(bool)
    for i in range(3):
      assert np.all(out[i][mask] == keys[i])
      model = marks.to_model_space(out[i])
      assert np.all(model[mask] == 2 * keys[i] - 1)
    np.testing.assert_array_equal(out[:, pad:-pad, pad:-pad], images)


def test_centre_pattern():
  images = np.full((2, 10, 10, 1), 0.25, np.float32)
  keys = np.array([0.75, 0.5], np.float32)
  out = marks.apply_centre(images, keys, 4)
  mask = marks.key_mask(10, 10, 4, "centre")[..., 0].astype(bool)
  assert mask.sum() == 16 and mask[3:7, 3:7].all()
  assert np.all(out[0][mask] == 0.75) and np.all(out[1][mask] == 0.5)
  assert np.all(out[:, ~mask] == 0.25)


@pytest.mark.parametrize("pattern", ["border", "centre"])
def test_oracle_prediction_is_exact(pattern):
  keys = marks.keys_for(3, np.arange(256)).astype(np.float32)
  images = np.random.default_rng(1).uniform(size=(256, 8, 8, 3)).astype(np.float32)
  marked = marks.apply_pattern(images, keys, 2, pattern)
  mask = marks.key_mask(marked.shape[1], marked.shape[2], 2, pattern)
  k_pred = np.asarray(marks.predicted_key(marks.to_model_space(jnp.asarray(marked)), mask))
  np.testing.assert_array_equal(np.abs(k_pred - keys), 0.0)


def test_predicted_key_is_the_mean_of_the_region_in_unit_space():
  x = np.zeros((1, 6, 6, 1), np.float32)  # model space: value 0 means 0.5
  x[0, 0, 0, 0] = 1.0
  mask = marks.key_mask(6, 6, 1)
  want = (0.5 * 19 + 1.0) / 20
  np.testing.assert_allclose(np.asarray(marks.predicted_key(jnp.asarray(x), mask)), [want], rtol=1e-6)


def test_keymap_roundtrip_and_hash_checks(tmp_path):
  km = marks.Keymap.create(11, np.arange(50))
  path = str(tmp_path / "keymap.json")
  h = km.save(path)
  back = marks.Keymap.load(path, expected_hash=h)
  np.testing.assert_array_equal(back.keys, km.keys)
  np.testing.assert_array_equal(back.lookup([3, 7]), km.keys[[3, 7]])
  with pytest.raises(ValueError, match="does not match the expected"):
    marks.Keymap.load(path, expected_hash=marks.Keymap.create(12, np.arange(50)).hash)
  payload = json.load(open(path))
  payload["keys"]["3"] = 0.5
  json.dump(payload, open(path, "w"))
  with pytest.raises(ValueError, match="does not match its recorded hash"):
    marks.Keymap.load(path)
  with pytest.raises(KeyError, match="not in the keymap"):
    km.lookup([50])
