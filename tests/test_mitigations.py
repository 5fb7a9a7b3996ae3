import collections
import types
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from solidmark_jax.evaluation import mitigations as mit
from solidmark_jax.evaluation.mitigations import Mitigation, TokenSpec

CAPTIONS = ["a red dog sitting on green grass", "portrait of an old man with a hat", "blue sky", "one"]
TOKENS = TokenSpec(vocab_size=50, bos_id=1, eos_id=2, pad_id=0, special_ids=(3,))
L = 16


def _tokenize(captions, tokens=TOKENS, length=L):
  """A fake tokenizer: one id per word (crc32 into the non-special range), start/end/padding."""
  rows = np.full((len(captions), length), tokens.pad_id, np.int32)
  for n, c in enumerate(captions):
    words = [4 + zlib.crc32(w.encode()) % (tokens.vocab_size - 4) for w in c.split()][:length - 2]
    rows[n, :len(words) + 2] = [tokens.bos_id, *words, tokens.eos_id]
  return rows


def _encode(token_ids, dim=8):
  """A fake text encoder: a fixed random table, [N, L] -> [N, L, D]."""
  table = np.random.default_rng(0).normal(size=(TOKENS.vocab_size, dim)).astype(np.float32)
  return jnp.asarray(table)[jnp.asarray(token_ids)]


def _conditioning(spec, captions, ids):
  """What a text model is conditioned on, through all three stages."""
  captions = mit.mitigate_captions(spec, captions, ids, vocabulary=["cat", "house", "tree", "music"])
  token_ids = mit.mitigate_tokens(spec, _tokenize(captions), ids, TOKENS)
  return np.asarray(mit.mitigate_embeddings(spec, _encode(token_ids), ids))


# ---------------------------------------------------------------------------------------------
# Spec, config and stages.


def test_from_config_parses_and_names_fields_in_errors():
  c = ConfigDict({"name": "cwr", "strength": 3, "seed": 5})
  assert Mitigation.from_config(c) == Mitigation("cwr", 3, 5)
  assert Mitigation.from_config(None) == Mitigation()
  assert Mitigation.from_config({"name": "gni", "strength": 0.1}).sigma == pytest.approx(0.1)
  assert Mitigation.from_config({"name": "rt", "strength": 2.0}).iterations == 2
  assert Mitigation.from_config({"name": "rt", "strength": 1}).probability == mit.RT_PROBABILITY == 0.1
  assert Mitigation.from_config({"name": "rt", "strength": 1, "probability": 0.5}) == Mitigation("rt", 1, 0, 0.5)
  assert Mitigation.from_config({"name": "gni", "strength": 0.1, "probability": None}).probability == 0.1
  assert Mitigation("rt", 2, 1, 0.3).as_record() == {"name": "rt", "strength": 2, "seed": 1, "probability": 0.3}
  assert Mitigation("gni", 0.1).as_record() == {"name": "gni", "strength": 0.1, "seed": 0}  # as before RT had one
  bad = [({"name": "gaussian"}, r"eval\.mitigation\.name must be one of .*'gaussian'"),
         ({"name": "gni", "strength": -0.1}, r"eval\.mitigation\.strength must be >= 0"),
         ({"name": "cwr", "strength": 1.5}, r"eval\.mitigation\.strength is the number of cwr iterations"),
         ({"name": "none", "strength": 2}, r"eval\.mitigation\.strength must be 0 for name 'none'"),
         ({"name": "rna", "strength": float("nan")}, r"eval\.mitigation\.strength must be a finite number"),
         ({"name": "rna", "strength": 1, "seed": -1}, r"eval\.mitigation\.seed must be an integer >= 0"),
         ({"name": "rna", "strenght": 1}, r"eval\.mitigation: unknown fields \['strenght'\]"),
         ({"name": "rt", "strength": 1, "probability": 1.5}, r"eval\.mitigation\.probability must be a number in "
                                                             r"\[0, 1\] \(RT's per-token replacement probability\)"),
         ({"name": "rt", "strength": 1, "probability": "high"}, r"eval\.mitigation\.probability must be a number"),
         ({"name": "cwr", "strength": 1, "probability": 0.3}, r"eval\.mitigation\.probability=0\.3 is only used by "
                                                              r"name 'rt', not 'cwr'; set it to 0\.1")]
  for section, message in bad:
    with pytest.raises(ValueError, match=message):
      Mitigation.from_config(ConfigDict(section))
  with pytest.raises(ValueError, match=r"mitigation\.name must be one of"):
    Mitigation("RNA", 1)


