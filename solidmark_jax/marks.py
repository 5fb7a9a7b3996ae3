"""SolidMark keys, keymaps and patterns (the SolidMark paper: a grey border whose intensity is the key).

Pure functions over plain arrays. Images are channels-last, values in [0, 1] unless a name says
"model space" ([-1, 1], where a key k is the value 2k - 1).

Keys are reproducible from (seed, instance id) alone, through a counter-based hash, so any process
can compute the key of any instance without the others. Keys lie on the grid (m + 1/2) / 2**16,
m = 0 .. 2**16 - 1: uniform on (0, 1) to within 8e-6, and exactly representable in float32 both as
k and as 2k - 1, so an oracle outpainting scores l_SM == 0 exactly (the grid step, 1.5e-5, is far
below the smallest threshold the paper uses, 0.005).

Several keys per image (`num_keys` = m > 1, beyond the paper): the marked region is split into m
key regions, each a solid patch of its own independent key, so a model that did not memorise the
image matches all m by chance with probability about (2 delta)^m. Region i of a layout carries key
i mod m:

- "sides" (border pattern; m in {1, 2, 4}): the four sides, in the order top, right, bottom, left.
  Top and bottom are the full-width strips (rows [0, p) and [H - p, H), corners included); right
  and left are the columns [W - p, W) and [0, p) of the rows between them, [p, H - p). With m = 2
  top and bottom share key 0, right and left key 1.
- "channels" (border or centre; 1 <= m <= C): channel c of the whole marked region carries key
  c mod m.

With m = 1 every layout is the paper's single grey key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from solidmark_jax import atomic

KEY_BITS = 16
Pattern = Literal["border", "centre"]
PATTERNS = ("border", "centre")
KeyLayout = Literal["sides", "channels"]
KEY_LAYOUTS = ("sides", "channels")
SIDES = ("top", "right", "bottom", "left")  # region order of the "sides" layout
SIDE_KEY_COUNTS = (1, 2, 4)

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64 finaliser over uint64 arrays (wrapping arithmetic)."""
  with np.errstate(over="ignore"):
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return x ^ (x >> np.uint64(31))


def keys_for(seed: int, instance_ids: np.ndarray | list[int], num_keys: int = 1) -> np.ndarray:
  """Keys k ~ Unif(0, 1) from (seed, instance id), independent per instance.

  Args:
    seed: the keymap seed.
    instance_ids: int array [N] of instance ids (>= 0).
    num_keys: scalars per instance (1 for the paper's single grey key).

  Returns:
    float64 array [N] (or [N, num_keys]) on the grid (m + 1/2) / 2**16.
  """
  ids = np.asarray(instance_ids, dtype=np.int64)
  if ids.size and ids.min() < 0:
    raise ValueError(f"instance ids must be >= 0, got {ids.min()}")
  base = _splitmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) ^ np.uint64(0x5D1D3A4B))
  slot = np.arange(num_keys, dtype=np.uint64)
  with np.errstate(over="ignore"):
    x = ids.astype(np.uint64)[:, None] * np.uint64(num_keys) + slot[None, :]
    h = _splitmix64(_splitmix64(x ^ base) + base)
  m = (h >> np.uint64(64 - KEY_BITS)).astype(np.float64)
  k = (m + 0.5) / float(2**KEY_BITS)
  return k[:, 0] if num_keys == 1 else k


