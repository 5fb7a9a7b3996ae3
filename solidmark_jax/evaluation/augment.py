"""Query augmentations: transform the known region before outpainting (the paper's Table 4).

Only the known region (mask == 0) changes; the marked region (mask == 1) is returned untouched.
The transform acts on the known region's bounding box, the "centre" (for the border pattern,
exactly the image inside the border):

- "crop", levels 1-4 (the public SolidMark code's crop): torchvision's `RandomResizedCrop` with
  scale=(s, s), s = 0.8 / 0.6 / 0.4 / 0.2: a window whose AREA is s of the centre's, its aspect ratio
  w / h drawn log-uniformly in [3/4, 4/3], its side lengths round(sqrt(s h w r)) and
  round(sqrt(s h w / r)); up to 10 draws until one fits, else torchvision's fallback (the centre
  clipped to the nearest allowed ratio, centred); offset uniform per image. The window is resized
  back to the centre's size by bilinear sampling at half-pixel centres, which for these enlarging
  resizes is exactly `jax.image.resize(..., "linear")` (and torchvision's bilinear resize).
- "crop_side", levels 1-4: a random window whose SIDES are 0.8 / 0.6 / 0.4 / 0.2 of the centre's
  (area 0.64 / 0.36 / 0.16 / 0.04; height and width each scaled, rounded, at least 1 px; offset
  uniform per image), resized back with `jax.image.resize` (bilinear).
- "blur", levels 1-4 (the public code's blur): torchvision's `GaussianBlur` with kernel 5 / 9 / 13 /
  17 and its default sigma range: sigma ~ U(0.1, 2.0) drawn per query (per image id).
- "blur_fixed", levels 1-4: the same kernels with the fixed sigma torchvision's functional
  `gaussian_blur` takes when none is given, sigma = 0.3 ((k - 1) / 2 - 1) + 0.8.
  Both blurs are separable with reflect padding at the centre's edges (as torchvision's
  `gaussian_blur`), so nothing outside the centre leaks in.
- "rotate", by `angle` degrees counter-clockwise (as torchvision's `rotate`) about the centre's
  midpoint, bilinear. Fill: a pixel whose source falls outside the centre takes the nearest edge
  pixel's value (replicate padding), so no constant value (least of all the key) enters. Angles
  that are multiples of 90 degrees are exact (90 degrees on a square centre == np.rot90).

Level 0 of the crops and blurs, angle 0 and "none" are the identity. Pixels of the marked region inside the
bounding box (the centre pattern's key square) are replaced, before the transform, by the mean of
the image's known pixels, so no key value leaks into the known region; afterwards they are
restored.

Compilation: the name, the level and the centre's box (from the mask, read on the host) are static
(crop and kernel sizes set shapes, so one compilation per level); the images, the mask values, the
PRNG key, the ids and the rotation angle are traced: a new angle does not recompile. Random crops
and blur sigmas of image n come from fold_in(rng, ids[n]): the same for an image whatever its batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike

from solidmark_jax.config import section_items

AUGMENTATIONS = ("none", "crop", "crop_side", "blur", "blur_fixed", "rotate")
CROPS = ("crop", "crop_side")
BLURS = ("blur", "blur_fixed")
# crop level -> relative size of the window: its area ("crop") or its side ("crop_side"); 0: identity
CROP_SIZES = (1.0, 0.8, 0.6, 0.4, 0.2)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # "crop": aspect ratios w / h, drawn log-uniformly (torchvision's default)
CROP_ATTEMPTS = 10  # "crop": draws before torchvision's fallback
BLUR_KERNELS = (1, 5, 9, 13, 17)  # blur level -> Gaussian kernel size (level 0: identity)
BLUR_SIGMA_RANGE = (0.1, 2.0)  # "blur": sigma ~ U(0.1, 2.0) per query (torchvision GaussianBlur's default)
LEVELS = tuple(range(len(CROP_SIZES)))
_SALT = 0xA06  # Augmentation.key(): fold_in(key(seed), salt)
_CONFIG_FIELDS = ("name", "level", "angle", "seed")
_TRACES = [0]  # times the jitted core was traced (tests check that an angle does not recompile)


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """A query augmentation and its strength.

  Attributes:
    name: one of `AUGMENTATIONS`.
    level: crops / blurs: 0-4 (`CROP_SIZES`, `BLUR_KERNELS`; 0 is the identity); 0 otherwise.
    angle: rotate: degrees, counter-clockwise; 0 otherwise.
    seed: seeds the random crops and blur sigmas (`key()`), >= 0.
  """

  name: str = "none"
  level: int = 0
  angle: float = 0.0
  seed: int = 0

  def __post_init__(self):
    self.validate()

  def validate(self, field: str = "augment") -> None:
    """Raises a ValueError naming `field`.name / .level / .angle / .seed for a bad spec."""
    if self.name not in AUGMENTATIONS:
      raise ValueError(f"{field}.name must be one of {AUGMENTATIONS}, got {self.name!r}")
    lv, a = self.level, self.angle
    if isinstance(lv, bool) or not isinstance(lv, (int, np.integer)):
      raise ValueError(f"{field}.level must be an integer, got {lv!r}")
    if isinstance(a, bool) or not isinstance(a, (int, float, np.integer, np.floating)) or not math.isfinite(a):
      raise ValueError(f"{field}.angle must be a finite number of degrees, got {a!r}")
    if self.name in CROPS + BLURS and lv not in LEVELS:
      table = {"crop": f"area fractions {CROP_SIZES[1:]}", "crop_side": f"relative sides {CROP_SIZES[1:]}"}.get(
          self.name, f"kernel sizes {BLUR_KERNELS[1:]}")
      raise ValueError(f"{field}.level must be in {LEVELS[0]}..{LEVELS[-1]} for {self.name} (levels 1-4: "
                       f"{table}; 0: identity), got {lv}")
    if self.name != "rotate" and a != 0:
      raise ValueError(f"{field}.angle={a} is only used by name 'rotate', not {self.name!r}; set it to 0")
    if self.name in ("none", "rotate") and lv != 0:
      hint = "; set the angle instead" if self.name == "rotate" else ""
      raise ValueError(f"{field}.level={lv} is only used by {CROPS + BLURS}, not {self.name!r}{hint}")
    if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
      raise ValueError(f"{field}.seed must be an integer >= 0, got {self.seed!r}")

  @classmethod
  def from_config(cls, section: Any, field: str = "eval.augment") -> "Augmentation":
    """Parses and validates a config section with fields name, level, angle, seed (None: "none").

    Args:
      section: e.g. `config.eval.augment` (a ConfigDict or dict), or None.
      field: the section's path, named in errors.
    """
    items = section_items(section, field, _CONFIG_FIELDS)
    spec = object.__new__(cls)  # validate with the config's field names, not the class's
    for name, default in (("name", "none"), ("level", 0), ("angle", 0.0), ("seed", 0)):
      value = items.get(name, default)
      object.__setattr__(spec, name, default if value is None else value)
    spec.validate(field)
    return spec

  @property
  def is_identity(self) -> bool:
    return self.name == "none" or (self.name in CROPS + BLURS and self.level == 0) or (
        self.name == "rotate" and float(self.angle) % 360.0 == 0.0)

  @property
  def crop_size(self) -> float:
    """Relative size of the crop window: its area ("crop") or side ("crop_side"); 1.0 unless a crop."""
    return CROP_SIZES[self.level] if self.name in CROPS else 1.0

  @property
  def kernel_size(self) -> int:
    """Gaussian kernel size (1 unless a blur)."""
    return BLUR_KERNELS[self.level] if self.name in BLURS else 1

  def as_record(self) -> dict:
    """The spec as reports and result stores record it: the fields, plus the random crop's area and
    ratio range ("crop") or the sigma range ("blur"), so results of the side-scaled crop or the fixed
    sigma, which "crop" and "blur" once meant, are never taken for theirs."""
    record = dataclasses.asdict(self)
    if self.name == "crop":
      record.update(crop_area=self.crop_size, aspect_ratio=list(CROP_RATIO))
    elif self.name == "blur":
      record.update(sigma_range=list(BLUR_SIGMA_RANGE))
    return record

  def key(self) -> jax.Array:
    """The default PRNG key of the random crops and blur sigmas for this seed."""
    return jax.random.fold_in(jax.random.key(self.seed), _SALT)


# ---------------------------------------------------------------------------------------------
# Pure pieces.


def blur_sigma(kernel_size: int) -> float:
  """torchvision's default sigma for a Gaussian kernel size k: 0.3 ((k - 1) / 2 - 1) + 0.8."""
  return 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8


