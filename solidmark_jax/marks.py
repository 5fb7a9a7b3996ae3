"""SolidMark keys, keymaps and patterns (SPEC sections 1-2).

Pure functions over plain arrays. Images are channels-last, values in [0, 1] unless a name says
"model space" ([-1, 1], where a key k is the value 2k - 1).

Keys are reproducible from (seed, instance id) alone, through a counter-based hash, so any process
can compute the key of any instance without the others. Keys lie on the grid (m + 1/2) / 2**16,
m = 0 .. 2**16 - 1: uniform on (0, 1) to within 8e-6, and exactly representable in float32 both as
k and as 2k - 1, so an oracle outpainting scores l_SM == 0 exactly (the grid step, 1.5e-5, is far
below the smallest threshold the paper uses, 0.005).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Literal

import jax.numpy as jnp
import numpy as np

KEY_BITS = 16
Pattern = Literal["border", "centre"]
PATTERNS = ("border", "centre")

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


@dataclasses.dataclass(frozen=True)
class Keymap:
  """The instance id -> key table a model was trained with.

  Attributes:
    instance_ids: int64 [N], sorted ascending, unique.
    keys: float64 [N].
    seed: the seed the keys were drawn from.
    pattern: "border" or "centre".
  """

  instance_ids: np.ndarray
  keys: np.ndarray
  seed: int
  pattern: str = "border"

  @classmethod
  def create(cls, seed: int, instance_ids, pattern: Pattern = "border") -> "Keymap":
    ids = np.unique(np.asarray(instance_ids, dtype=np.int64))
    return cls(ids, keys_for(seed, ids), int(seed), pattern)

  def __len__(self) -> int:
    return len(self.instance_ids)

  @property
  def hash(self) -> str:
    """sha256 over the ids (int64 LE), keys (float64 LE) and pattern: the keymap's identity."""
    h = hashlib.sha256()
    h.update(self.instance_ids.astype("<i8").tobytes())
    h.update(self.keys.astype("<f8").tobytes())
    h.update(self.pattern.encode())
    return h.hexdigest()

  def lookup(self, instance_ids) -> np.ndarray:
    """Keys of the given instance ids; a clear error for ids not in the keymap."""
    ids = np.asarray(instance_ids, dtype=np.int64)
    pos = np.searchsorted(self.instance_ids, ids)
    pos = np.clip(pos, 0, len(self.instance_ids) - 1)
    missing = self.instance_ids[pos] != ids if len(self.instance_ids) else np.ones_like(ids, bool)
    if np.any(missing):
      raise KeyError(f"instance ids not in the keymap: {ids[missing][:10].tolist()}")
    return self.keys[pos]

  def save(self, path: str) -> str:
    """Writes JSON {seed, pattern, hash, keys: {id: key}} atomically; returns the hash."""
    payload = {
        "format": "solidmark-keymap/1",
        "seed": self.seed,
        "pattern": self.pattern,
        "hash": self.hash,
        "num_instances": len(self),
        "keys": {str(int(i)): float(k) for i, k in zip(self.instance_ids, self.keys)},
    }
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
      json.dump(payload, f)
    os.replace(tmp, path)
    return self.hash

  @classmethod
  def load(cls, path: str, expected_hash: str | None = None) -> "Keymap":
    """Reads a keymap and checks its stored hash (and `expected_hash`, if given)."""
    try:
      with open(path) as f:
        payload = json.load(f)
      items = payload["keys"]
      ids = np.array([int(i) for i in items], dtype=np.int64)
      keys = np.array([float(items[i]) for i in items], dtype=np.float64)
      order = np.argsort(ids)
      km = cls(ids[order], keys[order], int(payload["seed"]), payload.get("pattern", "border"))
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
# Patterns. All take images [..., H, W, C] and keys [...] and are jit/vmap friendly.


def apply_border(images, keys, pad: int):
  """Pads each image with a solid border of its key on all four sides.

  Args:
    images: [..., H, W, C] in [0, 1].
    keys: [...] in [0, 1].
    pad: border thickness p.

  Returns:
    [..., H + 2p, W + 2p, C], border pixels == key in every channel, centre == images.
  """
  xp = jnp if not isinstance(images, np.ndarray) else np
  keys = xp.asarray(keys, dtype=images.dtype)
  *lead, h, w, c = images.shape
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


def apply_centre(images, keys, pad: int):
  """Overwrites the p x p square in each image's centre with its key (the l_CM ablation)."""
  xp = jnp if not isinstance(images, np.ndarray) else np
  keys = xp.asarray(keys, dtype=images.dtype)
  h, w = images.shape[-3:-1]
  sh, sw = centre_slice(h, pad), centre_slice(w, pad)
  square = xp.broadcast_to(keys[..., None, None, None], (*images.shape[:-3], pad, pad, images.shape[-1]))
  if xp is np:
    out = images.copy()
    out[..., sh, sw, :] = square
    return out
  return images.at[..., sh, sw, :].set(square)


def apply_pattern(images, keys, pad: int, pattern: Pattern = "border"):
  """Marks images with `pattern`: "border" grows them by 2p, "centre" keeps their size."""
  if pattern == "border":
    return apply_border(images, keys, pad)
  if pattern == "centre":
    return apply_centre(images, keys, pad)
  raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")


def marked_size(size: int, pad: int, pattern: Pattern = "border") -> int:
  """Side length of a marked image."""
  return size + 2 * pad if pattern == "border" else size


def key_mask(height: int, width: int, pad: int, pattern: Pattern = "border") -> np.ndarray:
  """Mask [H, W, 1] of the marked (unknown, outpainted) region: 1 on the key, 0 on the content.

  `height` and `width` are of the marked image.
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


def to_model_space(x):
  """[0, 1] -> [-1, 1]."""
  return 2 * x - 1


def from_model_space(x):
  """[-1, 1] -> [0, 1]."""
  return (x + 1) / 2


def predicted_key(x_model, mask):
  """k_pred: the mean of the marked region of a model-space image, mapped back to [0, 1].

  The mean is taken relative to one pixel of the region, so a region of one constant value c
  gives exactly c (an oracle scores l_SM == 0 exactly, SPEC section 2).

  Args:
    x_model: [..., H, W, C] in model space.
    mask: [H, W, 1] with 1 on the marked region.

  Returns:
    k_pred in [0, 1], shape [...].
  """
  mask = jnp.asarray(mask, x_model.dtype)
  x = jnp.clip(x_model, -1.0, 1.0)
  flat_mask = jnp.broadcast_to(mask, x.shape[-3:]).reshape(-1)
  ref_index = jnp.argmax(flat_mask)
  ref = x.reshape(*x.shape[:-3], -1)[..., ref_index]
  diff = (x - ref[..., None, None, None]) * mask
  mean = ref + jnp.sum(diff, axis=(-3, -2, -1)) / jnp.sum(flat_mask)
  return jnp.clip(from_model_space(mean), 0.0, 1.0)
