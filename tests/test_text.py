"""Tests for solidmark_jax.models.text: offline tokenizer, tokenize/encode, save/load, PyTorch weights."""

import os
import random
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from solidmark_jax.models import text
from solidmark_jax.models._transformers import CLIPTokenizer, FlaxCLIPTextModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = [
    "a photo of a dark trouser, item no. 01234",
    "a bright sneaker on a white background, item no. 44110",
    "ankle boot in light grey, item no. 99",
    "a small dark bag, item no. 31337",
    "a photo of a pullover, item no. 27182",
]


def text_cfg(**kw) -> ml_collections.ConfigDict:
  base = dict(pretrained=None, max_length=24, on_too_long="truncate", hidden_size=32, num_layers=1, num_heads=2,
              intermediate_size=37, num_merges=200)
  base.update(kw)
  return ml_collections.ConfigDict(base)


@pytest.fixture(scope="module")
def enc() -> text.TextEncoder:
  return text.fresh_text_encoder(text_cfg(), seed=0, captions=CAPTIONS)


@pytest.fixture(scope="module")
def encode(enc):
  """enc.encode, jitted once for the module (every encoder here has the same architecture)."""
  return jax.jit(enc.encode)


@pytest.fixture(scope="module")
def saved(enc, tmp_path_factory) -> str:
  root = str(tmp_path_factory.mktemp("sd_root"))
  enc.save_pretrained(root)
  return root


# ----------------------------------------------------------------------------------------------
# Offline tokenizer


def test_learn_merges_known_answer():
  words = {("l", "o", "w</w>"): 5, ("l", "o", "w", "e", "r</w>"): 2, ("n", "e", "w</w>"): 3, ("x</w>",): 9}
  # pair counts: (l,o) 7, (o,w</w>) 5, (e,w</w>) 3, (n,e) 3, (o,w) 2, (w,e) 2, (e,r</w>) 2
  merges = text.learn_merges(words, num_merges=10)
  assert merges[:3] == [("l", "o"), ("lo", "w</w>"), ("e", "w</w>")]  # ties (e,w</w>)/(n,e): smallest first
  assert merges[3] == ("n", "ew</w>")
  # then all pairs of "lower" occur twice: (e,r</w>) < (lo,w) < (w,e); min_count=3 stops at once
  assert merges[4:] == [("e", "r</w>"), ("lo", "w"), ("low", "er</w>")]
  assert text.learn_merges(words, num_merges=10, min_count=3) == merges[:4]
  assert text.learn_merges(words, num_merges=2) == merges[:2]


def test_offline_tokenizer_is_deterministic_and_learns_merges():
  shuffled = CAPTIONS[::-1] * 2
  random.Random(0).shuffle(shuffled)
  a = text.offline_tokenizer(CAPTIONS * 2, num_merges=200)
  b = text.offline_tokenizer(shuffled, num_merges=200)
  assert a.get_vocab() == b.get_vocab()
  plain = text.offline_tokenizer(None)
  assert len(plain.get_vocab()) == 256 * 2 + 2  # bytes, bytes + "</w>", start, end
  assert len(a.get_vocab()) > len(plain.get_vocab())
  for c in CAPTIONS:
    ids, ids_plain = a(c)["input_ids"], plain(c)["input_ids"]
    assert len(ids) < len(ids_plain)  # merges shorten the sequences
    # the same text back (CLIP decodes every word followed by a space: "no . 0 1")
    assert a.decode(ids, skip_special_tokens=True) == plain.decode(ids_plain, skip_special_tokens=True)
    assert a.decode(ids, skip_special_tokens=True).replace(" ", "") == c.replace(" ", "")
  # any text is covered, even characters never seen: the byte symbols are all there
  odd = "Zürich ☃ 漢字"
  assert a.unk_token_id not in a(odd)["input_ids"][1:-1]
  assert a.decode(a(odd)["input_ids"], skip_special_tokens=True).replace(" ", "") == "zürich☃漢字"