def check_keys(num_keys: int, key_layout: str = "sides", pattern: str = "border",
               channels: int | None = None) -> None:
  """Raises ValueError, naming the config field, for a key count the layout cannot hold.

  Args:
    num_keys: m, keys per image (`marks.num_keys`).
    key_layout: "sides" or "channels" (`marks.key_layout`).
    pattern: "border" or "centre" (`marks.pattern`).
    channels: image channels C (None: not checked).
  """
  if isinstance(num_keys, bool) or not isinstance(num_keys, (int, np.integer)) or num_keys < 1:
    raise ValueError(f"marks.num_keys must be a positive integer (keys per image), got {num_keys!r}")
  if key_layout not in KEY_LAYOUTS:
    raise ValueError(f"marks.key_layout must be one of {KEY_LAYOUTS}, got {key_layout!r}")
  if pattern not in PATTERNS:
    raise ValueError(f"marks.pattern must be one of {PATTERNS}, got {pattern!r}")
  if num_keys == 1:
    return
  if key_layout == "sides":
    if pattern != "border":
      raise ValueError(f"marks.num_keys={num_keys} with marks.key_layout='sides' needs marks.pattern='border' "
                       f"(the {pattern!r} pattern has no sides); use marks.key_layout='channels'")
    if num_keys not in SIDE_KEY_COUNTS:
      raise ValueError(f"marks.num_keys={num_keys} with marks.key_layout='sides': one key per border side takes "
                       f"{SIDE_KEY_COUNTS} keys (2: top+bottom and right+left; 4: top, right, bottom, left); "
                       "use marks.key_layout='channels' for another count")
  elif channels is not None and num_keys > channels:
    raise ValueError(f"marks.num_keys={num_keys} with marks.key_layout='channels' needs at least {num_keys} image "
                     f"channels (one key per channel), the images have {channels}")


@dataclasses.dataclass(frozen=True)
class Keymap:
  """The instance id -> key table a model was trained with.

  One key per instance (the paper) is stored as keys [N]; m > 1 keys per instance as [N, m], with
  the key layout (which region carries which key) part of the keymap and its hash. A one-key keymap's
  file and hash do not mention the layout (every layout is the same single key).

  Attributes:
    instance_ids: int64 [N], sorted ascending, unique.
    keys: float64 [N], or [N, m] with m keys per instance.
    seed: the seed the keys were drawn from.
    pattern: "border" or "centre".
    key_layout: "sides" or "channels" (only meaningful with m > 1).
  """

  instance_ids: np.ndarray
  keys: np.ndarray
  seed: int
  pattern: str = "border"
  key_layout: str = "sides"

  @classmethod
  def create(cls, seed: int, instance_ids: np.ndarray, pattern: Pattern = "border", num_keys: int = 1,
             key_layout: KeyLayout = "sides") -> "Keymap":
    check_keys(num_keys, key_layout, pattern)
    ids = np.unique(np.asarray(instance_ids, dtype=np.int64))
    return cls(ids, keys_for(seed, ids, num_keys), int(seed), pattern, key_layout)

  def __len__(self) -> int:
    return len(self.instance_ids)

  @property
  def num_keys(self) -> int:
    """m, keys per instance."""
    return 1 if self.keys.ndim == 1 else int(self.keys.shape[1])

  @property
  def hash(self) -> str:
    """sha256 over the ids (int64 LE), keys (float64 LE, row-major) and pattern: the keymap's identity.

    With m > 1 keys per instance, "num_keys=<m>;key_layout=<layout>" follows the pattern.
    """
    h = hashlib.sha256()
    h.update(self.instance_ids.astype("<i8").tobytes())
    h.update(np.ascontiguousarray(self.keys, dtype="<f8").tobytes())
    h.update(self.pattern.encode())
    if self.num_keys > 1:
      h.update(f"num_keys={self.num_keys};key_layout={self.key_layout}".encode())
    return h.hexdigest()

  def lookup(self, instance_ids: np.ndarray) -> np.ndarray:
    """Keys of the given instance ids; a clear error for ids not in the keymap."""
    ids = np.asarray(instance_ids, dtype=np.int64)
    pos = np.searchsorted(self.instance_ids, ids)
    pos = np.clip(pos, 0, len(self.instance_ids) - 1)
    missing = self.instance_ids[pos] != ids if len(self.instance_ids) else np.ones_like(ids, bool)
    if np.any(missing):
      raise KeyError(f"instance ids not in the keymap: {ids[missing][:10].tolist()}")
    return self.keys[pos]

  def save(self, path: str) -> str:
    """Writes JSON {seed, pattern, hash, keys: {id: key}} atomically; returns the hash.

    With m > 1 keys per instance the file also holds num_keys and key_layout, and each id maps to
    its list of m keys.
    """
    payload = {
        "format": "solidmark-keymap/1",
        "seed": self.seed,
        "pattern": self.pattern,
        "hash": self.hash,
        "num_instances": len(self),
    }
    if self.num_keys == 1:
      payload["keys"] = {str(int(i)): float(k) for i, k in zip(self.instance_ids, self.keys)}
    else:
      payload["num_keys"] = self.num_keys
      payload["key_layout"] = self.key_layout
      payload["keys"] = {str(int(i)): [float(v) for v in k] for i, k in zip(self.instance_ids, self.keys)}
    atomic.write_json(path, payload, trailing_newline=False)  # fsync'ed, then moved into place
    return self.hash

  @classmethod
  def load(cls, path: str, expected_hash: str | None = None) -> "Keymap":
    """Reads a keymap and checks its stored hash (and `expected_hash`, if given)."""
    try:
      with open(path) as f:
        payload = json.load(f)
      items = payload["keys"]
      num_keys = payload.get("num_keys", 1)
      if isinstance(num_keys, bool) or not isinstance(num_keys, int) or num_keys < 1:
        raise ValueError(f"num_keys must be a positive integer, got {num_keys!r}")
      ids = np.array([int(i) for i in items], dtype=np.int64)
      if num_keys == 1:
        keys = np.array([float(items[i]) for i in items], dtype=np.float64)
      else:
        bad = [i for i in items if not isinstance(items[i], list) or len(items[i]) != num_keys]
        if bad:
          raise ValueError(f"num_keys={num_keys} but instance {bad[0]} has {items[bad[0]]!r}")
        keys = np.array([[float(v) for v in items[i]] for i in items], dtype=np.float64).reshape(-1, num_keys)
      order = np.argsort(ids)
      km = cls(ids[order], keys[order], int(payload["seed"]), payload.get("pattern", "border"),
               payload.get("key_layout", "sides"))
      check_keys(km.num_keys, km.key_layout, km.pattern)
    except FileNotFoundError:
      raise FileNotFoundError(f"keymap file not found: {path}") from None
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{path}: not a SolidMark keymap ({e!r})") from None
    if payload.get("hash") != km.hash:
      raise ValueError(
          f"{path}: keymap content does not match its recorded hash "
          f"(recorded {payload.get('hash')}, computed {km.hash}); the file was edited or damaged")
    if expected_hash is not None and km.hash != expected_hash:
      raise ValueError(
          f"{path}: keymap hash {km.hash[:16]}... does not match the expected {expected_hash[:16]}...; "
          "this is not the keymap the model was trained with")
    return km


