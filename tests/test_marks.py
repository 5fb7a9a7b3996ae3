import hashlib
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


# -- several keys per image -------------------------------------------------------------------


def test_one_key_keymap_file_and_hash_are_unchanged(tmp_path):
  """One key per image: the same hash and the same file bytes as before several keys existed.

  The reference values were computed by the code before `num_keys` was added (existing workdirs'
  keymaps must stay valid).
  """
  km = marks.Keymap.create(11, np.arange(50))
  assert km.num_keys == 1 and km.keys.shape == (50,)
  assert km.hash == "dfd502cadad21e025650229e96c4ac9e00490182b335e9c6355a2b4c2014fb4f"
  path = tmp_path / "keymap.json"
  km.save(str(path))
  assert hashlib.sha256(path.read_bytes()).hexdigest() == (
      "a66f19270282edb9cee6352140b3990f5d04265c32883150ac831e38f85e50be")
  centre = marks.Keymap.create(5, [3, 17, 4, 1000], "centre")
  assert centre.hash == "00eee24bf57f0fecc17de9aaf008f9e69ab50b23b865e77ae4ea1ba261c2b3bd"
  # the layout means nothing with one key: it is neither in the hash nor in the file
  assert marks.Keymap.create(11, np.arange(50), key_layout="channels").hash == km.hash
  assert "num_keys" not in json.loads(path.read_text())


def test_four_key_keymap_roundtrip_and_hash(tmp_path):
  km = marks.Keymap.create(11, np.arange(50), num_keys=4)
  assert km.num_keys == 4 and km.keys.shape == (50, 4)
  np.testing.assert_array_equal(km.keys, marks.keys_for(11, np.arange(50), 4))
  np.testing.assert_array_equal(km.keys[:, 0], marks.keys_for(11, np.arange(50) * 4))  # slot s of id i: 4i + s
  assert len(np.unique(km.keys)) == 200  # independent keys: no two equal here
  path = str(tmp_path / "keymap.json")
  h = km.save(path)
  payload = json.load(open(path))
  assert payload["num_keys"] == 4 and payload["key_layout"] == "sides" and len(payload["keys"]["7"]) == 4
  back = marks.Keymap.load(path, expected_hash=h)
  np.testing.assert_array_equal(back.keys, km.keys)
  assert back.num_keys == 4 and back.key_layout == "sides" and back.hash == h
  np.testing.assert_array_equal(back.lookup([3, 7]), km.keys[[3, 7]])
  # m and the layout are part of the identity: neither the one-key keymap nor another layout match
  one = marks.Keymap.create(11, np.arange(50))
  two = marks.Keymap.create(11, np.arange(50), num_keys=2)
  channels = marks.Keymap.create(11, np.arange(50), num_keys=4, key_layout="channels")
  assert len({h, one.hash, two.hash, channels.hash}) == 4
  with pytest.raises(ValueError, match="does not match the expected"):
    marks.Keymap.load(path, expected_hash=channels.hash)
  # editing one of the m keys, or the layout, is caught by the stored hash
  for edit in (lambda p: p["keys"]["3"].__setitem__(2, 0.5), lambda p: p.__setitem__("key_layout", "channels")):
    payload = json.load(open(path))
    edit(payload)
    json.dump(payload, open(tmp_path / "edited.json", "w"))
    with pytest.raises(ValueError, match="does not match its recorded hash"):
      marks.Keymap.load(str(tmp_path / "edited.json"))
  payload = json.load(open(path))
  payload["keys"]["3"] = payload["keys"]["3"][:3]
  json.dump(payload, open(tmp_path / "short.json", "w"))
  with pytest.raises(ValueError, match="not a SolidMark keymap.*num_keys=4 but instance 3"):
    marks.Keymap.load(str(tmp_path / "short.json"))


def _side_pixels(h, w, p):
  """Hand-written side of every border pixel (-1: centre): the definition in marks.py, pixel by pixel."""
  side = np.full((h, w), -1)
  for i in range(h):
    for j in range(w):
      if i < p:
        side[i, j] = 0  # top, corners included
      elif i >= h - p:
        side[i, j] = 2  # bottom, corners included
      elif j >= w - p:
        side[i, j] = 1  # right
      elif j < p:
        side[i, j] = 3  # left
  return side


@pytest.mark.parametrize("num_keys", [1, 2, 4])
def test_side_key_masks(num_keys):
  h, w, p = 9, 11, 2
  masks = marks.key_masks(h, w, p, "border", num_keys)
  assert masks.shape == (num_keys, h, w, 1) and masks.dtype == np.float32
  side = _side_pixels(h, w, p)
  for s in range(num_keys):
    want = (side >= 0) & (side % num_keys == s)  # side i carries key i mod m
    np.testing.assert_array_equal(masks[s, ..., 0], want.astype(np.float32))
  np.testing.assert_array_equal(masks.sum(axis=0), marks.key_mask(h, w, p))  # disjoint, union = the border
  if num_keys == 2:  # top + bottom, right + left
    assert masks[0, 0].all() and masks[0, -1].all() and masks[1, p:-p, 0].all() and masks[1, p:-p, -1].all()


