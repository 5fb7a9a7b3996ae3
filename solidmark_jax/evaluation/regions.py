"""Region memorisation (FB-Mem's view) through SolidMark's outpainting loop: masks, region queries, scores.

"Demystifying Foreground-Background Memorization in Diffusion Models" (2025) asks *which region* of a
training image a model has memorised. Here a region query hides the SolidMark key region *and* one region
of the image (the foreground, given the background; or the background, given the foreground) and
outpaints both in one pass of the usual loop (`Outpainter(..., regions=...)`): the key is read as usual,
and the hidden region's reconstruction is scored against the truth within the region only (normalised l2
and structural similarity). docs/regions.md.

Foreground masks are boolean [B, h, w] on the *content* images (what the data source holds, before
marking), from one of three sources:
- `masks_from_folder`: a folder of mask images (PNG, 0 / 255 or 0 / 1; e.g. BiRefNet or SAM output) named
  by instance id or by the image's file name;
- `segment`: any segmenter function images [B, h, w, C] in [0, 1] -> masks [B, h, w];
- `plain_background_masks`: a built-in approximation that needs no weights, for images on plain
  backgrounds: the background is the region connected to the image edges whose colour is within a
  tolerance of the edges' colour.
`to_marked` places them on the marked images (the key region never belongs to a region).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import numpy as np
import scipy.ndimage
from numpy.typing import ArrayLike
from PIL import Image

from solidmark_jax import marks
from solidmark_jax.metrics import chance

REGIONS = ("foreground", "background")
MASK_SOURCES = ("plain", "folder", "segmenter")
Segmenter = Callable[[np.ndarray], np.ndarray]
MASK_SUFFIXES = (".png", ".bmp", ".gif", ".jpg", ".jpeg")
SSIM_SIGMA = 1.5  # Wang et al. 2004's Gaussian window (scikit-image's gaussian_weights=True)
SSIM_K1, SSIM_K2 = 0.01, 0.03


# ---------------------------------------------------------------------------------------------
# Masks.


def check_masks(masks: ArrayLike, images: np.ndarray, names: Sequence[str] | None = None,
                source: str = "masks") -> np.ndarray:
  """Foreground masks checked against their images: bool [B, h, w].

  Args:
    masks: [B, h, w] (or [B, h, w, 1]) bool, or numbers that are all 0 or 1.
    images: [B, h, w, C] the images they belong to.
    names: the images' names for error messages (default: their row numbers).
    source: where the masks came from (error messages).

  Raises:
    ValueError naming the source and the image: wrong count, wrong size, values other than 0 and 1.
  """
  m = np.asarray(masks)
  if m.ndim == 4 and m.shape[-1] == 1:
    m = m[..., 0]
  names = [str(i) for i in range(len(images))] if names is None else [str(n) for n in names]
  if m.ndim != 3 or len(m) != len(images):
    raise ValueError(f"{source}: expected {len(images)} masks [B, h, w] for images {images.shape}, got shape {m.shape}")
  if m.shape[1:] != images.shape[1:3]:
    raise ValueError(f"{source}: masks are {m.shape[1]}x{m.shape[2]}, image {names[0]} is "
                     f"{images.shape[1]}x{images.shape[2]} (masks must be at the images' resolution)")
  if m.dtype != bool:
    bad = ~np.isin(m, (0, 1))
    if np.any(bad):
      row = int(np.argwhere(bad.any(axis=(1, 2)))[0, 0])
      raise ValueError(f"{source}: the mask of image {names[row]} is not binary (values "
                       f"{np.unique(m[row])[:6].tolist()}...; expected 0 and 1)")
  return m.astype(bool)


def segment(segmenter: Segmenter, images: np.ndarray, names: Sequence[str] | None = None) -> np.ndarray:
  """A segmenter's foreground masks of `images` [B, h, w, C] in [0, 1], checked: bool [B, h, w]."""
  name = getattr(segmenter, "__qualname__", type(segmenter).__name__)
  return check_masks(segmenter(images), images, names, source=f"segmenter {name}")


def plain_background_masks(images: ArrayLike, tolerance: float = 0.1) -> np.ndarray:
  """Foreground masks of images on plain backgrounds, no weights needed: bool [B, h, w].

  The background is every pixel connected (4-neighbourhood) to the image's edge through pixels whose
  colour is within `tolerance` (max over channels, images in [0, 1]) of the edge colour (the median of
  the edge pixels); everything else is foreground. An approximation (docs/regions.md): it fails where the
  object touches the edge in the background's colour (the touching part is background), on textured or
  gradient backgrounds (too much or too little background), and it counts holes of background colour
  enclosed by the object as foreground.
  """
  x = np.asarray(images, np.float64)
  if x.ndim != 4:
    raise ValueError(f"plain_background_masks: images must be [B, h, w, C] in [0, 1], got shape {x.shape}")
  if not 0 <= tolerance < 1:
    raise ValueError(f"plain_background_masks: tolerance must be in [0, 1), got {tolerance}")
  out = np.zeros(x.shape[:3], bool)
  for b, img in enumerate(x):
    edge = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])  # [2h + 2w, C]
    close = np.max(np.abs(img - np.median(edge, axis=0)), axis=-1) <= tolerance
    labels, _ = scipy.ndimage.label(close)  # 4-connected components of edge-coloured pixels
    border_labels = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    background = np.isin(labels, border_labels[border_labels > 0])
    out[b] = ~background
  return out