def gaussian_kernel(kernel_size: int, sigma: float | None = None) -> np.ndarray:
  """Normalised 1-D Gaussian float32 [k] over offsets -(k-1)/2 .. (k-1)/2 (k odd)."""
  if kernel_size < 1 or kernel_size % 2 == 0:
    raise ValueError(f"Gaussian kernel size must be odd and >= 1, got {kernel_size}")
  sigma = blur_sigma(kernel_size) if sigma is None else sigma
  d = np.arange(kernel_size, dtype=np.float64) - (kernel_size - 1) / 2
  g = np.exp(-0.5 * (d / sigma) ** 2)
  return (g / g.sum()).astype(np.float32)


def centre_box(mask: ArrayLike) -> tuple[int, int, int, int]:
  """Bounding box (top, left, height, width) of the known region (mask == 0) of a mask [H, W, 1].

  The mask must be concrete (numpy, or a jax array outside jit): the box sets shapes.
  """
  if isinstance(mask, jax.core.Tracer):
    raise ValueError("augment: mask must be concrete (numpy), not traced inside jit: the known region's box "
                     "sets the shapes; close over the mask or call augment outside the jitted function")
  m = np.asarray(mask)
  if m.ndim != 3 or m.shape[-1] != 1:
    raise ValueError(f"augment: mask must be [H, W, 1], got shape {m.shape}")
  known = m[..., 0] < 0.5
  if not known.any():
    raise ValueError("augment: mask has no known pixels (mask == 0): nothing to augment")
  rows, cols = np.flatnonzero(known.any(axis=1)), np.flatnonzero(known.any(axis=0))
  return int(rows[0]), int(cols[0]), int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def rotation(angle: float) -> np.ndarray:
  """(cos, sin) of `angle` degrees as float32 [2], exact (0, +-1) at multiples of 90 degrees."""
  rad = math.radians(float(angle) % 360.0)
  return np.round(np.array([math.cos(rad), math.sin(rad)]), 12).astype(np.float32)


