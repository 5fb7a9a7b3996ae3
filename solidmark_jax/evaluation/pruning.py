"""Pruning mitigations of memorisation on the UNet's cross-attention key / value projections.

Pure functions of a params pytree (diffusers' `FlaxUNet2DConditionModel` names, as models/unet.py
builds it): each returns new params and leaves its inputs untouched; every leaf it does not prune is
returned as is (the same object, bit for bit).

- `cross_attention_kv`: the `attn2` blocks' `to_k` / `to_v` Dense kernels, [D_text, inner] each.
- Wanda (Sun et al. 2023): `wanda_prune` zeroes, per output unit of each K/V kernel, the fraction
  `sparsity` of weights with the highest score S_ij = |W_ij| * ||X_i||_2, X the memorised prompts'
  text embeddings (all their tokens): the weights most responsible for those prompts' keys / values.
- NeMo (Hintersdorf et al. 2024), initial selection only: `value_activations` (per value neuron, the
  mean over tokens of |x @ W_v + b|), `nemo_zscores` (memorised prompts' activations standardised by
  ordinary prompts' per-neuron mean and std), `nemo_neurons` (z > z_threshold for any memorised
  prompt), `nemo_prune` (zero those neurons' to_v output columns and bias entries).

Paths are the params' keys joined by "/", e.g.
"unet/down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_v/kernel". docs/pruning.md says what
is approximated. Typical use (host side, before the jitted denoiser):

  emb = text.encode(text_params, text.tokenize(memorised_captions))         # [P, L, D]
  params, info = wanda_prune(params, emb, sparsity=0.1)
  neurons = nemo_neurons(params, emb, ordinary_emb, z_threshold=3.0)         # {to_v path: [n] ids}
  params = nemo_prune(params, neurons)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike

CROSS_ATTENTION = "attn2"  # diffusers' FlaxBasicTransformerBlock: attn1 is self-attention, attn2 reads the text
PROJECTIONS = ("to_k", "to_v")  # the Dense layers of attn2 applied to the text embeddings (no bias in diffusers)
Params = Any  # a params pytree (nested dicts / FrozenDicts of arrays)


def _key_str(entry: Any) -> str:
  for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _path_str(path: Sequence[Any]) -> str:
  return "/".join(_key_str(e) for e in path)


def _leaves(params: Params) -> list[tuple[str, Any]]:
  return [(_path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]]


def _is_projection_kernel(path: str, leaf: Any, projections: Sequence[str]) -> bool:
  parts = path.split("/")
  return (len(parts) >= 3 and parts[-3] == CROSS_ATTENTION and parts[-2] in projections and parts[-1] == "kernel"
          and np.ndim(leaf) == 2)


def _kernels(params: Params, projections: Sequence[str]) -> dict[str, Any]:
  bad = [p for p in projections if p not in PROJECTIONS]
  if bad or not projections:
    raise ValueError(f"projections must be a non-empty subset of {PROJECTIONS}, got {tuple(projections)}")
  leaves = _leaves(params)
  found = {p: x for p, x in leaves if _is_projection_kernel(p, x, projections)}
  if not found:
    wanted = " and ".join(f"'.../{CROSS_ATTENTION}/{p}/kernel'" for p in projections)
    example = f", e.g. {leaves[0][0]!r}" if leaves else ""
    raise ValueError(f"the params have no cross-attention key / value kernels: searched {len(leaves)} leaves{example} "
                     f"for 2-D leaves at {wanted} (diffusers' FlaxUNet2DConditionModel names); a model without "
                     "cross-attention blocks has nothing for these mitigations to prune")
  return found


def cross_attention_kv(params: Params) -> dict[str, Any]:
  """The cross-attention key / value kernels of a UNet's params.

  Args:
    params: a params pytree with diffusers' UNet names (a leading "params" level is fine).

  Returns:
    {path: kernel [D_text, inner]} for every `.../attn2/to_k/kernel` and `.../attn2/to_v/kernel`, in the
    params' (sorted) leaf order; the kernels are the params' own arrays.

  Raises:
    ValueError: the params have no such kernels (names what was searched for).
  """
  return _kernels(params, PROJECTIONS)


def _replace(params: Params, new: Mapping[str, Any]) -> Params:
  """The params with the leaves at `new`'s paths replaced; every other leaf is the same object."""
  return jax.tree_util.tree_map_with_path(lambda p, x: new.get(_path_str(p), x), params)


