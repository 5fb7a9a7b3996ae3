import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from solidmark_jax import marks
from solidmark_jax.evaluation import augment as aug
from solidmark_jax.evaluation.augment import Augmentation

PAD, SIZE = 2, 16  # 12 x 12 centre inside a 2 px border
MASK = marks.key_mask(SIZE, SIZE, PAD)
C = slice(PAD, SIZE - PAD)


def _images(n=3, channels=1, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (n, SIZE, SIZE, channels)).astype(np.float32)


def _border(x):
  return np.asarray(x)[:, MASK[..., 0] > 0.5]


def test_level_tables_and_config_errors():
  assert aug.CROP_SIZES[1:] == (0.8, 0.6, 0.4, 0.2) and aug.BLUR_KERNELS[1:] == (5, 9, 13, 17)
  assert Augmentation.from_config(ConfigDict({"name": "blur", "level": 3})).kernel_size == 13
  assert Augmentation.from_config({"name": "crop", "level": 4}).crop_size == 0.2
  assert Augmentation.from_config({"name": "rotate", "angle": 15.0, "seed": 2}) == Augmentation("rotate", 0, 15.0, 2)
  assert Augmentation.from_config(None) == Augmentation()
  # what a report records: the area crop and the random sigma say so (results of the side crop / fixed
  # sigma, which "crop" / "blur" once meant, do not match them); the others are their fields
  assert Augmentation("crop", 2).as_record() == {"name": "crop", "level": 2, "angle": 0.0, "seed": 0,
                                                 "crop_area": 0.6, "aspect_ratio": [0.75, 4 / 3]}
  assert Augmentation("blur", 1).as_record()["sigma_range"] == [0.1, 2.0]
  assert Augmentation("crop_side", 2).as_record() == {"name": "crop_side", "level": 2, "angle": 0.0, "seed": 0}
  assert Augmentation.from_config({"name": "crop_side", "level": 1}).crop_size == 0.8
  assert Augmentation.from_config({"name": "blur_fixed", "level": 2}).kernel_size == 9
  bad = [({"name": "jpeg"}, r"eval\.augment\.name must be one of \('none', 'crop', 'crop_side', 'blur', "
                            r"'blur_fixed', 'rotate'\)"),
         ({"name": "crop", "level": 5}, r"eval\.augment\.level must be in 0\.\.4 for crop .*area fractions "
                                        r"\(0\.8, 0\.6"),
         ({"name": "crop_side", "level": 5}, r"level must be in 0\.\.4 for crop_side .*relative sides"),
         ({"name": "blur_fixed", "level": 5}, r"level must be in 0\.\.4 for blur_fixed .*kernel sizes"),
         ({"name": "blur", "level": -1}, r"eval\.augment\.level must be in 0\.\.4 for blur .*kernel sizes"),
         ({"name": "blur", "level": 1.5}, r"eval\.augment\.level must be an integer"),
         ({"name": "crop", "level": 1, "angle": 10}, r"eval\.augment\.angle=10 is only used by name 'rotate'"),
         ({"name": "rotate", "level": 2}, r"eval\.augment\.level=2 is only used by \('crop', 'crop_side', 'blur', 'blur_fixed'\).*angle"),
         ({"name": "rotate", "angle": float("inf")}, r"eval\.augment\.angle must be a finite number"),
         ({"name": "crop", "level": 1, "seed": -3}, r"eval\.augment\.seed must be an integer >= 0"),
         ({"name": "crop", "levle": 1}, r"eval\.augment: unknown fields \['levle'\]")]
  for section, message in bad:
    with pytest.raises(ValueError, match=message):
      Augmentation.from_config(ConfigDict(section))


def test_identities():
  x = _images()
  for spec in (Augmentation(), Augmentation("crop", 0), Augmentation("crop_side", 0), Augmentation("blur", 0),
               Augmentation("blur_fixed", 0), Augmentation("rotate", angle=0), Augmentation("rotate", angle=360.0)):
    np.testing.assert_array_equal(np.asarray(aug.augment(x, MASK, spec)), x)


@pytest.mark.parametrize("spec", [Augmentation("crop", 1), Augmentation("crop", 4), Augmentation("crop_side", 1),
                                  Augmentation("crop_side", 4), Augmentation("blur", 1), Augmentation("blur", 4),
                                  Augmentation("blur_fixed", 1), Augmentation("blur_fixed", 4),
                                  Augmentation("rotate", angle=37.0)],
                         ids=lambda s: f"{s.name}{s.level or s.angle}")