# ----------------------------------------------------------------------------------------------
# tokenize / encode


def test_tokenize_pads_and_marks(enc):
  r = enc.tokenize(CAPTIONS)
  L = enc.max_length
  assert r.ids.shape == (len(CAPTIONS), L) and r.ids.dtype == np.int32
  assert (r.ids[:, 0] == enc.tokenizer.bos_token_id).all()
  for row, n in zip(r.ids, r.num_tokens):
    assert 2 < n <= L
    assert row[n - 1] == enc.tokenizer.eos_token_id
    assert (row[n:] == enc.pad_id).all()
  assert r.num_truncated == 0 and not r.truncated.any()
  assert len({row.tobytes() for row in r.ids}) == len(CAPTIONS)
  null = enc.null_ids
  assert null.shape == (L,) and null.dtype == np.int32
  assert null[0] == enc.tokenizer.bos_token_id and null[1] == enc.tokenizer.eos_token_id


def test_tokenize_too_long_truncates_and_counts_or_errors(enc):
  long = "a very long caption with many many words in it " * 3
  r = enc.tokenize([CAPTIONS[0], long, CAPTIONS[1], long + "x"])
  assert r.truncated.tolist() == [False, True, False, True] and r.num_truncated == 2
  assert r.num_tokens[1] > enc.max_length
  hf = enc.tokenizer([long], max_length=enc.max_length, truncation=True, padding="max_length")["input_ids"][0]
  np.testing.assert_array_equal(r.ids[1], hf)  # the same cut as transformers' own truncation
  assert r.ids[1, -1] == enc.tokenizer.eos_token_id
  with pytest.raises(ValueError, match=r"caption 1 has \d+ tokens, more than text.max_length=24"):
    enc.tokenize([CAPTIONS[0], long], on_too_long="error")
  strict = text.fresh_text_encoder(text_cfg(on_too_long="error"), seed=0, captions=CAPTIONS)
  assert strict.tokenize(CAPTIONS).num_truncated == 0
  with pytest.raises(ValueError, match="caption 0 has"):
    strict.tokenize([long])
  with pytest.raises(ValueError, match="on_too_long must be one of"):
    enc.tokenize(CAPTIONS, on_too_long="drop")


def test_tokenize_bad_captions(enc):
  with pytest.raises(TypeError, match="caption 1 is a bytes, expected a str"):
    enc.tokenize(["ok", b"bytes"])
  with pytest.raises(TypeError, match="caption 2 is a NoneType"):
    enc.tokenize(["ok", "ok", None])
  with pytest.raises(ValueError, match="caption 1 is empty"):
    enc.tokenize(["ok", "  \n"])
  with pytest.raises(TypeError, match="a single string"):
    enc.tokenize("a caption")
  assert enc.tokenize([]).ids.shape == (0, enc.max_length)


def test_encode_shapes_and_jit(enc, encode):
  ids = np.concatenate([enc.tokenize(CAPTIONS[:4]).ids, enc.null_ids[None]])  # [5, L]
  emb = encode(enc.params, ids)
  assert emb.shape == (5, enc.max_length, 32) and emb.dtype == np.float32 and enc.hidden_size == 32
  # the same as transformers' own call of the model
  ref = jax.jit(lambda p, i: enc.model(i, params=p)[0])(enc.params, ids)
  np.testing.assert_allclose(np.asarray(ref), np.asarray(emb), atol=1e-5)
  assert float(np.abs(emb[0] - emb[1]).max()) > 1e-3  # different captions, different embeddings
  assert float(np.abs(emb[0] - emb[4]).max()) > 1e-3  # a caption is not the null condition