def _mask_file(folder: str, name: str) -> str | None:
  for suffix in MASK_SUFFIXES:
    path = os.path.join(folder, name + suffix)
    if os.path.exists(path):
      return path
  return None


def masks_from_folder(folder: str, names: Sequence[str | int], images: np.ndarray) -> np.ndarray:
  """Foreground masks read from `folder`, one file per image: bool [B, h, w].

  Args:
    folder: holds `<name>.png` (or .bmp / .gif / .jpg) per image: white (255, or 1) = foreground.
    names: per image, its instance id or its file name (with or without extension).
    images: [B, h, w, C] the images, for the size check.

  Raises:
    FileNotFoundError naming the image and the folder when its mask is missing; ValueError naming the
    mask file and the image when the sizes differ or the mask is not binary.
  """
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"region masks: no folder {folder}")
  masks = []
  for name, image in zip(names, images):
    stem = os.path.splitext(os.path.basename(str(name)))[0]
    path = _mask_file(folder, stem)
    if path is None:
      raise FileNotFoundError(f"region masks: no mask for image {name} in {folder} (expected {stem}.png)")
    with Image.open(path) as f:
      m = np.asarray(f.convert("L"))
    if m.shape != image.shape[:2]:
      raise ValueError(f"region masks: {path} is {m.shape[0]}x{m.shape[1]}, image {name} is "
                       f"{image.shape[0]}x{image.shape[1]}")
    values = np.unique(m)
    if not (set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}):
      raise ValueError(f"region masks: {path} (image {name}) is not binary: values {values[:6].tolist()}..., "
                       "expected 0 and 255 (or 0 and 1)")
    masks.append(m > 0)
  return check_masks(np.stack(masks) if masks else np.zeros((0, *images.shape[1:3]), bool), images,
                     [str(n) for n in names], source=f"region masks in {folder}")


def to_marked(foreground: np.ndarray, pad: int, pattern: str = "border") -> np.ndarray:
  """Content-image foreground masks [B, h, w] -> [B, H, W] on the marked images: grown by the border
  ("border": the border belongs to no region) or with the key square cleared ("centre")."""
  fg = np.asarray(foreground, bool)
  if pattern == "border":
    return np.pad(fg, ((0, 0), (pad, pad), (pad, pad)))
  key = marks.key_mask(fg.shape[1], fg.shape[2], pad, pattern)[..., 0] > 0
  return fg & ~key[None]


def hidden_region(foreground_marked: np.ndarray, region: str, key_mask: np.ndarray) -> np.ndarray:
  """The region a query hides, float32 [B, H, W, 1]: the foreground, or the background (everything off the
  foreground and off the key region)."""
  if region not in REGIONS:
    raise ValueError(f"region must be one of {REGIONS}, got {region!r}")
  fg = np.asarray(foreground_marked, bool)
  key = np.asarray(key_mask)[..., 0] > 0
  hidden = fg if region == "foreground" else ~fg & ~key[None]
  return hidden[..., None].astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Scores of a hidden region's reconstruction.


def _ssim_map(a: np.ndarray, b: np.ndarray, data_range: float) -> np.ndarray:
  """SSIM per pixel of two images [H, W, C] (Gaussian window sigma 1.5), the mean over channels: [H, W]."""
  c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
  blur = lambda v: scipy.ndimage.gaussian_filter(v, sigma=(SSIM_SIGMA, SSIM_SIGMA, 0), mode="reflect", truncate=3.5)
  mu_a, mu_b = blur(a), blur(b)
  var_a = blur(a * a) - mu_a * mu_a
  var_b = blur(b * b) - mu_b * mu_b
  cov = blur(a * b) - mu_a * mu_b
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
  return s.mean(axis=-1)


def region_scores(outpainted: ArrayLike, truth: ArrayLike, hidden: ArrayLike, *, data_range: float = 2.0) -> dict:
  """How well each outpainting reconstructs its hidden region.

  Args:
    outpainted: [N, r, H, W, C] (model space, as the loop returns them).
    truth: [N, H, W, C] the true marked images (the same space).
    hidden: [N, H, W, 1] the hidden region (`hidden_region`).
    data_range: the value range of the images (2 in model space [-1, 1]).

  Returns:
    {"l2": [N, r] the normalised l2 within the region, sqrt(mean squared difference) over its pixels and
     channels, in units of the data range; "ssim": [N, r] the mean SSIM within the region; "pixels": [N]
     the region's size}. An image whose region is empty gets NaN.
  """
  x = np.asarray(outpainted, np.float64)
  y = np.asarray(truth, np.float64)
  m = np.asarray(hidden, np.float64)[..., 0] > 0.5  # [N, H, W]
  if x.ndim != 5 or x.shape[0] != y.shape[0] or x.shape[2:] != y.shape[1:] or m.shape != y.shape[:3]:
    raise ValueError(f"region_scores: outpainted {x.shape}, truth {y.shape} and hidden {np.shape(hidden)} must be "
                     "[N, r, H, W, C], [N, H, W, C], [N, H, W, 1]")
  n, r = x.shape[:2]
  pixels = m.sum(axis=(1, 2))
  l2, ssim = np.full((n, r), np.nan), np.full((n, r), np.nan)
  for i in range(n):
    if not pixels[i]:
      continue
    for j in range(r):
      d = (x[i, j] - y[i])[m[i]] / data_range  # [P, C]
      l2[i, j] = np.sqrt(np.mean(d * d))
      ssim[i, j] = _ssim_map(x[i, j], y[i], data_range)[m[i]].mean()
  return {"l2": l2, "ssim": ssim, "pixels": pixels.astype(np.int64)}


