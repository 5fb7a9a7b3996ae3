"""Baseline memorisation metrics from the paper's Section 3, for side-by-side comparison.

Distances compare generations x_hat [G, H, W, C] with training images [M, H, W, C] in one fixed value
range (compare like with like; `solidmark_jax.generations` strips the SolidMark border first):

- normalised l2: sqrt(mean((a - b)^2)) over H, W, C;
- patched l2: both images cut into the same patches, the distance is the maximum over corresponding
  patches of their normalised l2. The paper used a 4 x 4 grid of patches (`grid=(4, 4)`), the
  public code 8 x 8 px patches (`patch_size=8`); on a 32 x 32 image the two are the same;
- Carlini et al.'s modified l2 (Extracting training data from diffusion models, 2023):
  l(x_hat) = l2(x_hat, x_1) / (alpha * mean_{i <= n} l2(x_hat, x_i)), x_1 .. x_n the n nearest
  training images of x_hat (the nearest included), n = 50, alpha = 0.5. A copy of one training
  image that is far from the rest scores near 0; a generation as far from its nearest as from its
  50 nearest scores about 1 / alpha = 2;
- embedding similarity: cosine similarity of an encoder's embeddings (SSCD / DINO / CLIP style; any
  callable `encoder(images [N, H, W, C]) -> [N, D]`, no weights are shipped) to the nearest
  training embedding.

Direction: a distance counts as memorised when distance <= threshold ("lower"), a similarity when
similarity >= threshold ("higher"). The scoring functions report the 95th percentile and the
extreme of the memorised tail (for distances: the 5th percentile and the minimum; for
similarities: the 95th percentile and the maximum) and counts at several thresholds.

Nearest neighbours stream the training images in chunks of `batch_size` with a running top-k, so
only [G, batch_size] distances are ever held. Ranking runs in float32 with ||a||^2 + ||b||^2 - 2 a.b;
the k + margin best candidates are then re-measured exactly in float64 from (a - b), so an exact
copy is at distance 0 exactly. Measured on this 2-core CPU (AVX-512), shared with other jobs (load
4-5), G = 256 generations against M = 10,000 training images of 32 x 32 x 3, top-50, chunks of
1024, min of 5 interleaved runs: the jitted JAX kernel ("jax") 0.37-0.43 s whole-image and 0.84 s
with a 4 x 4 patch grid, numpy float32 ("numpy", one BLAS matmul per patch) 0.84-0.91 s and
1.7-2.5 s; both include about 0.1-0.2 s of exact re-measuring; JAX's first call adds 0.5-2 s of
compilation. "jax" is the default.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Literal, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike
from tqdm import tqdm

from solidmark_jax.metrics import memorisation

Direction = Literal["lower", "higher"]
DIRECTIONS = ("lower", "higher")
BACKENDS = ("jax", "numpy")
Encoder = Callable[[np.ndarray], Any]


class ImageSet(Protocol):
  """Images read by position: a numpy array [M, H, W, C], or anything with len() and indexing by a
  slice or an int array that returns [n, H, W, C] (e.g. a reader over a dataset too large for memory)."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index) -> np.ndarray:
    ...


# ---------------------------------------------------------------------------------------------
# Distances.


def normalized_l2(a: ArrayLike, b: ArrayLike) -> np.ndarray:
  """sqrt(mean((a - b)^2)) over the last three axes (H, W, C)."""
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  return np.sqrt(np.mean(d * d, axis=(-3, -2, -1)))


def resolve_grid(height: int, width: int, grid: tuple[int, int] | None = None,
                 patch_size: int | None = None) -> tuple[int, int] | None:
  """The patch grid (rows, columns) of the patched variant, or None for whole images.

  Args:
    height: image height H.
    width: image width W.
    grid: patches per side, e.g. (4, 4) (the paper).
    patch_size: patch side in pixels, e.g. 8 (the public code); at most one of grid / patch_size.

  Returns:
    (gh, gw) that divide (H, W), or None.
  """
  if grid is not None and patch_size is not None:
    raise ValueError(f"patched l2: give a patch grid or a patch size in pixels, not both (grid={grid}, "
                     f"patch_size={patch_size})")
  if patch_size is not None:
    p = int(patch_size)
    if p < 1 or height % p or width % p:
      raise ValueError(f"patched l2: patch_size={patch_size} px must be >= 1 and divide the {height}x{width} images")
    return height // p, width // p
  if grid is None:
    return None
  gh, gw = (int(v) for v in grid)
  if gh < 1 or gw < 1 or height % gh or width % gw:
    raise ValueError(f"patched l2: patch grid {tuple(grid)} must divide the {height}x{width} images")
  return gh, gw


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


