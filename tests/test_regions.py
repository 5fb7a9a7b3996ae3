"""Region memorisation: masks from a folder, a segmenter and the plain-background default; region queries
through the outpainting loop (an oracle reconstructs the hidden region exactly and still reads every key;
a denoiser blind to the image scores at the region null)."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from data_helpers import cfg, has_fashion
from solidmark_jax import marks, metrics
from solidmark_jax.data import open_source
from solidmark_jax.diffusion import make_schedule
from solidmark_jax.evaluation import regions
from solidmark_jax.metrics import regions as region_stats
from solidmark_jax.outpaint import SamplerSpec, make_outpaint_fn
from solidmark_jax.report import ResultStore, write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 100
SCHED = make_schedule("cosine", T)
PAD, SIDE = 2, 8  # 8x8 content, 12x12 marked


def objects(n, seed=0, channels=1):
  """Content images [n, 8, 8, C] in [0, 1]: a plain dark background and a bright random rectangle off the edges."""
  rs = np.random.default_rng(seed)
  x = np.full((n, SIDE, SIDE, channels), 0.05, np.float32)
  fg = np.zeros((n, SIDE, SIDE), bool)
  for i in range(n):
    top, left = rs.integers(1, 4, size=2)
    h, w = rs.integers(2, SIDE - top), rs.integers(2, SIDE - left)
    h, w = min(h, SIDE - 1 - top), min(w, SIDE - 1 - left)
    fg[i, top:top + h, left:left + w] = True
    x[i][fg[i]] = 0.5 + 0.5 * rs.random((int(fg[i].sum()), channels))
  return x, fg


def test_plain_background_finds_the_object_and_its_documented_failures():
  x, fg = objects(16, channels=3)
  np.testing.assert_array_equal(regions.plain_background_masks(x), fg)
  # A hole of background colour inside the object is foreground (not connected to the edge) ...
  ring = np.full((1, SIDE, SIDE, 1), 0.05, np.float32)
  ring[0, 1:7, 1:7] = 0.9
  ring[0, 3:5, 3:5] = 0.05
  assert regions.plain_background_masks(ring)[0, 3:5, 3:5].all()
  # ... and a dark part of the object touching the edge is background.
  touching = ring.copy()
  touching[0, 1:7, 0:2] = 0.05
  assert not regions.plain_background_masks(touching)[0, 2, 1]
  with pytest.raises(ValueError, match=r"\[B, h, w, C\]"):
    regions.plain_background_masks(x[0])


@has_fashion
def test_plain_background_on_fashion_mnist(fashion_dir):
  """Fashion-MNIST is clothing on black: the default mask covers the garment, not the background."""
  src = open_source(cfg(name="fashion_mnist", data_dir=fashion_dir), "train")
  images = np.asarray(src.read(np.arange(64))["image"], np.float32) / 255.0
  fg = regions.plain_background_masks(images)
  frac = fg.mean(axis=(1, 2))
  assert np.median(frac) > 0.3 and frac.max() < 0.95 and frac.min() > 0.05
  assert np.all(images[..., 0][~fg] <= 0.11)  # background: within the tolerance 0.1 of the near-black edges
  assert images[..., 0][fg].mean() > 0.3


def test_masks_from_folder_round_trip_and_clear_errors(tmp_path):
  x, fg = objects(4)
  for i, m in enumerate(fg):
    Image.fromarray((m * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
  np.testing.assert_array_equal(regions.masks_from_folder(str(tmp_path), range(4), x), fg)
  Image.fromarray(fg[0].astype(np.uint8)).save(tmp_path / "shirt.png")  # 0 / 1 values, by file name
  np.testing.assert_array_equal(regions.masks_from_folder(str(tmp_path), ["photos/shirt.jpg"], x[:1]), fg[:1])
  with pytest.raises(FileNotFoundError, match=r"no mask for image 7 in .* \(expected 7.png\)"):
    regions.masks_from_folder(str(tmp_path), [7], x[:1])
  Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "small.png")
  with pytest.raises(ValueError, match=r"small.png is 5x5, image small is 8x8"):
    regions.masks_from_folder(str(tmp_path), ["small"], x[:1])
  Image.fromarray(np.full((8, 8), 128, np.uint8)).save(tmp_path / "grey.png")
  with pytest.raises(ValueError, match=r"grey.png \(image grey\) is not binary"):
    regions.masks_from_folder(str(tmp_path), ["grey"], x[:1])


def test_segmenter_masks_are_checked():
  x, fg = objects(3)
  np.testing.assert_array_equal(regions.segment(lambda im: im[..., 0] > 0.2, x), fg)

  def wrong_size(im):
    return np.zeros((len(im), 4, 4), bool)

  with pytest.raises(ValueError, match="segmenter .*wrong_size: masks are 4x4, image 0 is 8x8"):
    regions.segment(wrong_size, x)
  with pytest.raises(ValueError, match="image b is not binary"):
    regions.segment(lambda im: np.where(np.arange(3)[:, None, None] == 1, im[..., 0], im[..., 0] > 0.2), x,
                    names=["a", "b", "c"])


def test_regions_on_the_marked_image_never_include_the_key():
  _, fg = objects(2)
  on_border = regions.to_marked(fg, PAD, "border")
  assert on_border.shape == (2, 12, 12) and on_border.sum() == fg.sum()
  key = marks.key_mask(12, 12, PAD)
  for name in regions.REGIONS:
    hidden = regions.hidden_region(on_border, name, key)
    assert hidden.shape == (2, 12, 12, 1) and not np.any((hidden[..., 0] > 0) & (key[..., 0] > 0))
  background = regions.hidden_region(on_border, "background", key)[..., 0] > 0
  assert np.all(background | on_border | (key[None, ..., 0] > 0))  # the two regions and the key tile the image
  centre = regions.to_marked(np.ones((1, 12, 12), bool), PAD, "centre")
  assert not np.any(centre[0] & (marks.key_mask(12, 12, PAD, "centre")[..., 0] > 0))
  with pytest.raises(ValueError, match="region must be one of"):
    regions.hidden_region(on_border, "sky", key)


# -- region queries through the loop --------------------------------------------------------------


def marked_objects(n, seed=0):
  x, fg = objects(n, seed)
  keys = marks.keys_for(seed, np.arange(n))
  x0 = marks.to_model_space(marks.apply_border(x, keys.astype(np.float32), PAD))
  return x0, keys, regions.to_marked(fg, PAD)


def table_denoiser(table, x_t, t, condition):
  """The oracle: eps of the clean image table[condition]."""
  abar = SCHED.abar[t][:, None, None, None]
  return (x_t - jnp.sqrt(abar) * table[condition]) / jnp.sqrt(1.0 - abar)


@pytest.mark.parametrize("region", regions.REGIONS)
def test_oracle_reconstructs_the_hidden_region_exactly_and_reads_the_key(region):
  n = 8
  x0, keys, fg = marked_objects(n)
  key = marks.key_mask(12, 12, PAD)
  hidden = regions.hidden_region(fg, region, key)
  fn = make_outpaint_fn(table_denoiser, SCHED, SamplerSpec(num_steps=6), return_images=True)
  known = np.where(hidden > 0, 0.0, x0).astype(np.float32)  # nothing of the hidden region goes in
  out = fn(jnp.asarray(x0), known, key, np.arange(n), jax.random.key(0), 2, regions=hidden)
  np.testing.assert_array_equal(metrics.l_sm(np.asarray(out["k_pred"]), keys), np.zeros((n, 2)))
  scores = regions.region_scores(out["images"], x0, hidden)
  assert scores["l2"].shape == (n, 2) and np.all(scores["pixels"] > 0)
  np.testing.assert_array_less(scores["l2"], 1e-5)
  np.testing.assert_allclose(scores["ssim"], 1.0, atol=1e-4)
  # the region really was outpainted: without it in the call, the zeroed pixels stay as given
  plain = fn(jnp.asarray(x0), known, key, np.arange(n), jax.random.key(0), 1)
  assert regions.region_scores(plain["images"], x0, hidden)["l2"].min() > 0.05
  assert fn.trace_count == 2  # with and without regions: one compile each, whatever the masks


def test_a_denoiser_blind_to_the_image_scores_at_the_region_null():
  """The oracle of *other* images (a fixed derangement): each foreground is reconstructed as some other
  image's, so the members' region l2 is distributed as the permutation null's."""
  n = 96
  x0, _, fg = marked_objects(n, seed=4)
  key = marks.key_mask(12, 12, PAD)
  hidden = regions.hidden_region(fg, "foreground", key)
  others = jnp.asarray(x0[np.roll(np.arange(n), 17)])
  fn = make_outpaint_fn(table_denoiser, SCHED, SamplerSpec(num_steps=4), return_images=True)
  out = fn(others, x0, key, np.arange(n), jax.random.key(1), 1, regions=hidden)
  scores = regions.region_scores(out["images"], x0, hidden)["l2"][:, 0]
  null = regions.permuted_region_scores(out["images"], x0, hidden, seed=3)["l2"][:, 0]
  assert scores.min() > 0.05  # nothing is reconstructed
  assert metrics.mann_whitney(scores, null, "less")["p_value"] > 0.01
  assert abs(np.median(scores) - np.median(null)) < 0.25 * np.median(null)