def permuted_region_scores(outpainted: ArrayLike, truth: ArrayLike, hidden: ArrayLike, seed: int = 0, *,
                           data_range: float = 2.0) -> dict:
  """The region null: each reconstruction scored against another image's truth in its own region (a seeded
  derangement). How close unrelated images are there; e.g. plain black backgrounds match any image's."""
  y = np.asarray(truth)
  perm = chance.derangements(len(y), 1, seed)[0]
  return {**region_scores(outpainted, y[perm], hidden, data_range=data_range), "partner": perm}


# ---------------------------------------------------------------------------------------------
# The region queries of an evaluation.


@dataclasses.dataclass(frozen=True)
class RegionSpec:
  """Which regions an evaluation hides, and where their masks come from (`config.eval.regions`).

  Attributes:
    names: the regions queried, each into its own report (DIR/eval/regions/<name>/); () = none.
    masks: "plain" (`plain_background_masks`), "folder" (`masks_from_folder`, by instance id) or
      "segmenter" (a library user's `segmenter`).
    folder: the mask folder ("folder").
    tolerance: the plain-background colour tolerance ("plain").
    segmenter: images [B, h, w, C] in [0, 1] -> masks [B, h, w] ("segmenter"; not from a config).
  """

  names: tuple[str, ...] = ()
  masks: str = "plain"
  folder: str = ""
  tolerance: float = 0.1
  segmenter: Segmenter | None = None

  def __post_init__(self):
    bad = [n for n in self.names if n not in REGIONS]
    if bad:
      raise ValueError(f"eval.regions.names: {bad} are not regions; choose from {REGIONS}")
    if self.masks not in MASK_SOURCES:
      raise ValueError(f"eval.regions.masks must be one of {MASK_SOURCES}, got {self.masks!r}")
    if self.names and self.masks == "folder" and not os.path.isdir(self.folder):
      raise FileNotFoundError(f"eval.regions.folder: no mask folder {self.folder!r} (eval.regions.masks='folder')")
    if self.names and self.masks == "segmenter" and self.segmenter is None:
      raise ValueError("eval.regions.masks='segmenter' needs a segmenter function (RegionSpec(segmenter=...))")
    if not 0 <= self.tolerance < 1:
      raise ValueError(f"eval.regions.tolerance must be in [0, 1), got {self.tolerance}")

  @classmethod
  def from_config(cls, section: Any) -> "RegionSpec":
    if section is None:
      return cls()
    return cls(names=tuple(section.get("names", ())), masks=section.get("masks", "plain"),
               folder=section.get("folder", ""), tolerance=float(section.get("tolerance", 0.1)))

  def as_record(self) -> dict:
    """The settings as stored with the results (the segmenter by name)."""
    return {"masks": self.masks, "folder": self.folder if self.masks == "folder" else None,
            "tolerance": self.tolerance if self.masks == "plain" else None,
            "segmenter": getattr(self.segmenter, "__qualname__", None) if self.masks == "segmenter" else None}

  def foreground(self, content01: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """Foreground masks bool [B, h, w] of content images [B, h, w, C] in [0, 1] with instance ids `ids`."""
    if self.masks == "plain":
      return plain_background_masks(content01, self.tolerance)
    if self.masks == "folder":
      return masks_from_folder(self.folder, [int(i) for i in ids], content01)
    return segment(self.segmenter, content01, [str(int(i)) for i in ids])


def content_of(marked_model: np.ndarray, pad: int, pattern: str = "border") -> np.ndarray:
  """The content images [B, h, w, C] in [0, 1] of marked model-space images (the border cut off;
  "centre": the whole image, key square included, which `to_marked` clears)."""
  x = np.asarray(marks.from_model_space(np.asarray(marked_model, np.float32)))
  return x[:, pad:-pad, pad:-pad] if pattern == "border" else x


def query_regions(spec: RegionSpec, region: str, marked_model: np.ndarray, ids: Sequence[int], pad: int,
                  pattern: str, key_mask: np.ndarray) -> np.ndarray:
  """The hidden region of a region query for each of `marked_model`'s images: float32 [B, H, W, 1]."""
  fg = spec.foreground(content_of(marked_model, pad, pattern), ids)
  return hidden_region(to_marked(fg, pad, pattern), region, key_mask)
