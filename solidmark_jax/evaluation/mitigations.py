"""Inference-time memorisation mitigations (the paper's Table 3; Somepalli et al. 2023b).

Each mitigation perturbs what the model is conditioned on, at one of three stages:

| name           | stage       | what it does (one iteration)                                       |
| -------------- | ----------- | ------------------------------------------------------------------ |
| "gni"          | "embedding" | adds N(0, sigma^2) noise to the condition embedding (sigma = strength) |
| "rt"           | "tokens"    | replaces each caption token with probability p, inserts a random token |
| "cwr"          | "caption"   | inserts a randomly chosen word of the caption at a random position |
| "rna"          | "caption"   | inserts a random number in [0, 10^6) at a random position          |
| "random_words" | "caption"   | inserts a random word of a vocabulary at a random position         |

The caption- and token-level ones run `strength` iterations (a non-negative integer); GNI's strength
is sigma. RT follows Somepalli et al. 2023b's "random token replacement and addition": in every
iteration each caption token is replaced by a random token with probability `probability` (default
`RT_PROBABILITY` = 0.1, about one token of a 10-token caption), then one random token is inserted. "none" (or strength 0) is the identity. GNI works on any conditional model: text models
pass their text embeddings [B, L, D]; class / image models look up their condition table rows
(`condition_embeddings`) and pass the noised [B, D] floats. The others need captions (model.condition
"text"); `check_condition` says so up front.

Every perturbation is reproducible from (seed, instance id) alone, so a resumed evaluation
reproduces an uninterrupted one and batching does not change results: strings and token ids draw from
`np.random.default_rng([seed, salt, instance id])`, embeddings from `fold_in(key(seed) + salt, id)`.

Typical use in an evaluation (host side, then the jitted denoiser):

  spec = Mitigation.from_config(config.eval.mitigation)
  check_condition(spec, config.model.condition)
  captions = mitigate_captions(spec, captions, ids, vocabulary)      # before tokenisation
  token_ids = mitigate_tokens(spec, text.tokenize(captions), ids, TokenSpec.from_tokenizer(text.tokenizer))
  context = mitigate_embeddings(spec, text.encode(text_params, token_ids), ids)  # [B, L, D]
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike

from solidmark_jax.config import section_items

MITIGATIONS = ("none", "gni", "rt", "cwr", "rna", "random_words")
Stage = Literal["caption", "tokens", "embedding"]
STAGES: dict[str, Stage | None] = {
    "none": None,
    "gni": "embedding",
    "rt": "tokens",
    "cwr": "caption",
    "rna": "caption",
    "random_words": "caption",
}
CONDITION_KINDS = ("class", "image", "text", "none")  # model.condition values
ACCEPTED_CONDITIONS: dict[str, tuple[str, ...]] = {
    "none": CONDITION_KINDS,
    "gni": ("class", "image", "text"),
    "rt": ("text",),
    "cwr": ("text",),
    "rna": ("text",),
    "random_words": ("text",),
}
RNA_MAX = 10**6  # RNA draws integers in [0, RNA_MAX)
RT_PROBABILITY = 0.1  # RT: per-token replacement probability of one iteration
# Per-mitigation salts of the random streams, so two mitigations with one seed are independent.
_SALTS = {"gni": 0x6E1, "rt": 0x271, "cwr": 0xC3A, "rna": 0x3AA, "random_words": 0x3D5}
_CONFIG_FIELDS = ("name", "strength", "seed", "probability")


def _check_seed(seed: Any, field: str) -> int:
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"{field} must be an integer >= 0, got {seed!r}")
  return int(seed)


@dataclasses.dataclass(frozen=True)
class Mitigation:
  """An inference-time mitigation and its strength.

  Attributes:
    name: one of `MITIGATIONS`.
    strength: GNI: sigma >= 0. The others: the number of iterations, a non-negative integer
      (an integral float such as 2.0 is accepted). "none": 0.
    seed: seeds the per-instance random streams (>= 0).
    probability: RT: the chance that an iteration replaces each caption token, in [0, 1]; only RT
      uses it (any other name must keep the default).
  """

  name: str = "none"
  strength: float = 0.0
  seed: int = 0
  probability: float = RT_PROBABILITY

  def __post_init__(self):
    self.validate()

  def validate(self, field: str = "mitigation") -> None:
    """Raises a ValueError naming `field`.name / .strength / .seed for a bad spec."""
    if self.name not in MITIGATIONS:
      raise ValueError(f"{field}.name must be one of {MITIGATIONS}, got {self.name!r}")
    s = self.strength
    if isinstance(s, bool) or not isinstance(s, (int, float, np.integer, np.floating)) or not math.isfinite(s):
      raise ValueError(f"{field}.strength must be a finite number, got {s!r}")
    if s < 0:
      raise ValueError(f"{field}.strength must be >= 0, got {s}")
    if self.name == "none" and s != 0:
      raise ValueError(f"{field}.strength must be 0 for name 'none', got {s}; pick a mitigation in {MITIGATIONS[1:]}")
    if self.name not in ("none", "gni") and s != int(s):
      raise ValueError(f"{field}.strength is the number of {self.name} iterations: a non-negative integer, got {s}")
    _check_seed(self.seed, f"{field}.seed")
    p = self.probability
    if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)) or not 0 <= p <= 1:
      raise ValueError(f"{field}.probability must be a number in [0, 1] (RT's per-token replacement "
                       f"probability), got {p!r}")
    if self.name != "rt" and p != RT_PROBABILITY:
      raise ValueError(f"{field}.probability={p} is only used by name 'rt', not {self.name!r}; set it to "
                       f"{RT_PROBABILITY} (the default)")

  @classmethod
  def from_config(cls, section: Any, field: str = "eval.mitigation") -> "Mitigation":
    """Parses and validates a config section with fields name, strength, seed, probability (None: "none").

    Args:
      section: e.g. `config.eval.mitigation` (a ConfigDict or dict), or None.
      field: the section's path, named in errors.
    """
    items = section_items(section, field, _CONFIG_FIELDS)
    spec = object.__new__(cls)  # validate with the config's field names, not the class's
    for name, default in (("name", "none"), ("strength", 0.0), ("seed", 0), ("probability", RT_PROBABILITY)):
      value = items.get(name, default)
      object.__setattr__(spec, name, default if value is None else value)
    spec.validate(field)
    return spec

  def as_record(self) -> dict:
    """The spec as reports and result stores record it: its fields, `probability` for RT only."""
    record = dataclasses.asdict(self)
    if self.name != "rt":
      del record["probability"]
    return record

  @property
  def stage(self) -> Stage | None:
    return stage(self.name)

  @property
  def is_identity(self) -> bool:
    return self.name == "none" or self.strength == 0

  @property
  def iterations(self) -> int:
    """Iterations of a caption / token mitigation (0 for "none" and "gni")."""
    return 0 if self.name in ("none", "gni") else int(self.strength)

  @property
  def sigma(self) -> float:
    """GNI's noise std (0 for the others)."""
    return float(self.strength) if self.name == "gni" else 0.0