# ---------------------------------------------------------------------------------------------
# Patterns. All take images [..., H, W, C] and keys [...] (one key per image) or [..., m] (m keys
# per image, see the module docstring), and are jit/vmap friendly.


def _one_key(images, keys) -> bool:
  """Whether `keys` hold one key per image ([...]) rather than m ([..., m]) for images [..., H, W, C]."""
  if keys.ndim == images.ndim - 3:
    return True
  if keys.ndim == images.ndim - 2:
    return False
  raise ValueError(f"keys must be [...] (one per image) or [..., m] for images [..., H, W, C] = {images.shape}, "
                   f"got {keys.shape}")


def _fill_regions(xp, base, keys, masks):
  """base [..., H, W, C] with region s of masks [m, H, W, 1|C] set to keys [..., m][..., s].

  An elementwise product and sum (no dot product, whose reduced precision on accelerators would
  round the keys): every pixel is one key plus zeros, so keys are written exactly.
  """
  masks = xp.asarray(masks, base.dtype)
  value = xp.sum(masks * keys[..., :, None, None, None], axis=-4)  # [..., H, W, 1|C]
  union = xp.max(masks, axis=0) > 0  # [H, W, 1|C]
  return xp.where(union, value, base)


def apply_border(images: np.ndarray, keys: np.ndarray, pad: int, key_layout: KeyLayout = "sides") -> np.ndarray:
  """Pads each image with a solid border of its key on all four sides.

  Args:
    images: [..., H, W, C] in [0, 1].
    keys: [...] in [0, 1]; or [..., m]: m keys per image, placed by `key_layout`.
    pad: border thickness p.
    key_layout: with m keys, "sides" or "channels" (see the module docstring).

  Returns:
    [..., H + 2p, W + 2p, C], border pixels == key in every channel (with m keys: key s on key region
    s, `key_masks`), centre == images.
  """
  xp = jnp if not isinstance(images, np.ndarray) else np
  keys = xp.asarray(keys, dtype=images.dtype)
  *lead, h, w, c = images.shape
  if not _one_key(images, keys):
    masks = key_masks(h + 2 * pad, w + 2 * pad, pad, "border", keys.shape[-1], key_layout, c)
    base = xp.zeros((*lead, h + 2 * pad, w + 2 * pad, c), images.dtype)
    out = _fill_regions(xp, base, keys, masks)
  else:
    out = xp.broadcast_to(keys[..., None, None, None], (*lead, h + 2 * pad, w + 2 * pad, c))
  if xp is np:
    out = out.copy()
    out[..., pad:pad + h, pad:pad + w, :] = images
    return out
  return out.at[..., pad:pad + h, pad:pad + w, :].set(images)