def test_fresh_is_deterministic_and_validated():
  a = text.fresh_text_encoder(text_cfg(), seed=3, captions=CAPTIONS)
  b = text.fresh_text_encoder(text_cfg(), seed=3, captions=CAPTIONS)
  c = text.fresh_text_encoder(text_cfg(), seed=4, captions=CAPTIONS)
  leaves = lambda e: jax.tree_util.tree_leaves(e.params)
  assert all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b)))
  assert not all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(c)))
  with pytest.raises(ValueError, match="text.hidden_size=30 must be a multiple of text.num_heads=4"):
    text.fresh_text_encoder(text_cfg(hidden_size=30, num_heads=4), seed=0)
  with pytest.raises(ValueError, match="text.on_too_long must be one of"):
    text.fresh_text_encoder(text_cfg(on_too_long="cut"), seed=0)


# ----------------------------------------------------------------------------------------------
# save_pretrained / load_text_encoder


def test_save_load_round_trip(enc, saved, encode):
  assert sorted(os.listdir(saved)) == ["text_encoder", "tokenizer"]
  assert {"config.json", "flax_model.msgpack"} <= set(os.listdir(os.path.join(saved, "text_encoder")))
  assert {"vocab.json", "merges.txt"} <= set(os.listdir(os.path.join(saved, "tokenizer")))
  back = text.load_text_encoder(saved)
  assert back.max_length == enc.max_length and back.hidden_size == enc.hidden_size
  assert back.tokenizer.get_vocab() == enc.tokenizer.get_vocab()
  r, r2 = enc.tokenize(CAPTIONS), back.tokenize(CAPTIONS)
  np.testing.assert_array_equal(r.ids, r2.ids)
  np.testing.assert_array_equal(enc.null_ids, back.null_ids)
  leaves = lambda e: traverse_util.flatten_dict(e.params)
  assert leaves(back).keys() == leaves(enc).keys()
  for k, v in leaves(enc).items():
    np.testing.assert_array_equal(np.asarray(leaves(back)[k]), np.asarray(v))
  np.testing.assert_array_equal(np.asarray(encode(enc.params, r.ids)), np.asarray(encode(back.params, r2.ids)))
  # build_text_encoder with text.pretrained loads it; a shorter max_length is honoured
  short = text.build_text_encoder(text_cfg(pretrained=saved, max_length=8), seed=123)
  assert short.max_length == 8 and short.tokenize(CAPTIONS).ids.shape == (len(CAPTIONS), 8)
  with pytest.raises(ValueError, match=r"text.max_length=40 must lie in \[2, 24\]"):
    text.load_text_encoder(saved, max_length=40)


def test_transformers_from_pretrained_reads_our_folders(enc, saved, encode):
  tok = CLIPTokenizer.from_pretrained(os.path.join(saved, "tokenizer"), local_files_only=True)
  model, params = FlaxCLIPTextModel.from_pretrained(os.path.join(saved, "text_encoder"), local_files_only=True,
                                                    _do_init=False)  # no random init first: fast
  ids = tok(CAPTIONS, padding="max_length", max_length=enc.max_length, truncation=True,
            return_tensors="np")["input_ids"]
  np.testing.assert_array_equal(ids, enc.tokenize(CAPTIONS).ids)
  got = jax.jit(lambda p, i: model(i, params=p)[0])(params, ids)
  np.testing.assert_allclose(np.asarray(got), np.asarray(encode(enc.params, ids)), atol=1e-6)