def pairwise_l2(generated: ArrayLike, train: ArrayLike, *, grid: tuple[int, int] | None = None,
                batch_size: int = 1024) -> np.ndarray:
  """Normalised l2 between every generated and every training image: [G, M] (float64, brute force).

  With a patch `grid` (e.g. (4, 4), the paper's patched variant), the distance of a pair is the
  maximum over corresponding patches of their normalised l2. Holds the whole [G, M] matrix: use
  `nearest_neighbors` when M is large.
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


def _exact_l2(generated: np.ndarray, train_images: np.ndarray, grid) -> np.ndarray:
  """Normalised (patched) l2 of pairs, from differences in float64: [g, H, W, C] x [g, k, H, W, C] -> [g, k]."""
  g, k = train_images.shape[:2]
  d = train_images.astype(np.float64) - np.asarray(generated, np.float64)[:, None]  # [g, k, H, W, C]
  p = _patches(d.reshape(g * k, *d.shape[2:]), grid)  # [g k, P, D]
  return np.sqrt(np.einsum("npd,npd->np", p, p).max(axis=-1) / p.shape[-1]).reshape(g, k)


def _refine(generated: np.ndarray, train: ImageSet, cand: np.ndarray, grid,
            block_elements: int = 2**22) -> np.ndarray:
  """Exact distances [G, k] of the candidate pairs, in blocks of generations of about `block_elements`
  pixel differences (32 MB of float64); each block reads its distinct candidates once."""
  num, k = cand.shape
  rows = max(1, block_elements // (k * int(np.prod(generated.shape[1:]))))
  out = np.empty((num, k))
  for start in range(0, num, rows):
    c = cand[start:start + rows]
    uniq, inverse = np.unique(c, return_inverse=True)
    images = np.asarray(train[uniq])[inverse.reshape(c.shape)]  # [rows, k, H, W, C]
    out[start:start + rows] = _exact_l2(generated[start:start + rows], images, grid)
  return out


@functools.lru_cache(maxsize=None)
def _jax_topk_update():
  """The jitted chunk update of the running top-k (built on first use: numpy users never trace)."""

  @functools.partial(jax.jit, static_argnames=("k",), donate_argnums=(0, 1))
  def update(best_sq, best_idx, g, g_sq, chunk, offset, num_valid, k: int):
    """Merges one chunk of training patches [B, P, D] into the running top-k [G, k] (squared sums)."""
    m_sq = jnp.einsum("bpd,bpd->bp", chunk, chunk)  # [B, P]
    sq = g_sq[:, None, :] + m_sq[None] - 2.0 * jnp.einsum("gpd,bpd->gbp", g, chunk)  # [G, B, P]
    sq = jnp.max(sq, axis=-1)  # [G, B]: worst patch
    rows = jnp.arange(chunk.shape[0], dtype=jnp.int32)
    sq = jnp.where(rows[None] < num_valid, sq, jnp.inf)  # padded rows of the last chunk never win
    all_sq = jnp.concatenate([best_sq, sq], axis=1)  # [G, k + B]
    all_idx = jnp.concatenate([best_idx, jnp.broadcast_to(offset + rows, sq.shape)], axis=1)
    neg, pos = jax.lax.top_k(-all_sq, k)
    return -neg, jnp.take_along_axis(all_idx, pos, axis=1)

  return update


def _numpy_topk_update(best_sq, best_idx, g, g_sq, chunk, offset, num_valid, k):
  m_sq = np.einsum("bpd,bpd->bp", chunk, chunk)  # [B, P]
  dot = np.matmul(g.transpose(1, 0, 2), chunk.transpose(1, 2, 0))  # [P, G, B]: one BLAS call per patch
  sq = g_sq.T[:, :, None] + m_sq.T[:, None, :] - 2.0 * dot  # [P, G, B]
  sq = sq.max(axis=0)[:, :num_valid]  # [G, n]: worst patch
  all_sq = np.concatenate([best_sq, sq], axis=1)
  all_idx = np.concatenate([best_idx, np.broadcast_to(offset + np.arange(num_valid, dtype=np.int32), sq.shape)],
                           axis=1)
  pos = np.argpartition(all_sq, k - 1, axis=1)[:, :k]
  return np.take_along_axis(all_sq, pos, 1), np.take_along_axis(all_idx, pos, 1)


def _as_images(x, what: str) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 4:
    raise ValueError(f"{what}: expected images [N, H, W, C], got shape {x.shape}")
  return x


def nearest_neighbors(generated: ArrayLike, train: ImageSet, n_neighbors: int = 1, *,
                      grid: tuple[int, int] | None = None,
                      patch_size: int | None = None, batch_size: int = 1024, backend: str = "jax",
                      margin: int = 8, progress: bool = False) -> dict[str, np.ndarray]:
  """The n nearest training images of each generation by normalised (patched) l2, in chunks.

  Args:
    generated: [G, H, W, C] generations.
    train: [M, H, W, C] training images (an `ImageSet`): read in chunks of `batch_size` rows, then
      once more for the candidates' exact distances.
    n_neighbors: n (capped at M).
    grid: patch grid of the patched variant (paper: (4, 4)); see `resolve_grid`.
    patch_size: patch side in px instead of a grid (public code: 8).
    batch_size: training images per chunk: the kernel holds [G, batch_size] distances.
    backend: "jax" (jitted kernel) or "numpy"; both rank in float32.
    margin: extra float32 candidates re-measured exactly, so float32 near-ties cannot drop a
      true neighbour.
    progress: show a progress bar over the chunks.

  Returns:
    {"distance": float64 [G, n] ascending, "index": int64 [G, n] training positions}.
  """
  g_img = _as_images(generated, "nearest_neighbors: generated")
  num_train = len(train)
  if num_train < 1:
    raise ValueError("nearest_neighbors: the training set is empty")
  if backend not in BACKENDS:
    raise ValueError(f"nearest_neighbors: backend must be one of {BACKENDS}, got {backend!r}")
  if n_neighbors < 1 or batch_size < 1:
    raise ValueError(f"nearest_neighbors: n_neighbors and batch_size must be >= 1, got {n_neighbors}, {batch_size}")
  _, h, w, c = g_img.shape
  grid = resolve_grid(h, w, grid, patch_size)
  n = min(int(n_neighbors), num_train)
  k = min(n + max(int(margin), 0), num_train)
  g = _patches(g_img.astype(np.float32), grid)  # [G, P, D]
  g_sq = np.einsum("gpd,gpd->gp", g, g)
  best_sq = np.full((len(g), k), np.inf, np.float32)
  best_idx = np.zeros((len(g), k), np.int32)
  if backend == "jax":
    update = functools.partial(_jax_topk_update(), k=k)
    best_sq, best_idx, g, g_sq = (jnp.asarray(a) for a in (best_sq, best_idx, g, g_sq))
  else:
    update = functools.partial(_numpy_topk_update, k=k)
  starts = range(0, num_train, batch_size)
  if progress:
    starts = tqdm(starts, desc="nearest neighbours", unit="chunk", dynamic_ncols=True)
  for start in starts:
    chunk = np.asarray(train[start:start + batch_size], np.float32)
    if chunk.shape[1:] != (h, w, c):
      raise ValueError(f"nearest_neighbors: training images are {chunk.shape[1:]}, generations {(h, w, c)}")
    valid = len(chunk)
    if backend == "jax" and valid < batch_size:  # fixed chunk shape: one compilation
      chunk = np.concatenate([chunk, np.zeros((batch_size - valid, h, w, c), np.float32)])
    best_sq, best_idx = update(best_sq, best_idx, g, g_sq, _patches(chunk, grid), np.int32(start), np.int32(valid))
  cand = np.asarray(best_idx, np.int64)  # [G, k]
  exact = _refine(g_img, train, cand, grid)  # [G, k]
  order = np.lexsort((cand, exact), axis=1)[:, :n]  # by distance, ties by index
  return {"distance": np.take_along_axis(exact, order, 1), "index": np.take_along_axis(cand, order, 1)}


def carlini_score(distances: ArrayLike, alpha: float = 0.5) -> np.ndarray:
  """Carlini et al.'s modified l2 from each generation's n nearest distances [G, n] (ascending): [G].

  l2(x_hat, x_1) / (alpha * mean of the n distances). 0 where the nearest distance is 0 (a copy of
  n identical images, mean 0 too, is still a copy).
  """
  d = np.asarray(distances, np.float64)
  if d.ndim != 2 or d.shape[1] < 1:
    raise ValueError(f"carlini_score: expected distances [G, n >= 1], got shape {d.shape}")
  if not alpha > 0:
    raise ValueError(f"carlini_score: alpha must be > 0, got {alpha}")
  nearest, denom = d[:, 0], alpha * d.mean(axis=1)
  return np.divide(nearest, denom, out=np.zeros_like(nearest), where=denom > 0)


def carlini_l2(generated: ArrayLike, train: ImageSet, *, n_neighbors: int = 50, alpha: float = 0.5,
               grid: tuple[int, int] | None = None, patch_size: int | None = None, batch_size: int = 1024,
               backend: str = "jax", progress: bool = False) -> dict[str, np.ndarray]:
  """Carlini et al.'s modified l2: l2(x_hat, nearest) / (alpha * mean l2 to the n nearest).

  Args:
    generated: [G, H, W, C] outputs x_hat.
    train: [M, H, W, C] training images (an `ImageSet`).
    n_neighbors: n (50 in the paper; capped at M).
    alpha: 0.5 in the paper.
    grid: patch grid for the patched variant (paper: (4, 4)); None compares whole images.
    patch_size: patch side in px for the patched variant (public code: 8), instead of `grid`.
    batch_size: training images per distance chunk.
    backend: see `nearest_neighbors`.
    progress: progress bar over the training chunks.

  Returns:
    {"score": [G] (small = a near copy), "nearest": [G] index of the nearest training image,
     "l2": [G] its (patched) normalised l2, "neighbors_mean": [G] mean l2 to the n nearest}.
  """
  nn = nearest_neighbors(generated, train, n_neighbors, grid=grid, patch_size=patch_size, batch_size=batch_size,
                         backend=backend, progress=progress)
  d = nn["distance"]
  return {"score": carlini_score(d, alpha), "nearest": nn["index"][:, 0], "l2": d[:, 0],
          "neighbors_mean": d.mean(axis=1)}


# ---------------------------------------------------------------------------------------------
# Embedding similarity.


def _unit_rows(e: np.ndarray) -> np.ndarray:
  norm = np.linalg.norm(e, axis=1, keepdims=True)
  return e / np.maximum(norm, 1e-12)  # a zero embedding stays zero: cosine 0 with everything


def embed(encoder: Encoder, images: ImageSet, batch_size: int = 256) -> np.ndarray:
  """Unit-norm embeddings [N, D] (float64) of `images`, encoded `batch_size` at a time."""
  out = []
  for start in range(0, len(images), batch_size):
    x = np.asarray(images[start:start + batch_size])
    e = np.asarray(encoder(x), np.float64)
    if e.ndim != 2 or len(e) != len(x):
      raise ValueError(f"encoder must map images [{len(x)}, H, W, C] to embeddings [{len(x)}, D], "
                       f"got shape {e.shape}")
    if not np.all(np.isfinite(e)):
      raise ValueError("encoder returned non-finite embeddings")
    out.append(_unit_rows(e))
  if not out:
    raise ValueError("embed: no images")
  dims = {e.shape[1] for e in out}
  if len(dims) > 1:
    raise ValueError(f"encoder returned embeddings of different sizes {sorted(dims)}")
  return np.concatenate(out)


def embedding_similarity(encoder: Encoder, generated: ArrayLike, train: ImageSet, *, batch_size: int = 256) -> dict:
  """Cosine similarity of each generation's embedding to its nearest training embedding.

  Args:
    encoder: any callable `images [N, H, W, C] -> [N, D]` (numpy or JAX arrays).
    generated: [G, H, W, C].
    train: [M, H, W, C] (an `ImageSet`), encoded in batches of `batch_size`; only one batch of
      training embeddings is held at a time.
    batch_size: images per encoder call.

  Returns:
    {"similarity": float64 [G] in [-1, 1] (high = a near copy), "nearest": int64 [G]}.
  """
  g = embed(encoder, _as_images(generated, "embedding_similarity: generated"), batch_size)  # [G, D]
  best = np.full(len(g), -np.inf)
  nearest = np.zeros(len(g), np.int64)
  for start in range(0, len(train), batch_size):
    m = embed(encoder, train[start:start + batch_size], batch_size)  # [B, D]
    if m.shape[1] != g.shape[1]:
      raise ValueError(f"encoder: training embeddings have {m.shape[1]} dims, generations {g.shape[1]}")
    sim = g @ m.T  # [G, B]
    j = np.argmax(sim, axis=1)
    s = sim[np.arange(len(g)), j]
    better = s > best
    best[better], nearest[better] = s[better], start + j[better]
  if not np.all(np.isfinite(best)):
    raise ValueError("embedding_similarity: the training set is empty")
  return {"similarity": np.clip(best, -1.0, 1.0), "nearest": nearest}


def pooled_pixels_encoder(pool: int = 4) -> Encoder:
  """A trivial reference encoder for tests and smoke runs (not a perceptual embedding).

  Average-pools each image over `pool` x `pool` blocks, flattens and centres it on 0.5:
  [N, H, W, C] in [0, 1] -> [N, (H / pool) (W / pool) C].
  """
  pool = int(pool)

  def encode(images):
    x = np.asarray(images, np.float64)
    n, h, w, c = x.shape
    if h % pool or w % pool:
      raise ValueError(f"pooled_pixels_encoder: pool={pool} must divide the {h}x{w} images")
    x = x.reshape(n, h // pool, pool, w // pool, pool, c).mean(axis=(2, 4))
    return x.reshape(n, -1) - 0.5

  return encode


# ---------------------------------------------------------------------------------------------
# Scoring functions.


def percentile_score(scores: ArrayLike, q: float = 95.0) -> float:
  """A scoring function of the paper: the q-th percentile of per-image scores."""
  return float(np.percentile(np.asarray(scores, np.float64), q))


def count_memorised(scores: ArrayLike, thresholds: Sequence[float], direction: Direction) -> np.ndarray:
  """Eidetic counts per threshold: int64 [T].

  direction "lower" (distances): score <= threshold counts; "higher" (similarities): score >= threshold.
  """
  thresholds = memorisation.validate_thresholds(thresholds, unit_interval=False)
  s = np.asarray(scores, np.float64).reshape(-1)
  if direction == "lower":
    return np.array([int(np.sum(s <= t)) for t in thresholds], np.int64)
  if direction == "higher":
    return np.array([int(np.sum(s >= t)) for t in thresholds], np.int64)
  raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def score_summary(scores: ArrayLike, thresholds: Sequence[float], direction: Direction, *, level: float = 0.95,
                  ci_method: str = "wilson") -> dict:
  """The paper's scoring functions over per-generation scores, as a JSON-friendly dict.

  Args:
    scores: [G] per-generation scores.
    thresholds: several thresholds.
    direction: "lower" for distances (memorised = score <= t), "higher" for similarities (>= t).
    level: coverage of the binomial intervals on the eidetic rates.
    ci_method: see `memorisation.binomial_ci`.

  Returns:
    {direction, n, mean, median, p5, p95, min, max, tail_95 (the 95th percentile towards
     memorisation: p5 for distances, p95 for similarities), extreme (min for distances, max for
     similarities), thresholds, counts, rates, ci}.
  """
  if direction not in DIRECTIONS:
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
  thresholds = memorisation.validate_thresholds(thresholds, unit_interval=False)
  s = np.asarray(scores, np.float64).reshape(-1)
  n = len(s)
  counts = count_memorised(s, thresholds, direction)
  stat = lambda f: float(f(s)) if n else None
  p5, p95 = stat(lambda x: np.percentile(x, 5)), stat(lambda x: np.percentile(x, 95))
  lo, hi = stat(np.min), stat(np.max)
  return {
      "direction": direction,
      "n": n,
      "mean": stat(np.mean),
      "median": stat(np.median),
      "p5": p5,
      "p95": p95,
      "min": lo,
      "max": hi,
      "tail_95": p5 if direction == "lower" else p95,
      "extreme": lo if direction == "lower" else hi,
      "thresholds": list(thresholds),
      "counts": [int(c) for c in counts],
      "rates": [float(c / n) if n else None for c in counts],
      "ci_level": level,
      "ci": [list(memorisation.binomial_ci(int(c), n, level, ci_method)) for c in counts],
  }