def centre_slice(size: int, pad: int) -> slice:
  """The rows (or columns) of the p x p centre square in an axis of `size` pixels."""
  start = (size - pad) // 2
  return slice(start, start + pad)


def apply_centre(images: np.ndarray, keys: np.ndarray, pad: int, key_layout: KeyLayout = "channels") -> np.ndarray:
  """Overwrites the p x p square in each image's centre with its key (the l_CM ablation).

  keys: [...], or [..., m] with m keys per image, one per channel (only the "channels" layout).
  """
  xp = jnp if not isinstance(images, np.ndarray) else np
  keys = xp.asarray(keys, dtype=images.dtype)
  h, w = images.shape[-3:-1]
  if not _one_key(images, keys):
    return _fill_regions(xp, images, keys, key_masks(h, w, pad, "centre", keys.shape[-1], key_layout,
                                                     images.shape[-1]))
  sh, sw = centre_slice(h, pad), centre_slice(w, pad)
  square = xp.broadcast_to(keys[..., None, None, None], (*images.shape[:-3], pad, pad, images.shape[-1]))
  if xp is np:
    out = images.copy()
    out[..., sh, sw, :] = square
    return out
  return images.at[..., sh, sw, :].set(square)


def apply_pattern(images: np.ndarray, keys: np.ndarray, pad: int, pattern: Pattern = "border",
                  key_layout: KeyLayout = "sides") -> np.ndarray:
  """Marks images with `pattern`: "border" grows them by 2p, "centre" keeps their size.

  keys: [...] one key per image, or [..., m] placed by `key_layout` (see the module docstring).
  """
  if pattern == "border":
    return apply_border(images, keys, pad, key_layout)
  if pattern == "centre":
    return apply_centre(images, keys, pad, key_layout)
  raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")


def marked_size(size: int, pad: int, pattern: Pattern = "border") -> int:
  """Side length of a marked image."""
  return size + 2 * pad if pattern == "border" else size


def key_mask(height: int, width: int, pad: int, pattern: Pattern = "border") -> np.ndarray:
  """Mask [H, W, 1] of the marked (unknown, outpainted) region: 1 on the key, 0 on the content.

  `height` and `width` are of the marked image. With m keys per image this is the union of the m
  key regions (`key_masks`).
  """
  m = np.zeros((height, width, 1), np.float32)
  if pattern == "border":
    m[:pad] = m[-pad:] = 1
    m[:, :pad] = m[:, -pad:] = 1
  elif pattern == "centre":
    m[centre_slice(height, pad), centre_slice(width, pad)] = 1
  else:
    raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
  return m


def side_masks(height: int, width: int, pad: int) -> np.ndarray:
  """The four border sides [4, H, W, 1] in the order of `SIDES` (top, right, bottom, left).

  Top and bottom are full-width strips (the corners belong to them); right and left are the columns
  of the rows in between. The four are disjoint and their union is `key_mask(height, width, pad)`.
  """
  if height <= 2 * pad or width <= 2 * pad:
    raise ValueError(f"a border of {pad} px needs an image larger than {2 * pad} px, got {height} x {width}")
  m = np.zeros((4, height, width, 1), np.float32)
  m[0, :pad] = 1  # top
  m[1, pad:height - pad, width - pad:] = 1  # right
  m[2, height - pad:] = 1  # bottom
  m[3, pad:height - pad, :pad] = 1  # left
  return m