def test_missing_folders_and_files(saved, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    text.load_text_encoder(str(tmp_path / "nope"))
  for missing, what in (("tokenizer", "vocab.json and merges.txt"), ("text_encoder", "config.json and weights")):
    root = tmp_path / f"no_{missing}"
    shutil.copytree(saved, root)
    shutil.rmtree(root / missing)
    with pytest.raises(FileNotFoundError, match=f"{root / missing} is missing.*expected {what}"):
      text.load_text_encoder(str(root))
  root = tmp_path / "no_vocab"
  shutil.copytree(saved, root)
  os.remove(root / "tokenizer" / "vocab.json")
  with pytest.raises(FileNotFoundError, match=f"{root / 'tokenizer' / 'vocab.json'} is missing"):
    text.load_text_encoder(str(root))
  root = tmp_path / "no_weights"
  shutil.copytree(saved, root)
  for weights in ("flax_model.msgpack", "model.safetensors"):  # save_pretrained writes both
    os.remove(root / "text_encoder" / weights)
  with pytest.raises(FileNotFoundError, match="has no text encoder weights: expected flax_model.msgpack"):
    text.load_text_encoder(str(root))
  root = tmp_path / "no_config"
  shutil.copytree(saved, root)
  os.remove(root / "text_encoder" / "config.json")
  with pytest.raises(FileNotFoundError, match=f"{root / 'text_encoder' / 'config.json'} is missing"):
    text.load_text_encoder(str(root))


def _to_pytorch_names(params) -> dict[str, np.ndarray]:
  """Flax CLIP params -> the state dict PyTorch's CLIPTextModel saves (names, [out, in] weights)."""
  out = {}
  for key, v in traverse_util.flatten_dict(params).items():
    v = np.asarray(v)
    last = {"kernel": "weight", "embedding": "weight", "scale": "weight"}.get(key[-1], key[-1])
    out[".".join(key[:-1] + (last,))] = v.T.copy() if key[-1] == "kernel" else v
  return out


@pytest.mark.slow
def test_pytorch_safetensors_converted_without_torch(enc, saved, encode, tmp_path):
  from safetensors.numpy import save_file
  root = tmp_path / "pt_root"
  shutil.copytree(saved, root)
  te = root / "text_encoder"
  os.remove(te / "flax_model.msgpack")
  state = _to_pytorch_names(enc.params)
  state["text_model.embeddings.position_ids"] = np.arange(enc.max_length, dtype=np.int64)[None]  # a PT buffer
  save_file(state, str(te / "model.safetensors"), metadata={"format": "pt"})
  ids = enc.tokenize(CAPTIONS).ids
  np.save(tmp_path / "ids.npy", ids)
  np.save(tmp_path / "want.npy", np.asarray(encode(enc.params, ids)))
  script = f"""
import sys
sys.modules["torch"] = None  # any `import torch` fails, as on an install without it
sys.path.insert(0, {ROOT!r})
import jax
import numpy as np
from solidmark_jax.models import text
enc = text.load_text_encoder({str(root)!r})
got = np.asarray(jax.jit(enc.encode)(enc.params, np.load({str(tmp_path / 'ids.npy')!r})))
np.testing.assert_allclose(got, np.load({str(tmp_path / 'want.npy')!r}), atol=1e-6)
assert sys.modules["torch"] is None
print("OK")
"""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
  assert p.returncode == 0 and "OK" in p.stdout, p.stderr[-3000:]
  # a wrongly shaped weight names the file and the weight
  state["text_model.final_layer_norm.weight"] = np.ones(5, np.float32)
  save_file(state, str(te / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(ValueError,
                     match=r"model.safetensors: weight text_model.final_layer_norm.weight has shape \(5,\)"):
    text.load_text_encoder(str(root))
  del state["text_model.final_layer_norm.weight"]
  save_file(state, str(te / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"model.safetensors: 1 weight\(s\) of the text model are missing"):
    text.load_text_encoder(str(root))


def test_torch_bin_only_needs_torch_or_says_so(saved, tmp_path, monkeypatch):
  root = tmp_path / "bin_root"
  shutil.copytree(saved, root)
  for weights in ("flax_model.msgpack", "model.safetensors"):  # save_pretrained writes both
    os.remove(root / "text_encoder" / weights)
  (root / "text_encoder" / "pytorch_model.bin").write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match="PyTorch weights only as pytorch_model.bin.*install torch.*model.safetensors"):
    text.load_text_encoder(str(root))
