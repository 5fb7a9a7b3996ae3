"""Baseline distances from the paper's section 3 (SPEC section 3), for side-by-side comparison.

Host numpy, images [..., H, W, C] in any fixed value range (compare like with like).
"""

from __future__ import annotations

import numpy as np


def normalized_l2(a, b) -> np.ndarray:
  """sqrt(mean((a - b)^2)) over the last three axes (H, W, C)."""
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  return np.sqrt(np.mean(d * d, axis=(-3, -2, -1)))


def _patches(x: np.ndarray, grid: tuple[int, int] | None) -> np.ndarray:
  """[N, H, W, C] -> [N, P, D]: P = gh * gw patches (P = 1 without a grid), D pixels each."""
  n, h, w, c = x.shape
  if grid is None:
    return x.reshape(n, 1, h * w * c)
  gh, gw = grid
  if h % gh or w % gw:
    raise ValueError(f"patch grid {grid} must divide the image size {h}x{w}")
  x = x.reshape(n, gh, h // gh, gw, w // gw, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, gh * gw, -1)


def pairwise_l2(generated, train, *, grid: tuple[int, int] | None = None, batch_size: int = 1024) -> np.ndarray:
  """Normalised l2 between every generated and every training image: [G, M].

  With a patch `grid` (e.g. (4, 4), the paper's patched variant), the distance of a pair is the
  maximum over corresponding patches of their normalised l2. Training images go in batches of
  `batch_size`, so M can be large.
  """
  g = _patches(np.asarray(generated, np.float64), grid)  # [G, P, D]
  g_sq = np.einsum("gpd,gpd->gp", g, g)
  d_pixels = g.shape[-1]
  out = []
  for start in range(0, len(train), batch_size):
    m = _patches(np.asarray(train[start:start + batch_size], np.float64), grid)  # [B, P, D]
    m_sq = np.einsum("mpd,mpd->mp", m, m)
    sq = g_sq[:, None, :] + m_sq[None, :, :] - 2.0 * np.einsum("gpd,mpd->gmp", g, m)  # [G, B, P]
    out.append(np.sqrt(np.maximum(sq, 0.0) / d_pixels).max(axis=-1))
  return np.concatenate(out, axis=1) if out else np.zeros((len(g), 0))


def carlini_l2(generated, train, *, n_neighbors: int = 50, alpha: float = 0.5,
               grid: tuple[int, int] | None = None, batch_size: int = 1024) -> dict[str, np.ndarray]:
  """Carlini et al.'s modified l2: l2(x_hat, nearest) / (alpha * mean l2 to the n nearest).

  Args:
    generated: [G, H, W, C] outputs x_hat.
    train: [M, H, W, C] training images.
    n_neighbors: n (50 in the paper; capped at M).
    alpha: 0.5 in the paper.
    grid: patch grid for the patched variant (paper: (4, 4)); None compares whole images.
    batch_size: training images per distance batch.

  Returns:
    {"score": [G] (small = a near copy), "nearest": [G] index of the nearest training image,
     "l2": [G] its (patched) normalised l2}.
  """
  d = pairwise_l2(generated, train, grid=grid, batch_size=batch_size)  # [G, M]
  n = min(int(n_neighbors), d.shape[1])
  if n < 1:
    raise ValueError("carlini_l2 needs at least one training image")
  near = np.partition(d, n - 1, axis=1)[:, :n]  # the n smallest, unordered
  nearest = np.argmin(d, axis=1)
  l2 = d[np.arange(len(d)), nearest]
  score = l2 / (alpha * near.mean(axis=1))
  return {"score": score, "nearest": nearest, "l2": l2}


def percentile_score(scores, q: float = 95.0) -> float:
  """A scoring function of the paper: the q-th percentile of per-image scores."""
  return float(np.percentile(np.asarray(scores, np.float64), q))