def test_stages_and_condition_kinds():
  assert [mit.stage(n) for n in mit.MITIGATIONS] == [None, "embedding", "tokens", "caption", "caption", "caption"]
  with pytest.raises(ValueError, match="mitigation name must be one of"):
    mit.stage("rc")
  for cond in ("class", "image", "text"):
    mit.check_condition(Mitigation("gni", 0.1), cond)
  for cond in mit.CONDITION_KINDS:
    mit.check_condition(Mitigation(), cond)
  for name in ("rt", "cwr", "rna", "random_words"):
    mit.check_condition(Mitigation(name, 1), "text")
    with pytest.raises(ValueError, match=rf"eval\.mitigation\.name='{name}' cannot apply to model\.condition='class'"
                                         r".*use 'gni' instead"):
      mit.check_condition(Mitigation(name, 1), "class")
  with pytest.raises(ValueError, match="an unconditional model has no condition to perturb"):
    mit.check_condition(Mitigation("gni", 0.1), "none")
  with pytest.raises(ValueError, match="model.condition must be one of"):
    mit.check_condition(Mitigation(), "caption")


# ---------------------------------------------------------------------------------------------
# Every mitigation changes what the model is conditioned on (the public code's GNI was a no-op).


@pytest.mark.parametrize("spec", [Mitigation("gni", 0.1), Mitigation("rt", 1), Mitigation("cwr", 1),
                                  Mitigation("rna", 1), Mitigation("random_words", 1)], ids=lambda s: s.name)
def test_each_mitigation_changes_the_conditioning(spec):
  ids = np.arange(len(CAPTIONS)) + 100
  plain = _conditioning(Mitigation(), CAPTIONS, ids)
  mitigated = _conditioning(spec, CAPTIONS, ids)
  assert mitigated.shape == plain.shape
  for n in range(len(CAPTIONS)):
    assert not np.allclose(mitigated[n], plain[n]), f"{spec.name} left row {n}'s conditioning unchanged"
  np.testing.assert_array_equal(_conditioning(spec, CAPTIONS, ids), mitigated)  # reproducible
  np.testing.assert_array_equal(_conditioning(Mitigation(spec.name, 0), CAPTIONS, ids), plain)  # strength 0


# ---------------------------------------------------------------------------------------------
# GNI.


