"""Image decoding and conversion shared by every source: any PIL image to square uint8 [S, S, C].

`to_square` converts every image the same way:
- mode: grayscale is repeated to RGB when `channels == 3`; RGB becomes luminance when `channels == 1`
  (PIL's ITU-R 601-2 luma, L = 0.299 R + 0.587 G + 0.114 B); anything with transparency (RGBA, LA,
  palette with a transparent colour) is composited over white first; 16-bit grayscale is scaled to
  8 bits; other modes (palette, CMYK, YCbCr, 1-bit) are converted by PIL.
- size: a non-square image is centre-cropped to its shorter side, then resized to
  `image_size` x `image_size` with PIL bicubic (antialiased when shrinking). `image_size=None` keeps
  the native size (the image must then be square).

`decode_image` opens an encoded file (JPEG EXIF orientation applied, GIF: the first frame) and
converts it, returning the reason instead of raising when it cannot.
"""

from __future__ import annotations

from typing import IO

import numpy as np
from PIL import Image, ImageOps

VERIFY_IMAGES = ("header", "full", "none")  # data.verify_images: what is checked of each image at open time


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
  """`img` as mode "L" (channels 1) or "RGB" (channels 3), see the module docstring."""
  if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit grayscale
    a = np.asarray(img).astype(np.float64)
    img = Image.fromarray(np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8))
  elif img.mode == "F":
    img = Image.fromarray(np.clip(np.round(np.asarray(img)), 0, 255).astype(np.uint8))
  if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
    rgba = img.convert("RGBA")
    img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
  want = "L" if channels == 1 else "RGB"
  if img.mode == want:
    return img
  if want == "L" and img.mode not in ("1", "RGB"):
    img = img.convert("RGB")  # palette, CMYK, YCbCr, ...: to RGB first, then luma
  return img.convert(want)


def to_square(img: Image.Image, image_size: int | None, channels: int) -> np.ndarray:
  """Converts a PIL image to uint8 [S, S, channels]: mode, centre crop, bicubic resize.

  Args:
    img: any PIL image.
    image_size: the output side S; None keeps the native side (the image must then be square).
    channels: 1 or 3.

  Returns:
    uint8 array [S, S, channels].
  """
  img = _to_mode(img, channels)
  w, h = img.size
  if w != h:
    if image_size is None:
      raise ValueError(f"image is {w}x{h} (not square): set data.image_size")
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
  size = image_size or w
  if img.size != (size, size):
    img = img.resize((size, size), Image.Resampling.BICUBIC)
  a = np.asarray(img, dtype=np.uint8)
  return a[:, :, None] if a.ndim == 2 else a


def array_to_square(a: np.ndarray, image_size: int, channels: int) -> np.ndarray:
  """uint8 [H, W, C] (C in 1, 3, 4) or [H, W] -> uint8 [S, S, channels]."""
  if a.ndim == 3 and a.shape[0] == a.shape[1] == image_size and a.shape[2] == channels:
    return a.astype(np.uint8, copy=False)
  if a.ndim == 3 and a.shape[2] == 1:
    a = a[:, :, 0]
  return to_square(Image.fromarray(np.ascontiguousarray(a)), image_size, channels)


def check_channels(channels: int) -> int:
  """`channels` as an int; a ValueError naming data.channels unless it is 1 or 3."""
  if channels not in (1, 3):
    raise ValueError(f"data.channels must be 1 or 3, got {channels!r}")
  return int(channels)


def check_indices(indices: np.ndarray, n: int) -> np.ndarray:
  """`indices` as int64 [k]; an IndexError unless each lies in [0, n)."""
  idx = np.asarray(indices, dtype=np.int64).reshape(-1)
  if idx.size and (idx.min() < 0 or idx.max() >= n):
    raise IndexError(f"record indices must lie in [0, {n}), got min {idx.min()} max {idx.max()}")
  return idx


def decode_image(path: str | IO[bytes], image_size: int, channels: int) -> tuple[np.ndarray | None, str]:
  """Decodes one file (a path or a binary file object) -> (uint8 [S, S, C], "") or (None, reason)."""
  try:
    with Image.open(path) as img:
      img.load()  # GIF: the first frame
      img = ImageOps.exif_transpose(img)
  except Exception as e:  # pylint: disable=broad-except
    return None, f"cannot decode image (truncated or not an image): {type(e).__name__}: {e}"
  try:
    return to_square(img, image_size, channels), ""
  except Exception as e:  # pylint: disable=broad-except
    return None, f"cannot convert image of mode {img.mode} and size {img.size} to {channels} channels: {e}"