def test_region_scores_bad_shapes_and_empty_regions():
  x0, _, fg = marked_objects(2)
  hidden = np.zeros((2, 12, 12, 1), np.float32)
  s = regions.region_scores(x0[:, None], x0, hidden)
  assert np.all(np.isnan(s["l2"])) and list(s["pixels"]) == [0, 0]
  with pytest.raises(ValueError, match=r"\[N, r, H, W, C\]"):
    regions.region_scores(x0, x0, hidden)
  fn = make_outpaint_fn(table_denoiser, SCHED, SamplerSpec(num_steps=2))
  with pytest.raises(ValueError, match=r"regions must be \[N, H, W, 1\]"):
    fn(jnp.asarray(x0), x0, marks.key_mask(12, 12, PAD), np.arange(2), jax.random.key(0), 1, regions=hidden[0])


# -- the report's region section ------------------------------------------------------------------


def test_region_report_separates_a_memorised_region_from_its_null(tmp_path):
  """Members reconstruct their region (l2 far below the null); non-members only as well as any image's."""
  rs = np.random.default_rng(2)
  store = ResultStore(str(tmp_path / "results.jsonl"), meta={"region": "foreground", "region_masks": {"masks": "plain"}})
  for group, n, own in (("members", 40, 0.01), ("non_members", 40, 0.3)):
    ids = np.arange(n)
    keys = marks.keys_for(1, ids)
    null = 0.3 + 0.05 * rs.random((n, 2))
    l2 = own + (0.05 * rs.random((n, 2)) if group == "non_members" else 0.005 * rs.random((n, 2)))
    store.append(group, ids, keys, np.clip(keys[:, None] + 0.3 * rs.standard_normal((n, 2)), 0, 1),
                 extras={"region_l2": l2, "region_ssim": 1 - l2, "region_null_l2": null, "region_null_ssim": 1 - null})
  summary = write_report(str(tmp_path), store.results(), (0.05,), metadata=store.meta, num_permutations=20)
  sec = summary["region"]
  members, others = sec["groups"]["members"], sec["groups"]["non_members"]
  assert members["vs_null"]["closer"] == 1.0 and members["vs_null"]["p_value"] < 1e-6
  assert others["vs_null"]["p_value"] > 0.01  # no closer than another image's truth
  assert sec["comparisons"]["members_vs_non_members"]["membership_inference"]["auc"] == 1.0
  assert sec["statistic"] == "best" and members["l2"]["mean"] == pytest.approx(
      region_stats.reduce(store.results().select("members").extras["region_l2"]).mean())
  assert (tmp_path / "region_l2_hist.png").exists()
  assert "## Region query: the foreground hidden with the key" in (tmp_path / "summary.md").read_text()
  with pytest.raises(ValueError, match="unknown extra fields"):
    store.append("members", [99], [0.5], [[0.5, 0.5]], extras={"region_psnr": [[1.0, 1.0]]})