def test_border_untouched_centre_changed(spec):
  x = _images(channels=3)
  y = np.asarray(aug.augment(x, MASK, spec, jax.random.key(1), np.arange(3)))
  assert y.shape == x.shape and y.dtype == x.dtype
  np.testing.assert_array_equal(_border(y), _border(x))
  for n in range(3):
    assert np.abs(y[n, C, C] - x[n, C, C]).mean() > 0.05, f"{spec} left image {n}'s centre almost unchanged"


def _direct_blur(centres, g):
  """Reference 2-D blur of [N, h, w, C] centres: reflect pad, correlate with the outer product of g [k]."""
  k = len(g)
  r = k // 2
  h, w = centres.shape[1:3]
  ref = np.zeros_like(centres)
  padded = np.pad(centres, ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
  for a in range(k):
    for b in range(k):
      ref += g[a] * g[b] * padded[:, a:a + h, b:b + w]
  return ref


def test_fixed_blur_matches_a_direct_convolution_and_keeps_constants():
  x = _images(n=2, channels=2)
  for level in (1, 2, 3, 4):
    k = aug.BLUR_KERNELS[level]
    g = aug.gaussian_kernel(k)
    assert g.shape == (k,) and abs(g.sum() - 1) < 1e-6 and np.argmax(g) == k // 2
    y = np.asarray(aug.augment(x, MASK, Augmentation("blur_fixed", level)))
    np.testing.assert_allclose(y[:, C, C], _direct_blur(x[:, C, C], g), atol=2e-6)
    const = np.where(MASK > 0.5, 0.9, -0.3)[None].astype(np.float32)  # centre -0.3, border 0.9
    yc = np.asarray(aug.augment(const, MASK, Augmentation("blur_fixed", level)))
    np.testing.assert_allclose(yc, const, atol=1e-6)  # nothing from the border leaks in
  assert aug.blur_sigma(5) == pytest.approx(1.1) and aug.blur_sigma(17) == pytest.approx(2.9)
  smooth = [np.abs(np.diff(np.asarray(aug.augment(x, MASK, Augmentation("blur_fixed", lv)))[:, C, C], axis=1)).mean()
            for lv in range(5)]
  assert all(a > b for a, b in zip(smooth, smooth[1:])), smooth  # stronger level, smoother centre


def test_side_crop_is_a_resized_window_per_image_under_jit():
  x = np.repeat(_images(n=1), 4, axis=0)  # four copies of one image
  spec = Augmentation("crop_side", 2)  # 0.6 of 12 px -> 7 px windows
  fn = jax.jit(lambda known, rng, ids: aug.augment(known, MASK, spec, rng, ids))
  y = np.asarray(fn(x, jax.random.key(0), jnp.asarray([10, 11, 12, 13])))
  assert len({y[n].tobytes() for n in range(4)}) == 4  # per-image crops differ by id
  windows = np.stack([x[0, C, C][t:t + 7, l:l + 7] for t in range(6) for l in range(6)])  # [36, 7, 7, 1]
  resized = np.asarray(jax.image.resize(windows, (36, 12, 12, 1), "linear"))
  for n in range(4):  # each centre is exactly one resized 7 x 7 window
    errs = np.abs(resized - y[n, C, C]).max(axis=(1, 2, 3))
    assert errs.min() < 1e-6, errs.min()
  np.testing.assert_array_equal(_border(y), _border(x))
  # batching does not matter: instance 12 alone gives the same crop (the same window; the values to float
  # rounding, as XLA's CPU code for another batch size may round the resize's last bit differently)
  alone = np.asarray(fn(x[:1], jax.random.key(0), jnp.asarray([12])))
  window = lambda img: int(np.argmin(np.abs(resized - img[C, C]).max(axis=(1, 2, 3))))
  assert window(alone[0]) == window(y[2])
  np.testing.assert_allclose(alone[0], y[2], atol=1e-6)
  other_seed = np.asarray(fn(x, jax.random.key(1), jnp.asarray([10, 11, 12, 13])))
  assert not np.allclose(other_seed, y)


def test_area_crop_area_and_aspect_ratio_match_the_settings():
  """torchvision's RandomResizedCrop(scale=(s, s), ratio=(3/4, 4/3)) on a 96 px centre (STL-10's), 2000 seeds."""
  draw = jax.jit(jax.vmap(jax.vmap(lambda k, s: aug.crop_box(k, 96, 96, s), (0, None)), (None, 0)))
  scales = np.asarray(aug.CROP_SIZES[1:], np.float32)
  all_boxes = np.asarray(draw(jax.random.split(jax.random.key(0), 2000), scales))  # [4, 2000, 4]
  for s, boxes in zip(aug.CROP_SIZES[1:], all_boxes):
    top, left, h, w = boxes.T
    assert np.all((h >= 1) & (w >= 1) & (top >= 0) & (left >= 0) & (top + h <= 96) & (left + w <= 96))
    area = h * w / 96**2
    assert abs(area.mean() - s) < 0.01 and np.abs(area - s).max() < 0.05, (s, area.mean(), np.abs(area - s).max())
    log_r = np.log(w / h)
    # log r uniform in [log 3/4, log 4/3], less the ratios whose window does not fit the square (s r > 1 or
    # s / r > 1): torchvision draws those again, so at s = 0.8 the ratios lie within [0.8, 1.25]
    lo, hi = max(np.log(3 / 4), np.log(s)), min(np.log(4 / 3), -np.log(s))
    assert log_r.min() >= lo - 0.03 and log_r.max() <= hi + 0.03, s  # within the range, up to rounding of sides
    assert log_r.min() < lo + 0.05 and log_r.max() > hi - 0.05, s  # and spanning it
    assert abs(log_r.mean()) < 0.02 and abs(log_r.std() - (hi - lo) / np.sqrt(12)) < 0.02, s  # log-uniform
    # offsets uniform over where the window fits: the window's centre lies at the middle on average
    assert abs(np.mean(top + h / 2) - 48) < 1.5 and abs(np.mean(left + w / 2) - 48) < 1.5, s


def test_area_crop_fallback_as_torchvision():
  # A 10 x 40 centre at scale 0.9: every window would need h >= sqrt(360 * 3 / 4) > 10, none fits, so
  # torchvision falls back to the centre clipped to ratio 4/3: h = 10, w = round(13.3) = 13, centred.
  draw = jax.jit(jax.vmap(lambda k: aug.crop_box(k, 10, 40, 0.9)))
  boxes = np.asarray(draw(jax.random.split(jax.random.key(0), 50)))
  np.testing.assert_array_equal(boxes, np.tile([0, 13, 10, 13], (50, 1)))
  assert aug._fallback_box(40, 10, aug.CROP_RATIO) == (13, 0, 13, 10)  # tall: w = 10, h = round(13.3)
  assert aug._fallback_box(12, 12, aug.CROP_RATIO) == (0, 0, 12, 12)  # ratio within range: the whole centre


def test_area_crop_is_the_resized_window_per_image_under_jit():
  x = np.repeat(_images(n=1, channels=2), 6, axis=0)  # six copies of one image
  ids = jnp.asarray([10, 11, 12, 13, 14, 15])
  rng = jax.random.key(3)
  fn = jax.jit(lambda known, rng, ids: aug.augment(known, MASK, Augmentation("crop", 3), rng, ids))
  y = np.asarray(fn(x, rng, ids))
  boxes = np.asarray(jax.jit(jax.vmap(lambda k: aug.crop_box(k, 12, 12, 0.4)))(aug.query_keys(rng, ids)))
  sizes = set()
  for n, (top, left, h, w) in enumerate(boxes.tolist()):
    sizes.add((h, w))
    assert abs(h * w / 144 - 0.4) < 0.08 and 3 / 4 - 0.15 < w / h < 4 / 3 + 0.2
    window = x[n, C, C][top:top + h, left:left + w]
    np.testing.assert_allclose(y[n, C, C], np.asarray(jax.image.resize(window, (12, 12, 2), "linear")), atol=2e-6)
  assert len(sizes) > 1  # window shapes differ per image, in one compilation
  np.testing.assert_array_equal(_border(y), _border(x))
  alone = np.asarray(fn(x[:1], rng, ids[2:3]))  # batching does not matter
  np.testing.assert_array_equal(alone[0], y[2])
  # a square window resized back: the identity at scale 1 (box = the whole centre)
  c = jnp.asarray(x[0, C, C])
  np.testing.assert_allclose(np.asarray(aug.resize_window(c, jnp.asarray([0, 0, 12, 12]))), x[0, C, C], atol=1e-6)


def test_blur_sigma_is_drawn_per_query_in_torchvision_range():
  sigmas = np.asarray(jax.jit(lambda ids: jax.vmap(aug.draw_sigma)(aug.query_keys(jax.random.key(0), ids)))(
      jnp.arange(2000)))
  assert sigmas.min() >= 0.1 and sigmas.max() <= 2.0
  assert sigmas.min() < 0.15 and sigmas.max() > 1.95 and abs(sigmas.mean() - 1.05) < 0.03  # U(0.1, 2.0)
  x = np.repeat(_images(n=1, channels=2), 4, axis=0)  # one image queried under four ids
  ids = np.asarray([3, 4, 5, 6])
  rng = jax.random.key(9)
  drawn = np.asarray(jax.vmap(aug.draw_sigma)(aug.query_keys(rng, jnp.asarray(ids))))
  assert len(set(drawn.round(4).tolist())) == 4  # a sigma per image id
  for level in (1, 4):
    k = aug.BLUR_KERNELS[level]
    y = np.asarray(aug.augment(x, MASK, Augmentation("blur", level), rng, ids))
    for n in range(4):  # each centre is the explicit blur at its own drawn sigma, not the fixed one
      ref = _direct_blur(x[n:n + 1, C, C], aug.gaussian_kernel(k, float(drawn[n])))[0]
      np.testing.assert_allclose(y[n, C, C], ref, atol=3e-6)
    fixed = np.asarray(aug.augment(x, MASK, Augmentation("blur_fixed", level)))
    assert not np.allclose(y[:, C, C], fixed[:, C, C], atol=1e-3)
    np.testing.assert_array_equal(_border(y), _border(x))
  again = np.asarray(aug.augment(x[2:3], MASK, Augmentation("blur", 2), rng, ids[2:3]))  # batching does not matter
  np.testing.assert_array_equal(again[0], np.asarray(aug.augment(x, MASK, Augmentation("blur", 2), rng, ids))[2])


def test_rotation_exact_at_right_angles_and_no_recompile_per_angle():
  x = _images(channels=3)
  y90 = np.asarray(aug.augment(x, MASK, Augmentation("rotate", angle=90.0)))
  y180 = np.asarray(aug.augment(x, MASK, Augmentation("rotate", angle=180.0)))
  y270 = np.asarray(aug.augment(x, MASK, Augmentation("rotate", angle=-90.0)))
  for n in range(3):
    np.testing.assert_array_equal(y90[n, C, C], np.rot90(x[n, C, C]))
    np.testing.assert_array_equal(y180[n, C, C], np.rot90(x[n, C, C], 2))
    np.testing.assert_array_equal(y270[n, C, C], np.rot90(x[n, C, C], 3))
  np.testing.assert_array_equal(_border(y90), _border(x))
  before = aug.trace_count()
  y30 = np.asarray(aug.augment(x, MASK, Augmentation("rotate", angle=30.0)))
  y45 = np.asarray(aug.augment(x, MASK, Augmentation("rotate", angle=45.0)))
  assert aug.trace_count() - before <= 1  # at most the first angle compiles; the next reuses it
  assert not np.allclose(y30, y45)
  # a constant centre stays constant (replicate fill, nothing from the border)
  const = np.where(MASK > 0.5, 0.9, -0.3)[None].astype(np.float32)
  np.testing.assert_allclose(np.asarray(aug.augment(const, MASK, Augmentation("rotate", angle=33.0))), const,
                             atol=1e-6)


def test_centre_pattern_key_square_untouched_and_not_leaked():
  mask = marks.key_mask(SIZE, SIZE, 4, "centre")  # known: everything but a 4 x 4 square
  x = _images(n=1)
  for spec in (Augmentation("crop", 1), Augmentation("blur", 2), Augmentation("rotate", angle=20.0)):
    lo = np.where(mask > 0.5, -0.8, x).astype(np.float32)  # the same image with two different keys
    hi = np.where(mask > 0.5, 0.8, x).astype(np.float32)
    y_lo = np.asarray(aug.augment(lo, mask, spec, jax.random.key(0)))
    y_hi = np.asarray(aug.augment(hi, mask, spec, jax.random.key(0)))
    known = mask[..., 0] < 0.5
    np.testing.assert_array_equal(y_lo[0][known], y_hi[0][known])  # the key does not reach the known pixels
    np.testing.assert_array_equal(y_hi[0][~known], hi[0][~known])  # the key square is untouched
    assert np.abs(y_lo[0][known] - x[0][known]).mean() > 0.02


def test_bad_inputs():
  x = _images()
  with pytest.raises(ValueError, match=r"augment: mask must be concrete"):
    jax.jit(lambda m: aug.augment(x, m, Augmentation("blur", 1)))(MASK)
  with pytest.raises(ValueError, match=r"augment: mask must be \[H, W, 1\] = \(16, 16, 1\), got \(12, 12, 1\)"):
    aug.augment(x, MASK[:12, :12], Augmentation("blur", 1))
  with pytest.raises(ValueError, match=r"augment: mask has no known pixels"):
    aug.augment(x, np.ones_like(MASK), Augmentation("blur", 1))
  with pytest.raises(ValueError, match=r"augment: known must be \[N, H, W, C\]"):
    aug.augment(x[0], MASK, Augmentation("blur", 1))
  with pytest.raises(ValueError, match=r"augment: ids must be int \[N\] = \[3\]"):
    aug.augment(x, MASK, Augmentation("crop", 1), ids=np.arange(2))
  with pytest.raises(ValueError, match="Gaussian kernel size must be odd"):
    aug.gaussian_kernel(4)
  assert aug.centre_box(MASK) == (PAD, PAD, 12, 12)