def _tokens(embeddings: ArrayLike, kernels: Mapping[str, Any], field: str) -> jax.Array:
  """Embeddings [P, L, D] or [L, D] -> float32 [P, L, D], D checked against every kernel's input dim."""
  x = jnp.asarray(embeddings)
  if x.ndim not in (2, 3) or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{field} must be float text embeddings [P, L, D] or [L, D], got shape {x.shape}, dtype {x.dtype}")
  if x.shape[-1] == 0 or x.shape[-2] == 0 or (x.ndim == 3 and x.shape[0] == 0):
    raise ValueError(f"{field} must hold at least one prompt of one token, got shape {x.shape}")
  for path, w in kernels.items():
    if np.shape(w)[0] != x.shape[-1]:
      raise ValueError(f"{field} has shape {x.shape}: its last dim {x.shape[-1]} must equal the input dim of the "
                       f"kernel {path} of shape {tuple(np.shape(w))} (the text encoder's hidden size, "
                       "model.cross_attention_dim); were these embeddings made by this model's text encoder?")
  x = x.astype(jnp.float32)
  return x[None] if x.ndim == 2 else x


def _check_sparsity(sparsity: Any) -> float:
  ok = (not isinstance(sparsity, bool) and isinstance(sparsity, (int, float, np.integer, np.floating))
        and math.isfinite(sparsity) and 0 <= sparsity < 1)
  if not ok:
    raise ValueError(f"sparsity must be a number in [0, 1) (the fraction of each output unit's weights to zero), "
                     f"got {sparsity!r}")
  return float(sparsity)


def _feature_norms(x: jax.Array) -> jax.Array:
  """||X_i||_2 over all tokens: [P, L, D] -> [D]."""
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=(0, 1)))


def wanda_scores(kernel: ArrayLike, embeddings: ArrayLike) -> jax.Array:
  """Wanda's S_ij = |W_ij| * ||X_i||_2 of one Flax kernel W [D, out] (float32 [D, out]).

  Args:
    kernel: [D, out], input-feature axis first (Flax's Dense layout).
    embeddings: [P, L, D] or [L, D]; ||X_i|| is feature i's l2 norm over all P * L tokens.
  """
  x = _tokens(embeddings, {"kernel": kernel}, "embeddings")
  return jnp.abs(jnp.asarray(kernel, jnp.float32)) * _feature_norms(x)[:, None]  # [D, out]


def wanda_prune(params: Params, embeddings: ArrayLike, sparsity: float,
                projections: Sequence[str] = PROJECTIONS) -> tuple[Params, dict[str, int]]:
  """Wanda on the cross-attention K / V kernels: per output unit, zero the highest-scoring weights.

  Each kernel W [D, out] is scored with `wanda_scores` on the memorised prompts' embeddings; in every
  column (output unit; a row of the PyTorch weight) the k = floor(D * sparsity) highest scores are set
  to 0 (ties: the lower input index first). Other leaves (to_q, attn1, biases, ...) are untouched.

  Args:
    params: a UNet's params pytree.
    embeddings: the memorised prompts' text embeddings, [P, L, D] or [L, D], all tokens counted.
    sparsity: the fraction of each column to zero, in [0, 1); 0 returns `params` itself.
    projections: which of `PROJECTIONS` to prune.

  Returns:
    (pruned params, {kernel path: entries zeroed = k * out}).

  Raises:
    ValueError: sparsity outside [0, 1), embeddings whose last dim is not the kernels' input dim, or
      params without cross-attention kernels.
  """
  sparsity = _check_sparsity(sparsity)
  kernels = _kernels(params, projections)
  x = _tokens(embeddings, kernels, "embeddings")
  norm = _feature_norms(x)  # [D]
  new, info = {}, {}
  for path, w in kernels.items():
    d_in, d_out = np.shape(w)
    k = int(d_in * sparsity)
    info[path] = k * d_out
    if k == 0:
      continue
    score = jnp.abs(jnp.asarray(w, jnp.float32)) * norm[:, None]  # [D, out]
    _, top = jax.lax.top_k(score.T, k)  # [out, k] input ids per column, ties to the lower id
    mask = jnp.zeros((d_out, d_in), bool).at[jnp.arange(d_out)[:, None], top].set(True).T  # [D, out]
    w = jnp.asarray(w)
    new[path] = jnp.where(mask, jnp.zeros((), w.dtype), w)
  return (_replace(params, new) if new else params), info


def _biases(params: Params, kernel_paths: Sequence[str]) -> dict[str, Any]:
  """{kernel path: its Dense layer's bias leaf} for the kernels that have a 1-D bias beside them."""
  leaves = dict(_leaves(params))
  out = {}
  for path in kernel_paths:
    bias = leaves.get(path[:-len("kernel")] + "bias")
    if bias is not None and np.ndim(bias) == 1:
      out[path] = bias
  return out


