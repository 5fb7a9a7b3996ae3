"""Instances (subset, duplication) and the per-host batch plan."""

import ml_collections
import numpy as np
import pytest

from solidmark_jax import marks
from solidmark_jax.data import BatchPlan, make_instances, marked_batch


def _cfg(**kw):
  return ml_collections.ConfigDict({"subset_size": None, "subset_mode": "first", "duplicates": {}, **kw})


def test_subset_first_and_random():
  inst = make_instances(100, _cfg(subset_size=10), seed=0)
  np.testing.assert_array_equal(inst.record_index, np.arange(10))
  a = make_instances(100, _cfg(subset_size=10, subset_mode="random"), seed=0)
  b = make_instances(100, _cfg(subset_size=10, subset_mode="random"), seed=0)
  c = make_instances(100, _cfg(subset_size=10, subset_mode="random"), seed=1)
  np.testing.assert_array_equal(a.record_index, b.record_index)
  assert not np.array_equal(a.record_index, c.record_index)
  assert len(set(a.record_index.tolist())) == 10
  with pytest.raises(ValueError, match="data.subset_size=101"):
    make_instances(100, _cfg(subset_size=101), seed=0)


def test_duplicates_get_their_own_ids_and_keys():
  inst = make_instances(50, _cfg(subset_size=20, duplicates={2: 3, 4: 2}), seed=0)
  assert len(inst) == 20 + 3 * 1 + 2 * 3 and inst.num_images == 20
  counts = np.bincount(inst.image_id)
  assert sorted(counts.tolist()) == [1] * 15 + [2] * 3 + [4] * 2
  # copies of one image share the record and the image id, never the instance id or the key
  keys = marks.keys_for(0, inst.instance_ids)
  for img in np.flatnonzero(counts == 4):
    rows = np.flatnonzero(inst.image_id == img)
    assert len(set(inst.record_index[rows].tolist())) == 1
    assert len(set(keys[rows].tolist())) == 4
  with pytest.raises(ValueError, match="data.duplicates"):
    make_instances(50, _cfg(subset_size=4, duplicates={2: 5}), seed=0)


def test_batch_plan_is_deterministic_and_splits_over_processes():
  plan = BatchPlan(num_instances=40, global_batch=8, seed=3)
  assert plan.batches_per_epoch == 5
  epoch = np.concatenate([plan.global_rows(b) for b in range(5)])
  np.testing.assert_array_equal(np.sort(epoch), np.arange(40))  # each instance once per epoch
  assert not np.array_equal(plan.global_rows(0), plan.global_rows(5))  # reshuffled next epoch
  np.testing.assert_array_equal(plan.global_rows(7), BatchPlan(40, 8, 3).global_rows(7))  # resumable
  parts = [BatchPlan(40, 8, 3, process_index=p, process_count=4).local_rows(7) for p in range(4)]
  np.testing.assert_array_equal(np.concatenate(parts), plan.global_rows(7))
  with pytest.raises(ValueError, match="larger than the 4"):
    BatchPlan(4, 8, 0)


def test_marked_batch_is_model_space_with_exact_border():
  images = np.full((2, 4, 4, 1), 255, np.uint8)
  keys = marks.keys_for(0, [0, 1])
  x = marked_batch(images, keys, 2, "border")
  assert x.shape == (2, 8, 8, 1) and x.dtype == np.float32
  assert np.all(x[:, 2:6, 2:6] == 1.0)
  mask = marks.key_mask(8, 8, 2)[..., 0].astype(bool)
  for i in range(2):
    assert np.all(x[i][mask] == np.float32(2 * keys[i] - 1))


def test_marked_batch_with_four_keys_per_image():
  images = np.full((2, 4, 4, 1), 255, np.uint8)
  keys = marks.keys_for(0, [0, 1], 4)  # [2, 4]: top, right, bottom, left
  x = marked_batch(images, keys, 2, "border")
  assert x.shape == (2, 8, 8, 1) and x.dtype == np.float32
  assert np.all(x[:, 2:6, 2:6] == 1.0)
  masks = marks.key_masks(8, 8, 2, "border", 4)[..., 0].astype(bool)
  for i in range(2):
    for s in range(4):
      assert np.all(x[i][masks[s]] == np.float32(2 * keys[i, s] - 1))
  with pytest.raises(ValueError, match="needs at least 2 image channels"):
    marked_batch(images, keys[:, :2], 2, "border", "channels")