def test_channel_key_masks():
  h, w, p = 8, 8, 2
  masks = marks.key_masks(h, w, p, "border", 2, "channels", channels=3)
  assert masks.shape == (2, h, w, 3)
  border = marks.key_mask(h, w, p)[..., 0]
  for c, s in ((0, 0), (1, 1), (2, 0)):  # channel c carries key c mod m
    np.testing.assert_array_equal(masks[s, ..., c], border)
    np.testing.assert_array_equal(masks[1 - s, ..., c], 0)
  centre = marks.key_masks(h, w, p, "centre", 3, "channels", channels=3)
  np.testing.assert_array_equal(centre.sum(axis=0), np.repeat(marks.key_mask(h, w, p, "centre"), 3, axis=-1))


@pytest.mark.parametrize("num_keys,layout,channels", [(1, "sides", 1), (2, "sides", 1), (4, "sides", 3),
                                                       (3, "channels", 3), (2, "channels", 3)])
def test_border_with_several_keys_writes_each_region_and_oracle_is_exact(num_keys, layout, channels):
  n, pad = 5, 2
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(n, 6, 7, channels)).astype(np.float32)
  keys = marks.keys_for(3, np.arange(n), num_keys).astype(np.float32)  # [n] or [n, m]
  masks = marks.key_masks(10, 11, pad, "border", num_keys, layout, channels)
  for out in (marks.apply_border(images, keys, pad, layout),
              np.asarray(marks.apply_border(jnp.asarray(images), keys, pad, layout))):
    assert out.shape == (n, 10, 11, channels)
    np.testing.assert_array_equal(out[:, pad:-pad, pad:-pad], images)
    k = keys.reshape(n, num_keys)
    for s in range(num_keys):
      region = np.broadcast_to(masks[s], out.shape[1:]) > 0
      for i in range(n):
        assert np.all(out[i][region] == k[i, s])
    k_pred = np.asarray(marks.predicted_key(marks.to_model_space(jnp.asarray(out)), masks))
    assert k_pred.shape == (n, num_keys)
    np.testing.assert_array_equal(k_pred, k)  # exact, as for one key
  # one key: the union mask gives k_pred [n], the masks [1, H, W, 1] give [n, 1], the same numbers
  if num_keys == 1:
    union = marks.key_mask(10, 11, pad)
    k1 = np.asarray(marks.predicted_key(marks.to_model_space(jnp.asarray(out)), union))
    assert k1.shape == (n,)
    np.testing.assert_array_equal(k1, k_pred[:, 0])


def test_predicted_keys_read_each_region_separately():
  masks = marks.key_masks(8, 8, 2, "border", 4)
  x = np.zeros((8, 8, 1), np.float32)  # model space 0: 0.5 everywhere
  x[0, 3, 0] = 1.0  # one pixel of the top side at 1.0
  k_pred = np.asarray(marks.predicted_key(jnp.asarray(x), masks))
  np.testing.assert_allclose(k_pred, [(0.5 * 15 + 1.0) / 16, 0.5, 0.5, 0.5], rtol=1e-6)
  # leading axes are kept: [2, 3, H, W, C] -> [2, 3, m]
  assert marks.predicted_key(jnp.zeros((2, 3, 8, 8, 1)), masks).shape == (2, 3, 4)


def test_centre_pattern_with_channel_keys():
  images = np.full((2, 10, 10, 2), 0.25, np.float32)
  keys = np.array([[0.75, 0.125], [0.5, 0.375]], np.float32)
  out = marks.apply_pattern(images, keys, 4, "centre", "channels")
  sq = marks.key_mask(10, 10, 4, "centre")[..., 0].astype(bool)
  assert np.all(out[0][sq] == [0.75, 0.125]) and np.all(out[1][sq] == [0.5, 0.375])
  assert np.all(out[:, ~sq] == 0.25)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_keys=3), r"marks.num_keys=3 with marks.key_layout='sides'.*\(1, 2, 4\)"),
    (dict(num_keys=0), "marks.num_keys must be a positive integer"),
    (dict(num_keys=2.0), "marks.num_keys must be a positive integer"),
    (dict(num_keys=2, key_layout="corners"), r"marks.key_layout must be one of \('sides', 'channels'\)"),
    (dict(num_keys=2, pattern="centre"), "needs marks.pattern='border'.*use marks.key_layout='channels'"),
    (dict(num_keys=4, key_layout="channels", channels=3), "needs at least 4 image channels.*have 3"),
])
def test_bad_key_settings_are_clear_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    marks.check_keys(**kwargs)
  with pytest.raises(ValueError, match=match):
    marks.key_masks(8, 8, 2, kwargs.get("pattern", "border"), kwargs["num_keys"], kwargs.get("key_layout", "sides"),
                    kwargs.get("channels", 3))


def test_keys_of_the_wrong_shape_are_an_error():
  with pytest.raises(ValueError, match=r"keys must be \[...\] \(one per image\) or \[..., m\]"):
    marks.apply_border(np.zeros((2, 4, 4, 1), np.float32), np.zeros((2, 1, 1), np.float32), 2)