def value_activations(params: Params, embeddings: ArrayLike) -> dict[str, jax.Array]:
  """Each cross-attention value layer's per-neuron activation for a set of prompts.

  Args:
    params: a UNet's params pytree.
    embeddings: text embeddings [P, L, D] or [L, D] (one prompt), all tokens counted.

  Returns:
    {to_v kernel path: float32 [P, inner]}: mean over tokens of |x @ W_v + b| (b only where the layer
    has a bias; diffusers' to_v has none).
  """
  kernels = _kernels(params, ("to_v",))
  x = _tokens(embeddings, kernels, "embeddings")  # [P, L, D]
  biases = _biases(params, list(kernels))
  out = {}
  for path, w in kernels.items():
    v = jnp.einsum("pld,do->plo", x, jnp.asarray(w, jnp.float32), precision=jax.lax.Precision.HIGHEST)
    if path in biases:
      v = v + jnp.asarray(biases[path], jnp.float32)
    out[path] = jnp.mean(jnp.abs(v), axis=1)  # [P, inner]
  return out


def nemo_zscores(params: Params, memorised_embeddings: ArrayLike,
                 ordinary_embeddings: ArrayLike) -> dict[str, np.ndarray]:
  """Memorised prompts' value activations standardised by the ordinary prompts' per-neuron statistics.

  z = (a_mem - mean_ord) / std_ord, std with ddof=1 over the ordinary prompts; a neuron with
  std_ord = 0 gets +inf / -inf / 0 as a_mem is above / below / equal to mean_ord.

  Returns:
    {to_v kernel path: float64 [P_mem, inner]}.

  Raises:
    ValueError: fewer than 2 ordinary prompts, or embeddings that do not fit the kernels.
  """
  ordinary = value_activations(params, ordinary_embeddings)
  memorised = value_activations(params, memorised_embeddings)
  n = next(iter(ordinary.values())).shape[0]
  if n < 2:
    raise ValueError(f"ordinary_embeddings must hold at least 2 prompts [P, L, D] for a per-neuron std, "
                     f"got shape {np.shape(ordinary_embeddings)}")
  out = {}
  for path, a in memorised.items():
    ref = np.asarray(ordinary[path], np.float64)
    mu, sd = ref.mean(axis=0), ref.std(axis=0, ddof=1)  # [inner]
    diff = np.asarray(a, np.float64) - mu  # [P_mem, inner]
    flat = np.where(diff > 0, np.inf, np.where(diff < 0, -np.inf, 0.0))  # where std_ord = 0
    out[path] = np.where(sd > 0, diff / np.where(sd > 0, sd, 1.0), flat)
  return out


def nemo_neurons(params: Params, memorised_embeddings: ArrayLike, ordinary_embeddings: ArrayLike,
                 z_threshold: float, max_neurons_per_layer: int | None = None) -> dict[str, np.ndarray]:
  """NeMo's initial selection: value neurons with out-of-distribution activations on memorised prompts.

  A neuron of a value layer is selected when its `nemo_zscores` z-score exceeds `z_threshold` for at
  least one memorised prompt (the union of the per-prompt selections).

  Args:
    params: a UNet's params pytree.
    memorised_embeddings: [P, L, D] or [L, D], the memorised prompts' text embeddings.
    ordinary_embeddings: [Q, L', D], Q >= 2 prompts the model does not memorise (the reference statistics).
    z_threshold: a positive z-score threshold.
    max_neurons_per_layer: keep at most this many per layer, the highest max-over-prompts z first
      (ties: the lower index); None keeps all.

  Returns:
    {to_v kernel path: sorted int64 neuron ids [n]} for every value layer (n may be 0).
  """
  ok = (not isinstance(z_threshold, bool) and isinstance(z_threshold, (int, float, np.integer, np.floating))
        and math.isfinite(z_threshold) and z_threshold > 0)
  if not ok:
    raise ValueError(f"z_threshold must be a finite number > 0 (a z-score against the ordinary prompts), "
                     f"got {z_threshold!r}")
  if max_neurons_per_layer is not None and (isinstance(max_neurons_per_layer, bool) or not isinstance(
      max_neurons_per_layer, (int, np.integer)) or max_neurons_per_layer < 1):
    raise ValueError(f"max_neurons_per_layer must be an integer >= 1 or None, got {max_neurons_per_layer!r}")
  out = {}
  for path, z in nemo_zscores(params, memorised_embeddings, ordinary_embeddings).items():
    best = z.max(axis=0)  # [inner]
    ids = np.flatnonzero(best > z_threshold)
    if max_neurons_per_layer is not None and ids.size > max_neurons_per_layer:
      ids = ids[np.argsort(-best[ids], kind="stable")[:max_neurons_per_layer]]
    out[path] = np.sort(ids).astype(np.int64)
  return out


