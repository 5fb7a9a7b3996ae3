"""Query augmentations: transform the known region before outpainting (SPEC section 6, paper Table 4).

Only the known region (mask == 0) changes; the marked region (mask == 1) is returned untouched.
The transform acts on the known region's bounding box, the "centre" (for the border pattern,
exactly the image inside the border):

- "crop", levels 1-4: a random window of relative side 0.8 / 0.6 / 0.4 / 0.2 of the centre (its
  height and width each scaled, rounded, at least 1 px; offset uniform per image) is resized back to
  the centre's size with `jax.image.resize` (bilinear).
- "blur", levels 1-4: a Gaussian blur with kernel 5 / 9 / 13 / 17 and torchvision's default sigma
  for that kernel, sigma = 0.3 ((k - 1) / 2 - 1) + 0.8; separable, reflect padding at the centre's
  edges (as torchvision's `gaussian_blur`), so nothing outside the centre leaks in.
- "rotate", by `angle` degrees counter-clockwise (as torchvision's `rotate`) about the centre's
  midpoint, bilinear. Fill: a pixel whose source falls outside the centre takes the nearest edge
  pixel's value (replicate padding), so no constant value (least of all the key) enters. Angles
  that are multiples of 90 degrees are exact (90 degrees on a square centre == np.rot90).

Level 0 of crop / blur, angle 0 and "none" are the identity. Pixels of the marked region inside the
bounding box (the centre pattern's key square) are replaced, before the transform, by the mean of
the image's known pixels, so no key value leaks into the known region; afterwards they are
restored.

Compilation: the name, the level and the centre's box (from the mask, read on the host) are static
(crop and kernel sizes set shapes, so one compilation per level); the images, the mask values, the
PRNG key, the ids and the rotation angle are traced: a new angle does not recompile.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from solidmark_jax.config import section_items

AUGMENTATIONS = ("none", "crop", "blur", "rotate")
CROP_SIZES = (1.0, 0.8, 0.6, 0.4, 0.2)  # crop level -> relative side of the window (level 0: identity)
BLUR_KERNELS = (1, 5, 9, 13, 17)  # blur level -> Gaussian kernel size (level 0: identity)
LEVELS = tuple(range(len(CROP_SIZES)))
_SALT = 0xA06  # Augmentation.key(): fold_in(key(seed), salt)
_CONFIG_FIELDS = ("name", "level", "angle", "seed")
_TRACES = [0]  # times the jitted core was traced (tests check that an angle does not recompile)


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """A query augmentation and its strength.

  Attributes:
    name: one of `AUGMENTATIONS`.
    level: crop / blur: 0-4 (`CROP_SIZES`, `BLUR_KERNELS`; 0 is the identity); 0 otherwise.
    angle: rotate: degrees, counter-clockwise; 0 otherwise.
    seed: seeds the random crops (`key()`), >= 0.
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
    if self.name in ("crop", "blur") and lv not in LEVELS:
      table = (f"relative sizes {CROP_SIZES[1:]}" if self.name == "crop" else f"kernel sizes {BLUR_KERNELS[1:]}")
      raise ValueError(f"{field}.level must be in {LEVELS[0]}..{LEVELS[-1]} for {self.name} (levels 1-4: "
                       f"{table}; 0: identity), got {lv}")
    if self.name != "rotate" and a != 0:
      raise ValueError(f"{field}.angle={a} is only used by name 'rotate', not {self.name!r}; set it to 0")
    if self.name in ("none", "rotate") and lv != 0:
      hint = "; set the angle instead" if self.name == "rotate" else ""
      raise ValueError(f"{field}.level={lv} is only used by 'crop' and 'blur', not {self.name!r}{hint}")
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
    return self.name == "none" or (self.name in ("crop", "blur") and self.level == 0) or (
        self.name == "rotate" and float(self.angle) % 360.0 == 0.0)

  @property
  def crop_size(self) -> float:
    """Relative side of the crop window (1.0 unless a crop)."""
    return CROP_SIZES[self.level] if self.name == "crop" else 1.0

  @property
  def kernel_size(self) -> int:
    """Gaussian kernel size (1 unless a blur)."""
    return BLUR_KERNELS[self.level] if self.name == "blur" else 1

  def key(self) -> jax.Array:
    """The default PRNG key of the random crops for this seed."""
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


def centre_box(mask) -> tuple[int, int, int, int]:
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
  """A random window of relative side `size`, resized back (bilinear). centre [h, w, C] -> [h, w, C]."""
  h, w, c = centre.shape
  ch, cw = (max(1, int(math.floor(size * n + 0.5))) for n in (h, w))
  ky, kx = jax.random.split(key)
  top = jax.random.randint(ky, (), 0, h - ch + 1)
  left = jax.random.randint(kx, (), 0, w - cw + 1)
  window = jax.lax.dynamic_slice(centre, (top, left, 0), (ch, cw, c))  # [ch, cw, C]
  return jax.image.resize(window, (h, w, c), method="linear")


def gaussian_blur(images: jax.Array, kernel_size: int) -> jax.Array:
  """Separable Gaussian blur with reflect padding. images [N, h, w, C] -> [N, h, w, C]."""
  kernel = gaussian_kernel(kernel_size)
  r = kernel_size // 2
  x = images
  for axis in (1, 2):
    n = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    xp = jnp.pad(x, pad, mode="reflect")
    x = sum(float(kernel[d]) * jax.lax.slice_in_dim(xp, d, d + n, axis=axis) for d in range(kernel_size))
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
  if name == "crop":
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(ids)  # [N] per-image keys
    centre = jax.vmap(lambda c, k: crop_resize(c, CROP_SIZES[level], k))(centre, keys)
  elif name == "blur":
    centre = gaussian_blur(centre, BLUR_KERNELS[level])
  elif name == "rotate":
    centre = rotate(centre, cos_sin)
  out = known.at[:, top:top + h, left:left + w, :].set(centre.astype(known.dtype))
  return jnp.where(marked, known, out)  # the marked region is untouched


_augment_jit = jax.jit(_augment, static_argnames=("name", "level", "box"))


def augment(known, mask, spec: Augmentation, rng: jax.Array | None = None, ids=None) -> jax.Array:
  """Applies a query augmentation to the known region of a batch. Pure and jitted.

  Args:
    known: [N, H, W, C] model-space images (only mask == 0 is changed).
    mask: [H, W, 1], 1 on the marked (unknown) region; concrete (its box is static).
    spec: the augmentation (static: name and level; the angle is traced).
    rng: PRNG key of the random crops (default `spec.key()`); image n uses fold_in(rng, ids[n]).
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