def test_gni_std_matches_sigma_and_scales_with_it():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(32, 4, 128)).astype(np.float32))  # [N, L, D]
  ids = np.arange(32)
  for sigma in (0.1, 0.5, 2.0):
    d = np.asarray(mit.mitigate_embeddings(Mitigation("gni", sigma), x, ids) - x)
    assert abs(d.std() / sigma - 1) < 0.03, (sigma, d.std())
    assert abs(d.mean()) < 0.03 * sigma
  # the same eps for the same (seed, id): the perturbation grows linearly with sigma
  d1 = np.asarray(mit.mitigate_embeddings(Mitigation("gni", 0.1, 3), x, ids) - x)
  d2 = np.asarray(mit.mitigate_embeddings(Mitigation("gni", 0.3, 3), x, ids) - x)
  np.testing.assert_allclose(d2, 3 * d1, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(mit.mitigate_embeddings(Mitigation("gni", 0.0), x, ids), x)
  np.testing.assert_array_equal(mit.mitigate_embeddings(Mitigation("cwr", 2), x, ids), x)


def test_gni_per_instance_reproducible_and_jittable():
  x = jnp.zeros((3, 6), jnp.float32)  # [N, D] class embeddings
  spec = Mitigation("gni", 1.0, seed=7)
  a = np.asarray(mit.mitigate_embeddings(spec, x, [5, 6, 7]))
  b = np.asarray(mit.mitigate_embeddings(spec, x, [9, 5, 1]))
  np.testing.assert_array_equal(a[0], b[1])  # instance 5: same noise whatever its batch
  assert not np.allclose(a[0], a[1])  # different instances differ
  c = np.asarray(mit.mitigate_embeddings(Mitigation("gni", 1.0, seed=8), x, [5, 6, 7]))
  assert not np.allclose(a, c)  # the seed matters
  jitted = jax.jit(mit.gaussian_noise)(x, jnp.float32(1.0), mit.embedding_key(7), jnp.asarray([5, 6, 7]))
  np.testing.assert_allclose(np.asarray(jitted), a, rtol=1e-6)


def test_gni_on_a_class_model_perturbs_the_table_rows():
  table = jnp.asarray(np.random.default_rng(2).normal(size=(11, 16)).astype(np.float32))  # 10 classes + null
  params = {"condition_embedding": {"embedding": table}, "unet": {}}
  conds = jnp.asarray([3, 3, 10])
  rows = mit.condition_embeddings(mit.condition_table(params), conds)  # [N, D]
  np.testing.assert_array_equal(rows, np.asarray(table)[[3, 3, 10]])
  noisy = np.asarray(mit.mitigate_embeddings(Mitigation("gni", 0.2), rows, [0, 1, 2]))
  assert noisy.shape == (3, 16) and not np.allclose(noisy[0], noisy[1])  # same class, different instances
  with pytest.raises(ValueError, match="condition ids must lie in"):
    mit.condition_embeddings(table, jnp.asarray([11]))
  with pytest.raises(ValueError, match="no condition_embedding/embedding table"):
    mit.condition_table({"unet": {}})
  with pytest.raises(ValueError, match=r"embeddings must be floats \[N, D\] or \[N, L, D\]"):
    mit.mitigate_embeddings(Mitigation("gni", 0.1), jnp.asarray([1, 2]), [0, 1])
  with pytest.raises(ValueError, match=r"instance_ids must be \[N\] = \[3\]"):
    mit.mitigate_embeddings(Mitigation("gni", 0.1), rows, [0, 1])


# ---------------------------------------------------------------------------------------------
# Caption strings.


def test_cwr_inserts_only_caption_words():
  for iterations in (1, 3, 10):
    out = mit.mitigate_captions(Mitigation("cwr", iterations, 1), CAPTIONS, np.arange(4))
    for before, after in zip(CAPTIONS, out):
      added = collections.Counter(after.split()) - collections.Counter(before.split())
      assert sum(added.values()) == iterations
      assert set(added) <= set(before.split())
      it = iter(after.split())  # the original words stay, in order
      assert all(w in it for w in before.split())
  assert mit.mitigate_captions(Mitigation("cwr", 3), ["", "  "], [0, 1]) == ["", "  "]  # no word to repeat


def test_rna_inserts_numbers_below_a_million():
  captions = ["a photo of a cat"] * 50
  out = mit.mitigate_captions(Mitigation("rna", 4, 2), captions, np.arange(50))
  numbers = []
  for after in out:
    added = collections.Counter(after.split()) - collections.Counter(captions[0].split())
    assert sum(added.values()) == 4
    for word, count in added.items():
      assert word.isdigit() and 0 <= int(word) < mit.RNA_MAX
      numbers += [int(word)] * count
  assert max(numbers) >= 10**5  # drawn over the whole range, not a small one
  assert len(set(out)) == 50  # differs between ids


def test_random_words_from_the_vocabulary():
  vocab = ["zebra", "quartz", "violin"]
  out = mit.mitigate_captions(Mitigation("random_words", 2), CAPTIONS, np.arange(4), vocab)
  for before, after in zip(CAPTIONS, out):
    added = collections.Counter(after.split()) - collections.Counter(before.split())
    assert sum(added.values()) == 2 and set(added) <= set(vocab)
  with pytest.raises(ValueError, match="'random_words' needs a vocabulary"):
    mit.mitigate_captions(Mitigation("random_words", 2), CAPTIONS, np.arange(4))
  fake = types.SimpleNamespace(get_vocab=lambda: {"cat</w>": 5, "do": 6, "12</w>": 7, "<|endoftext|>": 8,
                                                  "apple</w>": 9})
  assert mit.vocabulary_from_tokenizer(fake) == ["apple", "cat"]


def test_caption_mitigations_are_per_instance_and_grow_with_strength():
  for name in ("cwr", "rna", "random_words"):
    vocab = ["zebra", "quartz"]
    a = mit.mitigate_captions(Mitigation(name, 2, 4), CAPTIONS[:2], [10, 11], vocab)
    b = mit.mitigate_captions(Mitigation(name, 2, 4), [CAPTIONS[1], CAPTIONS[0]], [11, 10], vocab)
    assert a == b[::-1]  # (seed, id) decides, not the batch
    same = mit.mitigate_captions(Mitigation(name, 2, 4), [CAPTIONS[0]] * 2, [10, 12], vocab)
    assert same[0] != same[1]  # different ids differ
    assert mit.mitigate_captions(Mitigation(name, 2, 5), CAPTIONS[:2], [10, 11], vocab) != a  # the seed matters
    lengths = [len(mit.mitigate_captions(Mitigation(name, s), CAPTIONS[:1], [0], vocab)[0].split())
               for s in (0, 1, 2, 5)]
    assert lengths == [7, 8, 9, 12]
    assert mit.mitigate_captions(Mitigation(name, 0), CAPTIONS, np.arange(4), vocab) == CAPTIONS
  with pytest.raises(ValueError, match=r"captions\[1\] must be a string"):
    mit.mitigate_captions(Mitigation("cwr", 1), ["a", 3], [0, 1])


# ---------------------------------------------------------------------------------------------
# Token ids (RT).


def _check_structure(row, tokens, content_len):
  assert row[0] == tokens.bos_id
  assert row[content_len + 1] == tokens.eos_id
  content = row[1:content_len + 1]
  assert not np.isin(content, [tokens.bos_id, tokens.eos_id, tokens.pad_id, *tokens.special_ids]).any()
  assert np.all(row[content_len + 2:] == tokens.pad_id)


@pytest.mark.parametrize("pad_id", [0, 2], ids=["pad", "pad_is_eos"])
def test_rt_keeps_start_end_padding_and_length(pad_id):
  tokens = TokenSpec(50, 1, 2, pad_id, (3,))
  captions = CAPTIONS + ["w " * 14, ""]  # a full row (14 words + start + end = 16) and an empty one
  ids = _tokenize(captions, tokens)
  n_words = [min(len(c.split()), L - 2) for c in captions]
  for iterations in (1, 3, 20):
    out = mit.mitigate_tokens(Mitigation("rt", iterations), ids, np.arange(len(captions)), tokens)
    assert out.shape == ids.shape and out.dtype == ids.dtype
    for n, row in enumerate(out):
      _check_structure(row, tokens, min(n_words[n] + iterations, L - 2))
  assert np.array_equal(mit.mitigate_tokens(Mitigation("rt", 0), ids, np.arange(6), tokens), ids)
  assert np.array_equal(mit.mitigate_tokens(Mitigation("cwr", 2), ids, np.arange(6), tokens), ids)


def test_rt_changes_grow_with_strength_and_are_per_instance():
  ids = _tokenize(["a b c d e f g"] * 40)
  diffs = []
  for iterations in (1, 2, 4):
    out = mit.mitigate_tokens(Mitigation("rt", iterations, 3), ids, np.arange(40), TOKENS)
    diffs.append(np.mean(np.sum(out != ids, axis=1)))
    assert np.all(np.sum(out != ids, axis=1) >= 1)
  assert diffs[0] < diffs[1] < diffs[2], diffs
  a = mit.mitigate_tokens(Mitigation("rt", 2, 3), ids[:2], [7, 8], TOKENS)
  b = mit.mitigate_tokens(Mitigation("rt", 2, 3), ids[:2], [8, 7], TOKENS)
  np.testing.assert_array_equal(a, b[::-1])
  assert not np.array_equal(a[0], a[1])


def test_rt_replaces_each_token_with_the_set_probability_and_inserts_one_per_iteration():
  """Captions of 30 copies of one token X: after RT the X's left are the tokens never replaced, the
  row grows by one token per iteration. 400 rows, a large vocabulary (a random draw is X with p 2e-5)."""
  tokens = TokenSpec(vocab_size=50_000, bos_id=1, eos_id=2, pad_id=0)
  x_id, n_words, n_rows, length = 7, 30, 400, 64
  rows = np.zeros((n_rows, length), np.int32)
  rows[:, 0], rows[:, 1:n_words + 1], rows[:, n_words + 1] = 1, x_id, 2
  for p in (0.0, 0.1, 0.3, 1.0):
    for iterations in (1, 3):
      out = mit.mitigate_tokens(Mitigation("rt", iterations, seed=4, probability=p), rows, np.arange(n_rows),
                                tokens)
      for row in out:
        _check_structure(row, tokens, n_words + iterations)  # exactly one insertion per iteration
      kept = np.mean(np.sum(out == x_id, axis=1)) / n_words  # X's never replaced
      # each original token survives an iteration with 1 - p (inserted tokens are random, never X)
      expected = (1 - p) ** iterations
      assert abs(kept - expected) < 0.015, (p, iterations, kept, expected)
      if iterations == 1:  # the measured replacement rate of one iteration
        assert abs((1 - kept) - p) < 0.015, (p, 1 - kept)
  # seeded per instance: an instance's edit does not depend on its batch, the seed changes it
  spec = Mitigation("rt", 2, seed=5, probability=0.3)
  a = mit.mitigate_tokens(spec, rows[:3], [10, 11, 12], tokens)
  b = mit.mitigate_tokens(spec, rows[:1], [11], tokens)
  np.testing.assert_array_equal(a[1], b[0])
  assert not np.array_equal(a[0], a[1])
  assert not np.array_equal(mit.mitigate_tokens(Mitigation("rt", 2, seed=6, probability=0.3), rows[:3],
                                                [10, 11, 12], tokens), a)
  # a full row gets no insertion, but its tokens are still replaced
  full = np.full((1, 8), x_id, np.int32)
  full[0, 0], full[0, 7] = 1, 2
  out = mit.mitigate_tokens(Mitigation("rt", 1, probability=1.0), full, [0], tokens)
  _check_structure(out[0], tokens, 6)
  assert not np.any(out[0, 1:7] == x_id)


def test_rt_bad_rows_and_tokenizer_spec():
  with pytest.raises(ValueError, match=r"token ids row 1: must start with the start token 1"):
    mit.mitigate_tokens(Mitigation("rt", 1), np.array([[1, 5, 2, 0], [5, 2, 0, 0]]), [0, 1], TOKENS)
  with pytest.raises(ValueError, match=r"token ids row 0: no end token 2"):
    mit.mitigate_tokens(Mitigation("rt", 1), np.array([[1, 5, 6, 7]]), [0], TOKENS)
  with pytest.raises(ValueError, match=r"token ids must be an int array \[N, L\]"):
    mit.mitigate_tokens(Mitigation("rt", 1), np.array([1, 5, 2]), [0], TOKENS)
  tok = types.SimpleNamespace(vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
                              all_special_ids=[49406, 49407, 0])
  spec = TokenSpec.from_tokenizer(tok)
  assert spec == TokenSpec(49408, 49406, 49407, 0, (49406, 49407, 0))
  assert spec.candidates().size == 49405
  with pytest.raises(ValueError, match="lacks \\['bos_token_id'\\]"):
    TokenSpec.from_tokenizer(types.SimpleNamespace(vocab_size=10, bos_token_id=None, eos_token_id=2))
  with pytest.raises(ValueError, match=r"TokenSpec.eos_id=60 must lie in \[0, vocab_size=50\)"):
    TokenSpec(50, 1, 60, 0)