def stage(name: str) -> Stage | None:
  """Where a mitigation applies: "caption" strings, "tokens" (ids), "embedding", or None ("none")."""
  if name not in STAGES:
    raise ValueError(f"mitigation name must be one of {MITIGATIONS}, got {name!r}")
  return STAGES[name]


def check_condition(spec: Mitigation, condition: str, field: str = "eval.mitigation.name") -> None:
  """Raises a clear ValueError when `spec` cannot apply to a model with `model.condition == condition`."""
  if condition not in CONDITION_KINDS:
    raise ValueError(f"model.condition must be one of {CONDITION_KINDS}, got {condition!r}")
  accepted = ACCEPTED_CONDITIONS[spec.name]
  if condition not in accepted:
    what = ("an unconditional model has no condition to perturb" if condition == "none"
            else f"it works on {STAGES[spec.name]}s, which a {condition!r}-conditioned model does not have")
    raise ValueError(f"{field}={spec.name!r} cannot apply to model.condition={condition!r}: {what}; "
                     f"it needs model.condition in {accepted}" + ("; use 'gni' instead" if condition != "none" else ""))


def _check_ids(instance_ids, n: int, what: str) -> np.ndarray:
  ids = np.asarray(instance_ids)
  if ids.shape != (n,):
    raise ValueError(f"instance_ids must be [N] = [{n}] (one per {what}), got shape {ids.shape}")
  if ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0):
    raise ValueError(f"instance_ids must be integers >= 0, got dtype {ids.dtype}, min {ids.min()}")
  return ids.astype(np.int64)


def instance_rng(seed: int, name: str, instance_id: int) -> np.random.Generator:
  """The random stream of mitigation `name` for one instance: default_rng([seed, salt, id])."""
  return np.random.default_rng([int(seed), _SALTS[name], int(instance_id)])


# ---------------------------------------------------------------------------------------------
# Caption strings (CWR, RNA, random words).