def crop_resize(centre: jax.Array, size: float, key: jax.Array) -> jax.Array:
  """"crop_side": a random window of relative side `size`, resized back (bilinear). [h, w, C] -> [h, w, C]."""
  h, w, c = centre.shape
  ch, cw = (max(1, int(math.floor(size * n + 0.5))) for n in (h, w))
  ky, kx = jax.random.split(key)
  top = jax.random.randint(ky, (), 0, h - ch + 1)
  left = jax.random.randint(kx, (), 0, w - cw + 1)
  window = jax.lax.dynamic_slice(centre, (top, left, 0), (ch, cw, c))  # [ch, cw, C]
  return jax.image.resize(window, (h, w, c), method="linear")


def _fallback_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop fallback: the image clipped to the nearest allowed ratio, centred."""
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def crop_box(key: jax.Array, height: int, width: int, scale: float,
             ratio: tuple[float, float] = CROP_RATIO, attempts: int = CROP_ATTEMPTS) -> jax.Array:
  """torchvision's `RandomResizedCrop.get_params` with scale=(s, s), jittable.

  Up to `attempts` aspect ratios r = w / h are drawn log-uniformly in `ratio`; the first whose window
  (h, w) = (round(sqrt(A s / r)), round(sqrt(A s r))), A = height * width, fits is taken, at a uniform
  offset; if none fits, the centred fallback (`_fallback_box`).

  Args:
    key: PRNG key of this image.
    height, width: the centre's size (static).
    scale: s, the window's area as a fraction of the centre's (a float, or traced).
    ratio: (min, max) aspect ratio w / h.
    attempts: draws before the fallback (torchvision: 10).

  Returns:
    int32 [4]: (top, left, h, w) of the window.
  """
  k_ratio, k_top, k_left = jax.random.split(key, 3)
  log_r = jax.random.uniform(k_ratio, (attempts,), jnp.float32, math.log(ratio[0]), math.log(ratio[1]))
  r = jnp.exp(log_r)  # [attempts]
  target = float(height * width) * jnp.asarray(scale, jnp.float32)
  cw = jnp.round(jnp.sqrt(target * r)).astype(jnp.int32)  # round half to even, as Python's round()
  ch = jnp.round(jnp.sqrt(target / r)).astype(jnp.int32)
  fits = (cw > 0) & (cw <= width) & (ch > 0) & (ch <= height)
  first = jnp.argmax(fits)  # the first attempt that fits (0 if none does)
  f_top, f_left, f_h, f_w = _fallback_box(height, width, ratio)
  found = jnp.any(fits)
  ch = jnp.where(found, ch[first], f_h)
  cw = jnp.where(found, cw[first], f_w)
  top = jnp.where(found, jax.random.randint(k_top, (), 0, height - ch + 1), f_top)
  left = jnp.where(found, jax.random.randint(k_left, (), 0, width - cw + 1), f_left)
  return jnp.stack([top, left, ch, cw]).astype(jnp.int32)


def resize_window(centre: jax.Array, box: jax.Array) -> jax.Array:
  """The window `box` of `centre`, resized back to its size by bilinear sampling. [h, w, C] -> [h, w, C].

  Output pixel i samples the window at (i + 0.5) * size / out - 0.5 (half-pixel centres), clamped to
  the window's edge pixels: for a window no larger than the centre this equals
  `jax.image.resize(window, ..., "linear")`, with the window's size traced (no recompile per size).

  Args:
    centre: [h, w, C].
    box: int [4], (top, left, height, width) of the window (may be traced).
  """
  h, w, _ = centre.shape
  top, left, ch, cw = (box[i].astype(jnp.float32) for i in range(4))

  def coords(n, start, size):
    pos = (jnp.arange(n, dtype=jnp.float32) + 0.5) * (size / n) - 0.5
    pos = start + jnp.clip(pos, 0.0, size - 1.0)
    lo = jnp.floor(pos)
    hi = jnp.minimum(lo + 1.0, start + size - 1.0)
    return lo.astype(jnp.int32), hi.astype(jnp.int32), pos - lo

  y0, y1, wy = coords(h, top, ch)  # [h]
  x0, x1, wx = coords(w, left, cw)  # [w]
  wy, wx = wy[:, None, None], wx[None, :, None]
  at = lambda yy, xx: centre[yy[:, None], xx[None, :], :]  # [h, w, C]
  out = ((1 - wy) * (1 - wx) * at(y0, x0) + (1 - wy) * wx * at(y0, x1)
         + wy * (1 - wx) * at(y1, x0) + wy * wx * at(y1, x1))
  return out.astype(centre.dtype)


def random_resized_crop(centre: jax.Array, scale: float, key: jax.Array) -> jax.Array:
  """"crop": torchvision's RandomResizedCrop(size of the centre, scale=(s, s), ratio=(3/4, 4/3)).

  centre [h, w, C] -> [h, w, C]; the window from `crop_box(key, h, w, scale)`.
  """
  h, w, _ = centre.shape
  return resize_window(centre, crop_box(key, h, w, scale))


def draw_sigma(key: jax.Array) -> jax.Array:
  """"blur": one query's sigma ~ U(0.1, 2.0) (torchvision GaussianBlur's default range). float32 []."""
  return jax.random.uniform(key, (), jnp.float32, *BLUR_SIGMA_RANGE)


def query_keys(rng: jax.Array, ids: jax.Array) -> jax.Array:
  """Per-image PRNG keys fold_in(rng, id) of the random crops and blur sigmas. ids [N] -> keys [N]."""
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(ids)


def gaussian_blur(images: jax.Array, kernel_size: int, sigma: jax.Array | float | None = None) -> jax.Array:
  """Separable Gaussian blur with reflect padding. images [N, h, w, C] -> [N, h, w, C].

  Args:
    images: [N, h, w, C].
    kernel_size: odd k.
    sigma: None (the default sigma of `blur_sigma(k)`), one float, or float [N], one per image (traced:
      no recompile per value).
  """
  r = kernel_size // 2
  if sigma is None or isinstance(sigma, (int, float)):
    weights = [float(v) for v in gaussian_kernel(kernel_size, sigma)]
  else:
    sigma = jnp.asarray(sigma, jnp.float32)
    d = jnp.arange(kernel_size, dtype=jnp.float32) - r
    g = jnp.exp(-0.5 * (d[None, :] / sigma[:, None]) ** 2)
    g = g / jnp.sum(g, axis=1, keepdims=True)  # [N, k]
    weights = [g[:, i, None, None, None] for i in range(kernel_size)]  # [N, 1, 1, 1] each
  x = images
  for axis in (1, 2):
    n = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    xp = jnp.pad(x, pad, mode="reflect")
    x = sum(weights[d] * jax.lax.slice_in_dim(xp, d, d + n, axis=axis) for d in range(kernel_size))
  return x.astype(images.dtype)


def rotate(images: jax.Array, cos_sin: jax.Array) -> jax.Array:
  """Rotation counter-clockwise about the midpoint, bilinear, replicate fill.

  Args:
    images: [N, h, w, C].
    cos_sin: float [2] (`rotation(angle)`), may be traced.

  Returns:
    [N, h, w, C]: out[i, j] = images at the source of (i, j) under the inverse rotation.
  """
  _, h, w, _ = images.shape
  cos, sin = cos_sin[0], cos_sin[1]
  cy, cx = (h - 1) / 2, (w - 1) / 2
  i, j = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
  y, x = i - cy, j - cx  # [h, w] output coordinates about the midpoint (y down, x right)
  ys = jnp.clip(cy + x * sin + y * cos, 0, h - 1)  # source coordinates, clamped: replicate fill
  xs = jnp.clip(cx + x * cos - y * sin, 0, w - 1)
  y0, x0 = jnp.floor(ys).astype(jnp.int32), jnp.floor(xs).astype(jnp.int32)
  y1, x1 = jnp.minimum(y0 + 1, h - 1), jnp.minimum(x0 + 1, w - 1)
  wy, wx = (ys - y0)[..., None], (xs - x0)[..., None]  # [h, w, 1]
  at = lambda yy, xx: images[:, yy, xx, :]  # [N, h, w, C]
  out = ((1 - wy) * (1 - wx) * at(y0, x0) + (1 - wy) * wx * at(y0, x1)
         + wy * (1 - wx) * at(y1, x0) + wy * wx * at(y1, x1))
  return out.astype(images.dtype)


# ---------------------------------------------------------------------------------------------
# The batched function.


def _augment(known, mask, rng, ids, cos_sin, *, name: str, level: int, box: tuple[int, int, int, int]):
  _TRACES[0] += 1  # Python side effect: once per trace
  top, left, h, w = box
  marked = mask > 0.5  # [H, W, 1]
  centre = known[:, top:top + h, left:left + w, :]  # [N, h, w, C]
  hole = marked[top:top + h, left:left + w]  # [h, w, 1]: marked pixels inside the box
  inside = (~hole).astype(known.dtype)
  fill = jnp.sum(centre * inside, axis=(1, 2), keepdims=True) / jnp.sum(inside)  # [N, 1, 1, C]
  centre = jnp.where(hole, fill, centre)
  keys = query_keys(rng, ids)  # [N] per-image keys
  if name == "crop":
    centre = jax.vmap(lambda c, k: random_resized_crop(c, CROP_SIZES[level], k))(centre, keys)
  elif name == "crop_side":
    centre = jax.vmap(lambda c, k: crop_resize(c, CROP_SIZES[level], k))(centre, keys)
  elif name == "blur":
    centre = gaussian_blur(centre, BLUR_KERNELS[level], jax.vmap(draw_sigma)(keys))
  elif name == "blur_fixed":
    centre = gaussian_blur(centre, BLUR_KERNELS[level])
  elif name == "rotate":
    centre = rotate(centre, cos_sin)
  out = known.at[:, top:top + h, left:left + w, :].set(centre.astype(known.dtype))
  return jnp.where(marked, known, out)  # the marked region is untouched


_augment_jit = jax.jit(_augment, static_argnames=("name", "level", "box"))


def augment(known: ArrayLike, mask: ArrayLike, spec: Augmentation, rng: jax.Array | None = None,
            ids: ArrayLike | None = None) -> jax.Array:
  """Applies a query augmentation to the known region of a batch. Pure and jitted.

  Args:
    known: [N, H, W, C] model-space images (only mask == 0 is changed).
    mask: [H, W, 1], 1 on the marked (unknown) region; concrete (its box is static).
    spec: the augmentation (static: name and level; the angle is traced).
    rng: PRNG key of the random crops and blur sigmas (default `spec.key()`); image n uses
      fold_in(rng, ids[n]) (`query_keys`).
    ids: [N] int ids (e.g. instance ids), default the row index: results do not depend on batching.

  Returns:
    [N, H, W, C] like `known`.
  """
  known = jnp.asarray(known)
  if known.ndim != 4:
    raise ValueError(f"augment: known must be [N, H, W, C], got shape {known.shape}")
  box = centre_box(mask)
  if tuple(np.shape(mask)) != (*known.shape[1:3], 1):
    raise ValueError(f"augment: mask must be [H, W, 1] = {(*known.shape[1:3], 1)}, got {tuple(np.shape(mask))}")
  if spec.is_identity:
    return known
  if ids is None:
    ids = jnp.arange(known.shape[0], dtype=jnp.int32)
  ids = jnp.asarray(ids)
  if ids.shape != known.shape[:1] or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"augment: ids must be int [N] = [{known.shape[0]}], got {ids.dtype} {ids.shape}")
  rng = spec.key() if rng is None else rng
  return _augment_jit(known, jnp.asarray(mask, known.dtype), rng, ids.astype(jnp.int32), rotation(spec.angle),
                      name=spec.name, level=int(spec.level), box=box)


def trace_count() -> int:
  """How many times the jitted augmentation was traced in this process."""
  return _TRACES[0]
