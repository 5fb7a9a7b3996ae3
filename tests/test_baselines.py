"""Baseline metrics: chunked nearest neighbours, Carlini's modified l2 and its patched variant,
scoring functions and their direction, embedding similarity with a pluggable encoder."""

import numpy as np
import pytest

from solidmark_jax.metrics import baselines


def _brute(gen, train, grid=None):
  """[G, M] normalised (patched) l2 from explicit differences."""
  d = gen[:, None].astype(np.float64) - train[None].astype(np.float64)  # [G, M, H, W, C]
  if grid is None:
    return np.sqrt(np.mean(d * d, axis=(2, 3, 4)))
  g, m, h, w, c = d.shape
  gh, gw = grid
  p = d.reshape(g, m, gh, h // gh, gw, w // gw, c)
  return np.sqrt(np.mean(p * p, axis=(3, 5, 6)).max(axis=(2, 3)))


@pytest.mark.parametrize("backend", ["jax", "numpy"])
@pytest.mark.parametrize("grid", [None, (2, 2)])
def test_nearest_neighbors_in_chunks_equal_brute_force(backend, grid):
  rs = np.random.default_rng(0)
  train = rs.random((53, 8, 8, 3), dtype=np.float32)  # 53: the last chunk of 16 is ragged
  gen = np.concatenate([train[[7, 40]], rs.random((3, 8, 8, 3), dtype=np.float32)])
  out = baselines.nearest_neighbors(gen, train, 5, grid=grid, batch_size=16, backend=backend)
  ref = _brute(gen, train, grid)
  order = np.argsort(ref, axis=1, kind="stable")[:, :5]
  np.testing.assert_array_equal(out["index"], order)
  np.testing.assert_allclose(out["distance"], np.take_along_axis(ref, order, 1), rtol=1e-12, atol=1e-12)
  assert out["distance"][0, 0] == 0.0 and out["distance"][1, 0] == 0.0  # exact copies: exactly 0
  assert out["index"][0, 0] == 7 and out["index"][1, 0] == 40
  assert np.all(np.diff(out["distance"], axis=1) >= 0)


def test_nearest_neighbors_reads_any_image_set_and_caps_n():

  class Reader:  # a dataset read on demand, no array in memory
    def __init__(self, images):
      self.images, self.reads = images, 0

    def __len__(self):
      return len(self.images)

    def __getitem__(self, index):
      self.reads += 1
      return self.images[index]

  rs = np.random.default_rng(1)
  train = rs.random((10, 4, 4, 1))
  reader = Reader(train)
  out = baselines.nearest_neighbors(train[:2], reader, n_neighbors=50, batch_size=4, backend="numpy")
  assert out["index"].shape == (2, 10)  # n capped at M
  assert reader.reads >= 3
  np.testing.assert_array_equal(np.sort(out["index"], axis=1), np.tile(np.arange(10), (2, 1)))


def test_patch_options_and_bad_input():
  assert baselines.resolve_grid(32, 32, grid=(4, 4)) == baselines.resolve_grid(32, 32, patch_size=8) == (4, 4)
  assert baselines.resolve_grid(16, 16, patch_size=8) == (2, 2)
  assert baselines.resolve_grid(16, 16) is None
  with pytest.raises(ValueError, match="not both"):
    baselines.resolve_grid(16, 16, grid=(2, 2), patch_size=8)
  with pytest.raises(ValueError, match="patch_size=5 px"):
    baselines.resolve_grid(16, 16, patch_size=5)
  with pytest.raises(ValueError, match=r"patch grid \(3, 3\)"):
    baselines.resolve_grid(16, 16, grid=(3, 3))
  x = np.zeros((2, 8, 8, 1))
  with pytest.raises(ValueError, match="backend"):
    baselines.nearest_neighbors(x, x, backend="torch")
  with pytest.raises(ValueError, match=r"generated: expected images \[N, H, W, C\]"):
    baselines.nearest_neighbors(x[0], x)
  with pytest.raises(ValueError, match="training images are"):
    baselines.nearest_neighbors(x, np.zeros((2, 4, 4, 1)))
  with pytest.raises(ValueError, match="empty"):
    baselines.nearest_neighbors(x, np.zeros((0, 8, 8, 1)))


def test_carlini_copy_is_zero_far_is_large():
  rs = np.random.default_rng(2)
  train = rs.random((60, 8, 8, 3), dtype=np.float32)
  far = np.full((1, 8, 8, 3), 3.0, np.float32)  # far from every training image, about equally
  gen = np.concatenate([train[11:12], far])
  out = baselines.carlini_l2(gen, train, n_neighbors=50, alpha=0.5, batch_size=16)
  assert out["score"][0] == 0.0 and out["l2"][0] == 0.0 and out["nearest"][0] == 11
  assert 1.8 < out["score"][1] <= 2.0  # nearest ~ mean of the 50 nearest: about 1 / alpha
  near = np.sort(_brute(far, train)[0])[:50]
  np.testing.assert_allclose(out["score"][1], near[0] / (0.5 * near.mean()), rtol=1e-12)
  np.testing.assert_allclose(out["neighbors_mean"][1], near.mean(), rtol=1e-12)
  # n identical training images and a copy of them: 0, not NaN
  np.testing.assert_array_equal(baselines.carlini_score(np.zeros((1, 3))), [0.0])
  with pytest.raises(ValueError, match="alpha"):
    baselines.carlini_score(np.ones((1, 3)), alpha=0)


def test_patched_variant_one_differing_patch_dominates():
  train = np.zeros((3, 16, 16, 1), np.float32)
  train[1] = 0.35  # every pixel somewhat off
  train[2] = 1.0  # far
  gen = np.zeros((1, 16, 16, 1), np.float32)
  gen[0, :8, :8] = 0.6  # one 8 x 8 patch far off, the other three exact
  whole = baselines.nearest_neighbors(gen, train, 3, backend="numpy")
  patched = baselines.nearest_neighbors(gen, train, 3, patch_size=8, backend="numpy")
  # whole image: the patch is diluted over 4 patches' worth of pixels: sqrt(0.6^2 / 4) = 0.3 to
  # image 0, sqrt((0.25^2 + 3 0.35^2) / 4) = 0.328 to image 1
  np.testing.assert_array_equal(whole["index"][0, :2], [0, 1])
  np.testing.assert_allclose(whole["distance"][0, :2], [0.3, np.sqrt(0.1075)], rtol=1e-6)
  # patched: the worst patch decides: 0.6 to image 0, max(0.25, 0.35) to image 1 (nearer now)
  np.testing.assert_array_equal(patched["index"][0, :2], [1, 0])
  np.testing.assert_allclose(patched["distance"][0, :2], [0.35, 0.6], rtol=1e-6)
  np.testing.assert_allclose(baselines.pairwise_l2(gen, train, grid=(2, 2))[0, :2], [0.6, 0.35], rtol=1e-6)


def test_scoring_direction_counts_and_tails():
  distances = np.array([0.0, 0.05, 0.1, 0.3, 0.9])
  np.testing.assert_array_equal(baselines.count_memorised(distances, (0.1, 0.05, 0.01), "lower"), [3, 2, 1])
  sims = np.array([0.99, 0.95, 0.5, 0.2])
  np.testing.assert_array_equal(baselines.count_memorised(sims, (0.9, 0.95, 0.99), "higher"), [2, 2, 1])
  s = baselines.score_summary(distances, (0.1, 0.01), "lower")
  assert s["counts"] == [3, 1] and s["rates"] == [0.6, 0.2] and s["n"] == 5
  assert s["extreme"] == s["min"] == 0.0 and s["tail_95"] == s["p5"] == np.percentile(distances, 5)
  lo, hi = s["ci"][0]
  assert lo < 0.6 < hi
  t = baselines.score_summary(sims, (0.9,), "higher")
  assert t["extreme"] == t["max"] == 0.99 and t["tail_95"] == t["p95"] == np.percentile(sims, 95)
  with pytest.raises(ValueError, match="direction"):
    baselines.count_memorised(distances, (0.1,), "down")
  with pytest.raises(ValueError, match="sequence"):
    baselines.score_summary(distances, 0.1, "lower")
  with pytest.raises(ValueError, match="distinct"):
    baselines.score_summary(distances, (0.1, 0.1), "lower")


def test_embedding_similarity_finds_the_right_neighbour():
  rs = np.random.default_rng(4)
  train = rs.random((40, 8, 8, 1))
  gen = train[[3, 29, 17]] + 0.02 * rs.standard_normal((3, 8, 8, 1))  # noisy copies
  encoder = baselines.pooled_pixels_encoder(pool=2)
  calls = []
  counting = lambda x: calls.append(len(x)) or encoder(x)
  out = baselines.embedding_similarity(counting, gen, train, batch_size=16)
  np.testing.assert_array_equal(out["nearest"], [3, 29, 17])
  assert np.all(out["similarity"] > 0.95) and np.all(out["similarity"] <= 1.0)
  assert max(calls) <= 16  # batched
  e = encoder(np.concatenate([gen, train]))
  e /= np.linalg.norm(e, axis=1, keepdims=True)
  np.testing.assert_allclose(out["similarity"], (e[:3] @ e[3:].T).max(axis=1), rtol=1e-12)
  with pytest.raises(ValueError, match="encoder must map"):
    baselines.embedding_similarity(lambda x: np.zeros((1, 4)), gen, train)