def key_masks(height: int, width: int, pad: int, pattern: Pattern = "border", num_keys: int = 1,
              key_layout: KeyLayout = "sides", channels: int = 1) -> np.ndarray:
  """The m key regions of a marked image: region s is 1 where key s is written, 0 elsewhere.

  Args:
    height, width: of the marked image.
    pad: border thickness (or centre square side) p.
    pattern: "border" or "centre".
    num_keys: m.
    key_layout: "sides" (region i = side i, `SIDES`, carries key i mod m) or "channels" (channel c
      of the marked region carries key c mod m).
    channels: image channels C ("channels" layout).

  Returns:
    float32 [m, H, W, 1] (one key, or the "sides" layout) or [m, H, W, C] ("channels" layout with
    m > 1); disjoint regions whose union over m (and channels) is `key_mask`.
  """
  check_keys(num_keys, key_layout, pattern, channels)
  union = key_mask(height, width, pad, pattern)  # [H, W, 1]
  if num_keys == 1:
    return union[None]
  if key_layout == "sides":
    sides = side_masks(height, width, pad)  # [4, H, W, 1]
    return np.stack([sides[s::num_keys].sum(axis=0) for s in range(num_keys)])
  owner = np.arange(channels) % num_keys  # [C]: the key of each channel
  return np.stack([union * (owner == s).astype(np.float32) for s in range(num_keys)])  # [m, H, W, C]


def to_model_space(x: jax.Array) -> jax.Array:
  """[0, 1] -> [-1, 1]."""
  return 2 * x - 1


def from_model_space(x: jax.Array) -> jax.Array:
  """[-1, 1] -> [0, 1]."""
  return (x + 1) / 2


def predicted_key(x_model: jax.Array, mask: jax.Array) -> jax.Array:
  """k_pred: the mean of the marked region of a model-space image, mapped back to [0, 1].

  The mean is taken relative to one pixel of the region, so a region of one constant value c
  gives exactly c (an oracle scores l_SM == 0 exactly).

  Args:
    x_model: [..., H, W, C] in model space.
    mask: [H, W, 1] with 1 on the marked region; or m key regions [m, H, W, 1|C] (`key_masks`).

  Returns:
    k_pred in [0, 1], shape [...] (a mask [H, W, 1]) or [..., m] (m key regions).
  """
  if np.ndim(mask) == 4:
    return _predicted_keys(x_model, mask)
  mask = jnp.asarray(mask, x_model.dtype)
  x = jnp.clip(x_model, -1.0, 1.0)
  flat_mask = jnp.broadcast_to(mask, x.shape[-3:]).reshape(-1)
  ref_index = jnp.argmax(flat_mask)
  ref = x.reshape(*x.shape[:-3], -1)[..., ref_index]
  diff = (x - ref[..., None, None, None]) * mask
  mean = ref + jnp.sum(diff, axis=(-3, -2, -1)) / jnp.sum(flat_mask)
  return jnp.clip(from_model_space(mean), 0.0, 1.0)


def _predicted_keys(x_model, masks):
  """`predicted_key` of each of m regions [m, H, W, 1|C]: [..., H, W, C] -> [..., m]."""
  masks = jnp.asarray(masks, x_model.dtype)
  x = jnp.clip(x_model, -1.0, 1.0)  # [..., H, W, C]
  m = masks.shape[0]
  flat = jnp.broadcast_to(masks, (m, *x.shape[-3:])).reshape(m, -1)  # [m, HWC]
  ref = jnp.take(x.reshape(*x.shape[:-3], -1), jnp.argmax(flat, axis=-1), axis=-1)  # [..., m]: a pixel of each region
  diff = (x[..., None, :, :, :] - ref[..., None, None, None]) * masks  # [..., m, H, W, C]
  mean = ref + jnp.sum(diff, axis=(-3, -2, -1)) / jnp.sum(flat, axis=-1)
  return jnp.clip(from_model_space(mean), 0.0, 1.0)