def _insert_words(caption: str, iterations: int, draw, rng: np.random.Generator) -> str:
  """Inserts `iterations` words, each `draw(rng)`, at uniform positions among the current words."""
  if iterations == 0:
    return caption
  words = caption.split()
  for _ in range(iterations):
    word = draw(rng)
    words.insert(int(rng.integers(0, len(words) + 1)), word)
  return " ".join(words)


def repeat_caption_words(caption: str, iterations: int, rng: np.random.Generator) -> str:
  """CWR: `iterations` times, inserts a uniformly chosen word of the original caption at a random
  position. A caption without words is returned unchanged."""
  original = caption.split()
  if not original:
    return caption
  return _insert_words(caption, iterations, lambda r: original[int(r.integers(0, len(original)))], rng)


def add_random_numbers(caption: str, iterations: int, rng: np.random.Generator) -> str:
  """RNA: `iterations` times, inserts a uniform integer in [0, 10^6) at a random position."""
  return _insert_words(caption, iterations, lambda r: str(int(r.integers(0, RNA_MAX))), rng)


def add_random_words(caption: str, iterations: int, rng: np.random.Generator, vocabulary: Sequence[str]) -> str:
  """Random word addition: `iterations` times, inserts a uniform word of `vocabulary` at a random position."""
  return _insert_words(caption, iterations, lambda r: vocabulary[int(r.integers(0, len(vocabulary)))], rng)


def vocabulary_from_tokenizer(tokenizer: Any) -> list[str]:
  """Whole alphabetic words of a CLIP-style BPE vocabulary (entries ending in "</w>"), sorted.

  Args:
    tokenizer: has `get_vocab() -> {token: id}` (a transformers CLIPTokenizer).
  """
  words = {t[:-4] for t in tokenizer.get_vocab() if t.endswith("</w>") and t[:-4].isalpha()}
  if not words:
    raise ValueError("tokenizer vocabulary has no whole words (entries ending in '</w>'); pass a word list")
  return sorted(words)


def mitigate_captions(spec: Mitigation, captions: Sequence[str], instance_ids: ArrayLike,
                      vocabulary: Sequence[str] | None = None) -> list[str]:
  """Applies a caption-stage mitigation; any other stage returns the captions unchanged.

  Args:
    spec: the mitigation.
    captions: [N] strings.
    instance_ids: [N] int ids >= 0 that seed each caption's perturbation.
    vocabulary: the words "random_words" draws from (e.g. `vocabulary_from_tokenizer`).

  Returns:
    [N] strings.
  """
  captions = list(captions)
  ids = _check_ids(instance_ids, len(captions), "caption")
  for i, c in enumerate(captions):
    if not isinstance(c, str):
      raise ValueError(f"captions[{i}] must be a string, got {type(c).__name__}")
  if spec.stage != "caption" or spec.is_identity:
    return captions
  if spec.name == "random_words":
    if not vocabulary:
      raise ValueError("mitigation 'random_words' needs a vocabulary (a non-empty list of words, e.g. "
                       "vocabulary_from_tokenizer(text_encoder.tokenizer))")
    vocabulary = list(vocabulary)
  out = []
  for caption, i in zip(captions, ids):
    rng = instance_rng(spec.seed, spec.name, i)
    if spec.name == "cwr":
      out.append(repeat_caption_words(caption, spec.iterations, rng))
    elif spec.name == "rna":
      out.append(add_random_numbers(caption, spec.iterations, rng))
    else:
      out.append(add_random_words(caption, spec.iterations, rng, vocabulary))
  return out


# ---------------------------------------------------------------------------------------------
# Token ids (RT).