def nemo_prune(params: Params, neurons: Mapping[str, ArrayLike]) -> Params:
  """Deactivates value neurons: zeroes their output columns of the to_v kernels (and bias entries).

  Args:
    params: a UNet's params pytree.
    neurons: {to_v kernel path: neuron ids in [0, inner)}, e.g. from `nemo_neurons`; empty ids leave
      a layer untouched.

  Returns:
    New params; every leaf other than the named to_v kernels and their biases is the same object.

  Raises:
    ValueError: a path that is not a to_v kernel of the params, or ids out of range / not integers.
  """
  kernels = _kernels(params, ("to_v",))
  biases = _biases(params, list(kernels))
  new = {}
  for path, ids in neurons.items():
    if path not in kernels:
      known = list(kernels)[:3]
      raise ValueError(f"neurons: {path!r} is not a cross-attention value kernel of the params; the keys must be "
                       f"to_v kernel paths such as {known} ({len(kernels)} in all)")
    w = jnp.asarray(kernels[path])
    ids = np.asarray(ids)
    if ids.size == 0:
      continue
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= w.shape[1]:
      raise ValueError(f"neurons[{path!r}] must be 1-D integer ids in [0, {w.shape[1]}) (the kernel is "
                       f"{tuple(w.shape)}), got shape {ids.shape}, dtype {ids.dtype}, values {ids.tolist()[:8]}")
    keep = np.ones(w.shape[1], bool)
    keep[ids] = False
    new[path] = jnp.where(keep[None, :], w, jnp.zeros((), w.dtype))  # [D, inner]
    if path in biases:
      b = jnp.asarray(biases[path])
      new[path[:-len("kernel")] + "bias"] = jnp.where(keep, b, jnp.zeros((), b.dtype))
  return _replace(params, new) if new else params


# ---------------------------------------------------------------------------------------------
# One pruning setting (a sweep row).

METHODS = ("none", "wanda", "nemo")


@dataclasses.dataclass(frozen=True)
class Pruning:
  """A pruning mitigation of a sweep: `name` "none", "wanda" (value: sparsity in [0, 1)) or "nemo"
  (value: the z-score threshold, > 0)."""

  name: str = "none"
  value: float = 0.0

  def __post_init__(self):
    if self.name not in METHODS:
      raise ValueError(f"pruning: unknown method {self.name!r}; one of {METHODS}")
    if self.name == "none" and self.value != 0:
      raise ValueError(f"pruning 'none' takes no value, got {self.value:g}")
    if self.name == "wanda":
      _check_sparsity(self.value)
    if self.name == "nemo" and not self.value > 0:
      raise ValueError(f"pruning nemo: the z-score threshold must be > 0, got {self.value:g}")

  @property
  def is_identity(self) -> bool:
    return self.name == "none"

  def as_record(self) -> dict:
    return {"name": self.name, "value": float(self.value)}


def prune(params: Params, spec: Pruning, memorised_embeddings: ArrayLike,
          ordinary_embeddings: ArrayLike | None = None) -> tuple[Params, dict]:
  """`params` pruned by `spec` for the memorised prompts' embeddings [P, L, D]; NeMo's statistics come
  from `ordinary_embeddings` [Q, L, D] (Q >= 2). Returns (params, record): the record holds the
  method, its value and how much was pruned (entries zeroed per kernel, or neurons per layer)."""
  record = spec.as_record()
  if spec.is_identity:
    return params, {**record, "pruned": 0}
  if spec.name == "wanda":
    pruned, info = wanda_prune(params, memorised_embeddings, spec.value)
    return pruned, {**record, "pruned": int(sum(info.values())), "unit": "weights",
                    "of": int(sum(np.size(k) for k in cross_attention_kv(params).values()))}
  if ordinary_embeddings is None:
    raise ValueError("pruning nemo: needs ordinary (non-memorised) prompts' embeddings for its statistics")
  neurons = nemo_neurons(params, memorised_embeddings, ordinary_embeddings, spec.value)
  v = _kernels(params, ("to_v",))
  return nemo_prune(params, neurons), {**record, "pruned": int(sum(len(n) for n in neurons.values())),
                                       "unit": "value neurons", "of": int(sum(k.shape[1] for k in v.values()))}
