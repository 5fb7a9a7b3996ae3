"""The frozen text encoder of text-conditioned (latent) models: CLIP's text transformer and tokenizer.

A `TextEncoder` pairs transformers' `CLIPTokenizer` with a `FlaxCLIPTextModel` whose parameters are
never trained. Captions become token ids once, on the host (`tokenize`), and ids become the UNet's
`encoder_hidden_states` inside jitted code (`encode`, pure in the parameters):

  captions -> ids int32 [N, L] -> last_hidden_state float32 [B, L, D]

Two ways to get one:
- `load_text_encoder(path)`: a Stable Diffusion root (`text_encoder/`, `tokenizer/`), e.g. SD 2.1.
  Flax weights (`flax_model.msgpack`) load as they are; PyTorch-only weights are converted on load:
  `model.safetensors` without torch (numpy + `models.torch_layout`, the rule the export writes with),
  `pytorch_model.bin` only where torch is installed (it is a pickle that only torch reads).
- `fresh_text_encoder(text_cfg, seed, captions)`: a small random CLIP text model and a byte-level
  BPE tokenizer made offline: the 256 byte symbols, their end-of-word ("</w>") variants, merges
  learned from `captions` (deterministic) and CLIP's two special tokens. `save_pretrained` writes
  both in the Stable Diffusion layout, so `load_text_encoder` reads them back like a real one.

Captions longer than `max_length` tokens (start and end tokens included) are truncated like CLIP
does (the first L - 1 tokens and the end token) and counted, or are an error (`text.on_too_long`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import tempfile
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from solidmark_jax import atomic, parallel
from solidmark_jax.models._transformers import (
    CLIPTextConfig,
    CLIPTokenizer,
    FlaxCLIPTextModel,
    bytes_to_unicode,
)
from solidmark_jax.models import torch_layout
from solidmark_jax.models.unet import DTYPES
from solidmark_jax.models.weights import pipeline_folder

ON_TOO_LONG = ("truncate", "error")
TEXT_ENCODER_DIR = "text_encoder"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("vocab.json", "merges.txt")
FLAX_WEIGHTS = "flax_model.msgpack"
SAFETENSORS_WEIGHTS = "model.safetensors"
TORCH_WEIGHTS = "pytorch_model.bin"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_MERGES = 49152 - 256 - 2  # CLIPTokenizer reads at most this many merges
DEFAULT_NUM_MERGES = 2000


@dataclasses.dataclass(frozen=True)
class TokenizeResult:
  """Token ids of a list of captions.

  Attributes:
    ids: int32 [N, L], start token, caption tokens, end token, then padding to L.
    num_tokens: int32 [N], tokens of each caption before truncation (start and end included).
    truncated: bool [N], the captions cut to L tokens.
  """

  ids: np.ndarray
  num_tokens: np.ndarray
  truncated: np.ndarray

  @property
  def num_truncated(self) -> int:
    return int(self.truncated.sum())


class TextEncoder:
  """A frozen CLIP text encoder and its tokenizer.

  Attributes:
    tokenizer: transformers' `CLIPTokenizer`.
    model: transformers' `FlaxCLIPTextModel` (holds the module and config, not the parameters).
    params: the frozen parameters (float32), a nested dict.
    max_length: L, the token sequence length, start and end tokens included.
    on_too_long: "truncate" (counted) or "error", for captions longer than L tokens.
    dtype: compute dtype of `encode`, "float32" or "bfloat16" (config `model.dtype`); parameters
      and embeddings stay float32.
    encode_jit: `encode`, jitted once for this encoder.
  """

  def __init__(self, tokenizer: CLIPTokenizer, model: FlaxCLIPTextModel, params, max_length: int,
               on_too_long: str = "truncate", dtype: str = "float32"):
    if dtype not in DTYPES:
      raise ValueError(f"model.dtype must be one of {tuple(DTYPES)} (the compute dtype), got {dtype!r}")
    self.dtype = dtype
    self._compute_dtype = DTYPES[dtype]
    if on_too_long not in ON_TOO_LONG:
      raise ValueError(f"text.on_too_long must be one of {ON_TOO_LONG}, got {on_too_long!r}")
    positions = int(model.config.max_position_embeddings)
    if not 2 <= max_length <= positions:
      raise ValueError(f"text.max_length={max_length} must lie in [2, {positions}] (the text encoder has "
                       f"{positions} position embeddings; start and end tokens are counted)")
    self.tokenizer = tokenizer
    self.model = model
    self.params = params
    self.max_length = int(max_length)
    self.on_too_long = on_too_long
    self._null_ids: np.ndarray | None = None
    self.encode_jit = jax.jit(self.encode)  # one compilation per encoder, shared by every caller

  @property
  def hidden_size(self) -> int:
    """D, the width of the embeddings (the UNet's cross_attention_dim)."""
    return int(self.model.config.hidden_size)

  @property
  def pad_id(self) -> int:
    pad = self.tokenizer.pad_token_id
    return int(self.tokenizer.eos_token_id if pad is None else pad)

  def tokenize(self, captions: Sequence[str], on_too_long: str | None = None) -> TokenizeResult:
    """Token ids of `captions`, padded to `max_length`.

    Args:
      captions: N non-empty strings.
      on_too_long: overrides `self.on_too_long`: "truncate" (counted in the result) or "error".

    Returns:
      A `TokenizeResult` with ids int32 [N, L].

    Raises:
      TypeError: `captions` is a str, or one caption is not a str (its index is named).
      ValueError: an empty caption, or (on_too_long="error") one longer than L tokens.
    """
    on_too_long = on_too_long or self.on_too_long
    if on_too_long not in ON_TOO_LONG:
      raise ValueError(f"text.on_too_long must be one of {ON_TOO_LONG}, got {on_too_long!r}")
    if isinstance(captions, (str, bytes)):
      raise TypeError("captions must be a sequence of str, got a single string")
    captions = list(captions)
    for i, c in enumerate(captions):
      if not isinstance(c, str):
        raise TypeError(f"caption {i} is a {type(c).__name__}, expected a str")
      if not c.strip():
        raise ValueError(f"caption {i} is empty (the null condition is `null_ids`, not an empty caption)")
    L = self.max_length
    ids = np.full((len(captions), L), self.pad_id, np.int32)  # [N, L]
    num_tokens = np.zeros(len(captions), np.int32)
    if not captions:
      return TokenizeResult(ids, num_tokens, np.zeros(0, bool))
    full = self.tokenizer(captions, add_special_tokens=True, padding=False, truncation=False)["input_ids"]
    eos = int(self.tokenizer.eos_token_id)
    for i, t in enumerate(full):
      num_tokens[i] = len(t)
      if len(t) > L:
        if on_too_long == "error":
          raise ValueError(f"caption {i} has {len(t)} tokens, more than text.max_length={L} "
                           f"(text.on_too_long='error'): {captions[i][:100]!r}")
        t = t[:L - 1] + [eos]  # CLIP's truncation: keep the start, end with the end token
      ids[i, :len(t)] = t
    return TokenizeResult(ids, num_tokens, num_tokens > L)

  @property
  def null_ids(self) -> np.ndarray:
    """int32 [L], the ids of the empty caption "" (the null condition of classifier-free guidance)."""
    if self._null_ids is None:
      t = self.tokenizer([""], add_special_tokens=True, truncation=False)["input_ids"][0]
      ids = np.full(self.max_length, self.pad_id, np.int32)
      ids[:len(t)] = t
      self._null_ids = ids
    return self._null_ids

  def encode(self, params: Any, ids: jax.Array) -> jax.Array:
    """Embeds token ids: [B, L] int32 -> last_hidden_state [B, L, D]. Pure and jittable.

    Like Stable Diffusion, no attention mask is passed (the causal mask alone; padding positions
    get embeddings too, and the UNet attends to them).
    """
    ids = jnp.asarray(ids, jnp.int32)  # [B, L]
    positions = jnp.broadcast_to(jnp.arange(ids.shape[-1], dtype=jnp.int32), ids.shape)
    module = self.model.module
    if self.dtype != "float32":
      module = module.clone(dtype=self._compute_dtype)
    out = module.apply({"params": params}, ids, jnp.ones_like(ids), positions, deterministic=True)
    return out.last_hidden_state.astype(jnp.float32)  # [B, L, D]

  def save_pretrained(self, root: str) -> None:
    """Writes `root/text_encoder/` and `root/tokenizer/` (Stable Diffusion's layout).

    text_encoder/ holds config.json (architecture `CLIPTextModel`), the Flax weights
    (flax_model.msgpack, transformers < 5) and the same weights in PyTorch's names and layout
    (model.safetensors, what transformers >= 5 reads), converted with numpy alone.
    """
    from safetensors.numpy import save_file  # lazy: safetensors is optional  # pylint: disable=g-import-not-at-top
    folder = os.path.join(root, TEXT_ENCODER_DIR)
    host = parallel.to_host(self.params)
    self.model.save_pretrained(folder, params=host)
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as f:
      cfg = json.load(f)
    cfg["architectures"] = ["CLIPTextModel"]
    atomic.write_json(path, cfg, indent=2, sort_keys=True, trailing_newline=False)
    save_file(torch_layout.to_pytorch(host), os.path.join(folder, SAFETENSORS_WEIGHTS), metadata={"format": "pt"})
    self.tokenizer.model_max_length = self.max_length
    self.tokenizer.save_pretrained(os.path.join(root, TOKENIZER_DIR))


# ----------------------------------------------------------------------------------------------
# Loading a pretrained encoder


def _folders(path: str) -> tuple[str, str]:
  """(text encoder folder, tokenizer folder) of an SD root or of one folder holding both."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"text encoder path {path} does not exist or is not a folder: expected a Stable "
                            f"Diffusion root with {TEXT_ENCODER_DIR}/ and {TOKENIZER_DIR}/")
  te, tok = pipeline_folder(path, TEXT_ENCODER_DIR, ()), pipeline_folder(path, TOKENIZER_DIR, ())  # else `path`
  if te == tok == path and all(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "vocab.json")):
    return path, path  # no subfolders: a CLIP text model and its tokenizer in one folder
  for folder, sub, what in ((te, TEXT_ENCODER_DIR,
                             f"config.json and weights ({FLAX_WEIGHTS}, {SAFETENSORS_WEIGHTS} or {TORCH_WEIGHTS})"),
                            (tok, TOKENIZER_DIR, " and ".join(TOKENIZER_FILES))):
    if folder == path:  # a root without that subfolder
      raise FileNotFoundError(f"{os.path.join(path, sub)} is missing: a text encoder root needs "
                              f"{TEXT_ENCODER_DIR}/ (with config.json and weights) and {TOKENIZER_DIR}/ (with "
                              f"{' and '.join(TOKENIZER_FILES)}); expected {what} there")
  return te, tok


def _load_tokenizer(folder: str) -> CLIPTokenizer:
  for f in TOKENIZER_FILES:
    if not os.path.isfile(os.path.join(folder, f)):
      raise FileNotFoundError(f"{os.path.join(folder, f)} is missing: a CLIP tokenizer folder needs "
                              f"{' and '.join(TOKENIZER_FILES)}")
  return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def _pt_to_flax(pt: Mapping[str, np.ndarray], model: FlaxCLIPTextModel, where: str) -> dict:
  """PyTorch state dict (numpy) -> Flax params (`torch_layout`); complete, shapes checked."""
  return torch_layout.from_pytorch(pt, dict(model.params_shape_tree), where, "text model")


def _check_params(params, model: FlaxCLIPTextModel, where: str) -> dict:
  """Every parameter of the config present with its shape; floats as float32."""
  shapes = traverse_util.flatten_dict(dict(model.params_shape_tree))
  flat = traverse_util.flatten_dict(dict(params))
  missing = sorted(".".join(k) for k in set(shapes) - set(flat))
  if missing:
    raise ValueError(f"{where}: {len(missing)} weight(s) of the text model are missing, e.g. {missing[:3]}")
  out = {}
  for k in shapes:
    v = flat[k]
    if tuple(v.shape) != tuple(shapes[k].shape):
      raise ValueError(f"{where}: weight {'.'.join(k)} has shape {tuple(v.shape)}, expected {tuple(shapes[k].shape)}")
    out[k] = jnp.asarray(v, jnp.float32 if jnp.issubdtype(v.dtype, jnp.floating) else v.dtype)
  return traverse_util.unflatten_dict(out)


def _load_model(folder: str) -> tuple[FlaxCLIPTextModel, dict]:
  config_path = os.path.join(folder, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{config_path} is missing: the text encoder folder needs the model's config.json")
  config = CLIPTextConfig.from_pretrained(folder, local_files_only=True)
  flax_path, st_path, pt_path = (os.path.join(folder, f) for f in (FLAX_WEIGHTS, SAFETENSORS_WEIGHTS, TORCH_WEIGHTS))
  if os.path.isfile(flax_path):
    model, params = FlaxCLIPTextModel.from_pretrained(folder, config=config, _do_init=False, local_files_only=True)
    return model, _check_params(params, model, flax_path)
  model = FlaxCLIPTextModel(config, _do_init=False)
  if os.path.isfile(st_path):
    from safetensors.numpy import load_file  # lazy: safetensors is optional  # pylint: disable=g-import-not-at-top
    pt, where = load_file(st_path), st_path
  elif os.path.isfile(pt_path):
    try:
      import torch  # lazy: PyTorch is heavy, only for .bin weights  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"{folder} has PyTorch weights only as {TORCH_WEIGHTS} (a pickle that only torch reads): "
                        f"install torch to convert them on load, or convert them once to {SAFETENSORS_WEIGHTS} "
                        f"(read without torch) or {FLAX_WEIGHTS}") from e
    state = torch.load(pt_path, map_location="cpu", weights_only=True)
    pt, where = {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}, pt_path
  else:
    raise FileNotFoundError(f"{folder} has no text encoder weights: expected {FLAX_WEIGHTS}, {SAFETENSORS_WEIGHTS} "
                            f"or {TORCH_WEIGHTS}")
  return model, _check_params(_pt_to_flax(pt, model, where), model, where)


def load_text_encoder(path: str, max_length: int | None = None, on_too_long: str = "truncate",
                      dtype: str = "float32") -> TextEncoder:
  """Loads a frozen text encoder and its tokenizer from local files (never the network).

  Args:
    path: a Stable Diffusion root with `text_encoder/` and `tokenizer/` (what `save_pretrained`
      writes), or one folder holding a CLIP text model's config.json and weights and its vocab.json
      and merges.txt.
    max_length: L; None: the model's `max_position_embeddings` (77 for CLIP).
    on_too_long: "truncate" or "error".
    dtype: compute dtype, "float32" or "bfloat16".

  Raises:
    FileNotFoundError: a missing folder or file, named with what was expected there.
  """
  path = os.path.expanduser(path)
  te, tok = _folders(path)
  tokenizer = _load_tokenizer(tok)
  model, params = _load_model(te)
  L = int(max_length or model.config.max_position_embeddings)
  tokenizer.model_max_length = L
  return TextEncoder(tokenizer, model, params, L, on_too_long, dtype)


# ----------------------------------------------------------------------------------------------
# A fresh encoder and an offline tokenizer


def learn_merges(word_counts: Mapping[tuple[str, ...], int], num_merges: int,
                 min_count: int = 2) -> list[tuple[str, str]]:
  """Byte-pair merges learned from words, deterministically.

  Each step merges the most frequent adjacent symbol pair (ties: the smallest pair), until
  `num_merges` merges or no pair occurs `min_count` times.

  Args:
    word_counts: word (a tuple of symbols) -> occurrences.
    num_merges: the most merges to learn.
    min_count: the fewest occurrences of a pair worth a merge.

  Returns:
    The merges, in order (rank 0 first).
  """
  words = [list(w) for w in word_counts]
  freq = [int(c) for c in word_counts.values()]
  pairs: collections.Counter = collections.Counter()
  where = collections.defaultdict(set)
  for i, w in enumerate(words):
    for p in zip(w, w[1:]):
      pairs[p] += freq[i]
      where[p].add(i)
  merges: list[tuple[str, str]] = []
  while len(merges) < num_merges and pairs:
    best, count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
    if count < min_count:
      break
    merges.append(best)
    a, b = best
    for i in sorted(where.pop(best, ())):
      w = words[i]
      for p in zip(w, w[1:]):
        pairs[p] -= freq[i]
        if pairs[p] <= 0:
          del pairs[p]
      merged, j = [], 0
      while j < len(w):
        if j < len(w) - 1 and w[j] == a and w[j + 1] == b:
          merged.append(a + b)
          j += 2
        else:
          merged.append(w[j])
          j += 1
      words[i] = merged
      for p in zip(merged, merged[1:]):
        pairs[p] += freq[i]
        where[p].add(i)
  return merges


def _write_tokenizer_files(folder: str, merges: Sequence[tuple[str, str]]) -> None:
  """vocab.json and merges.txt of a CLIP tokenizer: bytes, bytes + "</w>", merges, special tokens."""
  symbols = list(bytes_to_unicode().values())
  vocab: dict[str, int] = {}
  for tok in symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]:
    vocab.setdefault(tok, len(vocab))
  atomic.write_json(os.path.join(folder, "vocab.json"), vocab, ensure_ascii=False, trailing_newline=False)
  with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def _caption_words(tokenizer: CLIPTokenizer, captions: Sequence[str]) -> dict[tuple[str, ...], int]:
  """Words of `captions` as the BPE sees them, counted, through a tokenizer without merges."""
  special = set(tokenizer.all_special_tokens)
  counts: collections.Counter = collections.Counter()
  for c in captions:
    if not isinstance(c, str):
      continue
    word: list[str] = []
    for t in tokenizer.tokenize(c):
      if t in special:
        continue
      word.append(t)
      if t.endswith("</w>"):
        counts[tuple(word)] += 1
        word = []
  return dict(sorted(counts.items()))


def offline_tokenizer(captions: Sequence[str] | None = None, num_merges: int = DEFAULT_NUM_MERGES,
                      max_length: int = 77) -> CLIPTokenizer:
  """A CLIP tokenizer built without any download: byte symbols plus merges learned from `captions`.

  Merges are learned from every adjacent pair seen (most frequent first, up to `num_merges`), so
  a word of the captions becomes one token once enough merges are allowed. Deterministic: the same
  captions (in any order) give the same vocabulary.
  """
  if not 0 <= num_merges <= MAX_MERGES:
    raise ValueError(f"text.num_merges must lie in [0, {MAX_MERGES}], got {num_merges}")
  with tempfile.TemporaryDirectory(prefix="solidmark_tokenizer.") as tmp:
    _write_tokenizer_files(tmp, [])
    base = CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"),
                         model_max_length=max_length)
    if not captions or not num_merges:
      return base
    _write_tokenizer_files(tmp, learn_merges(_caption_words(base, captions), num_merges, min_count=1))
    return CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"),
                         model_max_length=max_length)


def init_params(model: FlaxCLIPTextModel, seed: int) -> dict:
  """Random parameters drawn with numpy, like Flax CLIP's own initialisers (no XLA compilation).

  Kernels and embeddings ~ N(0, 0.01^2), LayerNorm scales 1, biases 0; leaves drawn in sorted key
  order from one generator seeded by `seed`, so the result is the same on any backend.
  """
  rng = np.random.default_rng([int(seed), 0x7E47])
  flat = {}
  for key, leaf in sorted(traverse_util.flatten_dict(dict(model.params_shape_tree)).items()):
    if key[-1] in ("kernel", "embedding"):
      flat[key] = (0.01 * rng.standard_normal(leaf.shape)).astype(np.float32)
    elif key[-1] == "scale":
      flat[key] = np.ones(leaf.shape, np.float32)
    elif key[-1] == "bias":
      flat[key] = np.zeros(leaf.shape, np.float32)
    else:
      raise ValueError(f"no initialiser for text model parameter {'.'.join(key)}")
  return traverse_util.unflatten_dict(flat)


def fresh_text_encoder(text_cfg: ml_collections.ConfigDict, seed: int, captions: Sequence[str] | None = None,
                       dtype: str = "float32") -> TextEncoder:
  """A small random CLIP text encoder (section `text` of the config) with an offline tokenizer.

  Args:
    text_cfg: `hidden_size`, `num_layers`, `num_heads`, `intermediate_size`, `max_length`,
      `on_too_long`, and optionally `num_merges` (default 2000).
    seed: initialises the parameters.
    captions: the training captions the tokenizer's merges are learned from (None: bytes only,
      about one token per character).
    dtype: compute dtype, "float32" or "bfloat16".
  """
  hidden, heads = int(text_cfg.hidden_size), int(text_cfg.num_heads)
  if hidden % heads:
    raise ValueError(f"text.hidden_size={hidden} must be a multiple of text.num_heads={heads}")
  L = int(text_cfg.max_length)
  if L < 2:
    raise ValueError(f"text.max_length={L} must be at least 2 (start and end tokens)")
  tokenizer = offline_tokenizer(captions, int(text_cfg.get("num_merges", DEFAULT_NUM_MERGES)), L)
  config = CLIPTextConfig(
      vocab_size=len(tokenizer.get_vocab()), hidden_size=hidden, intermediate_size=int(text_cfg.intermediate_size),
      num_hidden_layers=int(text_cfg.num_layers), num_attention_heads=heads, max_position_embeddings=L,
      projection_dim=hidden, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id)
  model = FlaxCLIPTextModel(config, _do_init=False)
  params = init_params(model, seed)
  return TextEncoder(tokenizer, model, _check_params(params, model, "fresh text model"), L,
                     text_cfg.get("on_too_long", "truncate"), dtype)


def build_text_encoder(text_cfg: ml_collections.ConfigDict, seed: int, captions: Sequence[str] | None = None,
                       dtype: str = "float32") -> TextEncoder:
  """`text.pretrained` set: loads it (with `text.max_length`); else a fresh one (`fresh_text_encoder`).

  `dtype` is the compute dtype (the config's `model.dtype`).
  """
  if text_cfg.get("pretrained"):
    return load_text_encoder(text_cfg.pretrained, text_cfg.get("max_length"), text_cfg.get("on_too_long", "truncate"),
                             dtype)
  return fresh_text_encoder(text_cfg, seed, captions, dtype)