@dataclasses.dataclass(frozen=True)
class TokenSpec:
  """What RT needs of a tokenizer.

  Attributes:
    vocab_size: token ids lie in [0, vocab_size).
    bos_id: the start token (every row begins with it).
    eos_id: the end token (the first one after the start ends the caption).
    pad_id: the padding token (may equal eos_id, as in SD 1.x's CLIP tokenizer).
    special_ids: ids RT never draws (bos, eos and pad are always included).
  """

  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int
  special_ids: tuple[int, ...] = ()

  def __post_init__(self):
    if self.vocab_size < 1:
      raise ValueError(f"TokenSpec.vocab_size must be >= 1, got {self.vocab_size}")
    for name in ("bos_id", "eos_id", "pad_id"):
      v = getattr(self, name)
      if not 0 <= v < self.vocab_size:
        raise ValueError(f"TokenSpec.{name}={v} must lie in [0, vocab_size={self.vocab_size})")
    if self.bos_id == self.eos_id:
      raise ValueError(f"TokenSpec: bos_id and eos_id must differ, both are {self.bos_id}")

  @classmethod
  def from_tokenizer(cls, tokenizer: Any) -> "TokenSpec":
    """From a transformers tokenizer (vocab_size, bos/eos/pad_token_id, all_special_ids)."""
    missing = [a for a in ("vocab_size", "bos_token_id", "eos_token_id") if getattr(tokenizer, a, None) is None]
    if missing:
      raise ValueError(f"tokenizer {type(tokenizer).__name__} lacks {missing}: RT needs start and end tokens")
    vocab = int(tokenizer.vocab_size)
    if hasattr(tokenizer, "__len__"):  # transformers: len() counts added tokens too
      vocab = max(vocab, len(tokenizer))
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else tokenizer.eos_token_id
    return cls(vocab, int(tokenizer.bos_token_id), int(tokenizer.eos_token_id), int(pad),
               tuple(int(i) for i in getattr(tokenizer, "all_special_ids", ())))

  def candidates(self) -> np.ndarray:
    """int64 [V'] the ids RT may draw: the vocabulary less the special ids."""
    special = np.asarray(sorted({self.bos_id, self.eos_id, self.pad_id, *self.special_ids}), np.int64)
    out = np.setdiff1d(np.arange(self.vocab_size, dtype=np.int64), special)
    if not out.size:
      raise ValueError("TokenSpec: every id is special, RT has no token to draw")
    return out


def caption_end(row: np.ndarray, tokens: TokenSpec, where: str = "token ids") -> int:
  """Index of the end token of a tokenised caption [L]; the caption is row[1:end]."""
  if row.size < 2 or row[0] != tokens.bos_id:
    raise ValueError(f"{where}: must start with the start token {tokens.bos_id}, got {row[:1].tolist()}")
  ends = np.flatnonzero(row[1:] == tokens.eos_id)
  if not ends.size:
    raise ValueError(f"{where}: no end token {tokens.eos_id} after the start token")
  return int(ends[0]) + 1


def random_token_edit(row: np.ndarray, iterations: int, rng: np.random.Generator, tokens: TokenSpec,
                      candidates: np.ndarray | None = None, where: str = "token ids",
                      probability: float = RT_PROBABILITY) -> np.ndarray:
  """RT on one tokenised caption (random token replacement and addition, Somepalli et al. 2023b).

  Each iteration replaces every caption token, independently with probability `probability`, by a
  uniform random non-special token, then inserts one more random non-special token at a uniform
  position of the caption (the end token and the rest shift right by one; skipped when the row has
  no room).

  Args:
    row: int [L] = start, caption tokens, end, padding.
    iterations: RT iterations.
    rng: the instance's stream.
    tokens: the tokenizer's ids.
    candidates: `tokens.candidates()`, if precomputed.
    where: names the row in errors.
    probability: per-token replacement probability of one iteration.

  Returns:
    int [L], same dtype: the start token, caption tokens, the end token and padding, in that order.
  """
  row = np.array(row, copy=True)
  end = caption_end(row, tokens, where)
  if iterations == 0:
    return row
  candidates = tokens.candidates() if candidates is None else candidates
  for _ in range(iterations):
    if end > 1:  # replace each caption token with probability p
      hit = np.flatnonzero(rng.random(end - 1) < probability) + 1
      row[hit] = candidates[rng.integers(0, candidates.size, hit.size)]
    if end + 1 < row.size:  # add a token at a position in [1, end]
      pos = int(rng.integers(1, end + 1))
      row[pos + 1:end + 2] = row[pos:end + 1].copy()
      row[pos] = candidates[int(rng.integers(0, candidates.size))]
      end += 1
  return row


def mitigate_tokens(spec: Mitigation, token_ids: ArrayLike, instance_ids: ArrayLike, tokens: TokenSpec) -> np.ndarray:
  """Applies RT to tokenised captions; any other mitigation returns them unchanged.

  Args:
    spec: the mitigation.
    token_ids: int [N, L] (e.g. `TextEncoder.tokenize(captions)`).
    instance_ids: [N] int ids >= 0 that seed each row's perturbation.
    tokens: the tokenizer's ids (`TokenSpec.from_tokenizer`).

  Returns:
    int [N, L], same dtype.
  """
  token_ids = np.asarray(token_ids)
  if token_ids.ndim != 2 or not np.issubdtype(token_ids.dtype, np.integer):
    raise ValueError(f"token ids must be an int array [N, L], got {token_ids.dtype} {token_ids.shape}")
  ids = _check_ids(instance_ids, token_ids.shape[0], "row of token ids")
  if spec.stage != "tokens" or spec.is_identity:
    return token_ids
  candidates = tokens.candidates()
  rows = [random_token_edit(row, spec.iterations, instance_rng(spec.seed, spec.name, i), tokens, candidates,
                            where=f"token ids row {n}", probability=float(spec.probability))
          for n, (row, i) in enumerate(zip(token_ids, ids))]
  return np.stack(rows).astype(token_ids.dtype)