@has_fashion
def test_mask_figure_script_measures_the_documented_cases(fashion_dir, tmp_path):
  """docs/figures/region_masks.py (docs/img/region_masks.png): exact on plain clip art, off on the failures."""
  spec = importlib.util.spec_from_file_location("region_masks", os.path.join(ROOT, "docs", "figures",
                                                                             "region_masks.py"))
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  out = tmp_path / "masks.png"
  result = script.main(["--data_dir", fashion_dir, "--out", str(out), "--num_fashion", "2"])
  art = result["clip_art"]
  assert art["disc on white"]["iou"] == 1.0 and art["two shapes"]["iou"] == 1.0
  assert art["white part at the edge"]["iou"] < 0.8 and art["gradient background"]["iou"] < 0.5
  assert art["ring with a hole"]["mask_fraction"] > art["ring with a hole"]["true_fraction"]  # the hole is foreground
  assert out.exists() and json.loads((tmp_path / "masks.json").read_text()) == result


# -- FB-Mem on generations --------------------------------------------------------------------------


def test_fb_mem_categories_and_clusters_on_hand_built_cases():
  """Four generations built from two training images: a verbatim copy, the foreground of image 0 on a new
  background, image 1's background with a new object, and something new; plus a cluster of near-copies."""
  x, fg = objects(2, seed=7, channels=1)
  checker = (np.indices((SIDE, SIDE)).sum(axis=0) % 2)[..., None] * 0.2
  x[1] = np.where(fg[1][..., None], x[1], 0.3 + checker)  # a background of its own (image 0's is plain dark)
  train = np.concatenate([x, x[:1] + 0.01])  # image 2 is a near-copy of image 0 (a cluster of two)
  train_fg = np.concatenate([fg, fg[:1]])
  other, other_fg = objects(1, seed=99)
  verbatim = x[0]
  fg_only = np.where(fg[0][..., None], x[0], 0.8).astype(np.float32)  # image 0's object, a light background
  bg_only = np.where(other_fg[0][..., None], 1.0, x[1])  # image 1's background, a new white object
  bg_only_fg = other_fg[0]
  neither = np.where(other_fg[0][..., None], 1.0, 0.8).astype(np.float32)
  gen = np.stack([verbatim, fg_only, bg_only, neither])
  gen_fg = np.stack([fg[0], fg[0], bg_only_fg, other_fg[0]])
  out = region_stats.fb_mem(gen, gen_fg, train, train_fg, (0.05, 0.05))
  assert list(out["category"]) == ["both", "foreground", "background", "neither"]
  assert out["foreground_nearest"][0] in (0, 2) and out["background_nearest"][2] == 1
  assert out["foreground_cluster"][0] == 2  # close to the image and its near-copy
  assert out["foreground_cluster"][3] == 0 and out["background_cluster"][3] == 0
  assert region_stats.category_counts(out["category"]) == {"both": 1, "foreground": 1, "background": 1, "neither": 1}
  d = region_stats.region_distances(gen, gen_fg, train, train_fg)
  assert d["foreground"][0, 0] == 0.0 and d["background"][0, 0] == 0.0
  # chunked over the references (tiny memory budget) gives the same answer
  small = region_stats.fb_mem(gen, gen_fg, train, train_fg, (0.05, 0.05), memory_mb=1e-4)
  for k in out:
    np.testing.assert_array_equal(small[k], out[k])
  with pytest.raises(ValueError, match="one size"):
    region_stats.region_distances(gen, gen_fg, train[:, :4], train_fg[:, :4])