# ---------------------------------------------------------------------------------------------
# Embeddings (GNI).


def embedding_key(seed: int) -> jax.Array:
  """GNI's base PRNG key for a seed; an instance's noise uses fold_in(this, instance id)."""
  return jax.random.fold_in(jax.random.key(seed), _SALTS["gni"])


def gaussian_noise(embeddings: jax.Array, sigma: Any, rng: jax.Array, instance_ids: jax.Array) -> jax.Array:
  """GNI: embeddings + sigma * eps, eps ~ N(0, 1) drawn per instance from fold_in(rng, id). Jittable.

  Args:
    embeddings: [N, D] (class / image conditions) or [N, L, D] (text) floats.
    sigma: noise std (a float or a traced scalar: no recompile per value).
    rng: a PRNG key (`embedding_key(seed)`).
    instance_ids: [N] int ids.

  Returns:
    [N, ...] like `embeddings`.
  """
  embeddings = jnp.asarray(embeddings)
  eps = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(rng, i), embeddings.shape[1:], embeddings.dtype))(
      jnp.asarray(instance_ids, jnp.int32))  # [N, ...]
  return embeddings + jnp.asarray(sigma, embeddings.dtype) * eps


def mitigate_embeddings(spec: Mitigation, embeddings: ArrayLike, instance_ids: ArrayLike) -> jax.Array:
  """Applies GNI to condition embeddings; any other mitigation returns them unchanged.

  Args:
    spec: the mitigation.
    embeddings: [N, D] or [N, L, D] floats.
    instance_ids: [N] int ids >= 0.
  """
  embeddings = jnp.asarray(embeddings)
  if embeddings.ndim not in (2, 3) or not jnp.issubdtype(embeddings.dtype, jnp.floating):
    raise ValueError(f"embeddings must be floats [N, D] or [N, L, D], got {embeddings.dtype} {embeddings.shape}")
  if isinstance(instance_ids, jax.core.Tracer):
    ids = instance_ids
  else:
    ids = _check_ids(instance_ids, embeddings.shape[0], "embedding")
  if spec.stage != "embedding" or spec.is_identity:
    return embeddings
  return gaussian_noise(embeddings, spec.sigma, embedding_key(spec.seed), ids)


def condition_embeddings(table: ArrayLike, conditions: ArrayLike) -> jax.Array:
  """Rows of a class / image model's condition table: what GNI perturbs for such models.

  Args:
    table: [num_conditions + 1, D] (`params["condition_embedding"]["embedding"]`, last row = null).
    conditions: [N] int condition ids.

  Returns:
    [N, D] float embeddings (the denoiser takes them in place of the ids).
  """
  table = jnp.asarray(table)
  if table.ndim != 2:
    raise ValueError(f"condition table must be [num_conditions + 1, D], got shape {table.shape}")
  conditions = jnp.asarray(conditions)
  if conditions.ndim != 1 or not jnp.issubdtype(conditions.dtype, jnp.integer):
    raise ValueError(f"conditions must be int ids [N], got {conditions.dtype} {conditions.shape}")
  if not isinstance(conditions, jax.core.Tracer) and conditions.size and (
      int(conditions.min()) < 0 or int(conditions.max()) >= table.shape[0]):
    raise ValueError(f"condition ids must lie in [0, {table.shape[0]}), got [{int(conditions.min())}, "
                     f"{int(conditions.max())}]")
  return table[conditions]


def condition_table(params: Mapping) -> jax.Array:
  """The condition table of a `models.ConditionedUNet`'s params: [num_conditions + 1, D]."""
  try:
    return params["condition_embedding"]["embedding"]
  except (KeyError, TypeError):
    raise ValueError("params have no condition_embedding/embedding table (a class / image ConditionedUNet's); "
                     f"top-level keys: {sorted(params) if isinstance(params, Mapping) else type(params).__name__}"
                     ) from None
