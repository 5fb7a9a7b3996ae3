"""Pruning mitigations: exactly the selected entries zeroed (numpy references), everything else untouched."""

import copy

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from configs import tiny_latent
from solidmark_jax import models
from solidmark_jax.evaluation import pruning

D = 6  # text dim of the hand-built trees


def _block(rng, d, inner, v_bias=False):
  """One diffusers-style transformer block: attn1 (self), attn2 (cross, reads the [*, d] text)."""
  dense = lambda i, o: {"kernel": rng.normal(size=(i, o)).astype(np.float32)}
  attn2 = {"to_q": dense(inner, inner), "to_k": dense(d, inner), "to_v": dense(d, inner),
           "to_out_0": {**dense(inner, inner), "bias": rng.normal(size=inner).astype(np.float32)}}
  if v_bias:
    attn2["to_v"]["bias"] = rng.normal(size=inner).astype(np.float32)
  return {"attn1": {"to_q": dense(inner, inner), "to_k": dense(inner, inner), "to_v": dense(inner, inner)},
          "attn2": attn2, "norm1": {"scale": np.ones(inner, np.float32), "bias": np.zeros(inner, np.float32)}}


def _tree(seed=0, d=D, v_bias=False):
  rng = np.random.default_rng(seed)
  return {"unet": {
      "conv_in": {"kernel": rng.normal(size=(3, 3, 4, 8)).astype(np.float32), "bias": np.zeros(8, np.float32)},
      "down_blocks_0": {"attentions_0": {"transformer_blocks_0": _block(rng, d, 8, v_bias)}},
      "mid_block": {"attentions_0": {"transformer_blocks_0": _block(rng, d, 4, v_bias)}},
  }}


KV = ("unet/down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel",
      "unet/down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_v/kernel",
      "unet/mid_block/attentions_0/transformer_blocks_0/attn2/to_k/kernel",
      "unet/mid_block/attentions_0/transformer_blocks_0/attn2/to_v/kernel")
V0, V1 = KV[1], KV[3]


def _flat(params):
  return {"/".join(k): v for k, v in flatten_dict(flax.core.unfreeze(params)).items()}


def _wanda_reference(w, emb, sparsity):
  """numpy: zero, per column of w [D, out], the floor(D * sparsity) largest |w_ij| * ||X_i||."""
  x = np.asarray(emb, np.float32).reshape(-1, w.shape[0])
  score = np.abs(w) * np.sqrt((x * x).sum(0))[:, None]
  k = int(w.shape[0] * sparsity)
  out = w.copy()
  np.put_along_axis(out, np.argsort(-score, axis=0, kind="stable")[:k], 0.0, axis=0)
  return out


def _emb(seed=1, p=3, length=5, d=D):
  return np.random.default_rng(seed).normal(size=(p, length, d)).astype(np.float32)


def test_cross_attention_kv_finds_only_the_attn2_key_value_kernels():
  params = _tree()
  found = pruning.cross_attention_kv(params)
  assert tuple(found) == KV
  flat = _flat(params)
  assert all(found[p] is flat[p] for p in KV)  # the params' own arrays
  wrapped = {"params": flax.core.freeze(params)}  # a FrozenDict under a "params" level
  assert tuple(pruning.cross_attention_kv(wrapped)) == tuple("params/" + p for p in KV)


def test_cross_attention_kv_of_the_tiny_text_unet():
  cfg = tiny_latent.get_config()
  params = models.abstract_params(models.build(cfg.model, 8, 4, 0), 8, 4)
  found = pruning.cross_attention_kv(params)
  expected = [p for p in _flat(params) if p.endswith(("attn2/to_k/kernel", "attn2/to_v/kernel"))]
  assert sorted(found) == sorted(expected) and len(found) >= 4
  assert all(v.shape[0] == cfg.model.cross_attention_dim for v in found.values())
  assert not any("attn1" in p for p in found)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_wanda_zeroes_exactly_the_top_scores_of_each_column(sparsity):
  params, emb = _tree(v_bias=True), _emb()
  before = copy.deepcopy(params)
  pruned, info = pruning.wanda_prune(params, emb, sparsity)
  flat, new = _flat(params), _flat(pruned)
  k = int(D * sparsity)  # 0.3 -> 1, 0.5 -> 3, 0.9 -> 5
  for path in KV:
    np.testing.assert_array_equal(np.asarray(new[path]), _wanda_reference(flat[path], emb, sparsity))
    assert new[path].dtype == flat[path].dtype
    assert info[path] == k * flat[path].shape[1]
    assert (np.asarray(new[path]) == 0).sum(0).tolist() == [k] * flat[path].shape[1]
  assert set(info) == set(KV)
  for path in set(flat) - set(KV):  # attn1, to_q, to_out, the to_v bias, conv_in: the same objects
    assert new[path] is flat[path], path
  for path, leaf in _flat(before).items():  # the input tree is not mutated
    np.testing.assert_array_equal(flat[path], leaf)


def test_wanda_prunes_the_weights_reading_the_busiest_input():
  params = _tree()
  emb = _emb()
  emb[..., 2] *= 100  # input feature 2 dominates ||X_i||: one weight per column, all on row 2
  pruned, _ = pruning.wanda_prune(params, emb, 1 / D + 1e-9)
  for path in KV:
    w = np.asarray(_flat(pruned)[path])
    assert (w[2] == 0).all() and (np.delete(w, 2, axis=0) != 0).all()


def test_wanda_projections_restrict_to_values():
  params = _tree()
  pruned, info = pruning.wanda_prune(params, _emb(), 0.5, projections=("to_v",))
  assert set(info) == {V0, V1}
  assert _flat(pruned)[KV[0]] is _flat(params)[KV[0]]


def test_wanda_sparsity_zero_is_the_identity_and_rounding_is_down():
  params, emb = _tree(), _emb()
  same, info = pruning.wanda_prune(params, emb, 0.0)
  assert same is params and set(info.values()) == {0}
  tiny, info = pruning.wanda_prune(params, emb, 0.1)  # floor(6 * 0.1) = 0 per column
  assert tiny is params and set(info.values()) == {0}
  odd = _tree(d=7)  # floor(7 * 0.5) = 3 of 7 per column
  pruned, info = pruning.wanda_prune(odd, _emb(d=7)[0], 0.5)  # one prompt [L, D]
  for path in KV:
    w = np.asarray(_flat(pruned)[path])
    assert (w == 0).sum(0).tolist() == [3] * w.shape[1] and info[path] == 3 * w.shape[1]


def test_value_activations_match_numpy():
  params, emb = _tree(v_bias=True), _emb()
  acts = pruning.value_activations(params, emb)
  assert set(acts) == {V0, V1}
  flat = _flat(params)
  for path in (V0, V1):
    bias = flat[path[:-len("kernel")] + "bias"]
    ref = np.abs(emb.astype(np.float64) @ flat[path] + bias).mean(1)  # [P, inner]
    np.testing.assert_allclose(np.asarray(acts[path]), ref, rtol=1e-5, atol=1e-6)


def _nemo_case():
  """Input feature 3 is used only by the memorised prompts; value neurons 0 and 1 of layer V0 read it."""
  rng = np.random.default_rng(3)
  params = _tree(d=4, v_bias=True)
  flat = _flat(params)
  w = flat[V0]  # [4, 8]
  w[3] = 0.0
  w[:3, 1] = w[:3, 0]  # neurons 0 and 1 differ only in how strongly they read feature 3
  w[3, 0], w[3, 1] = 2.0, 1.0
  flat[V1][3] = 0.0  # the mid block's value layer ignores feature 3
  ordinary = rng.normal(scale=0.1, size=(8, 5, 4)).astype(np.float32)
  ordinary[..., 3] = 0.0
  memorised = ordinary[:3].copy()  # on every neuron but 0 and 1 they look exactly like ordinary prompts
  memorised[..., 3] = 5.0
  return params, memorised, ordinary


def test_nemo_selects_exactly_the_neurons_reading_the_memorised_direction():
  params, memorised, ordinary = _nemo_case()
  neurons = pruning.nemo_neurons(params, memorised, ordinary, z_threshold=3.0)
  assert set(neurons) == {V0, V1}
  assert neurons[V0].tolist() == [0, 1] and neurons[V1].tolist() == []
  z = pruning.nemo_zscores(params, memorised, ordinary)
  assert z[V0].shape == (3, 8) and z[V0][:, :2].min() > 10 and z[V0][:, 2:].max() < 3.0
  capped = pruning.nemo_neurons(params, memorised, ordinary, z_threshold=3.0, max_neurons_per_layer=1)
  assert capped[V0].tolist() == [0]  # reads feature 3 twice as strongly: the higher z
  one = pruning.nemo_neurons(params, memorised[0], ordinary, z_threshold=3.0)  # one prompt [L, D]
  assert one[V0].tolist() == [0, 1]


def test_nemo_prune_zeroes_exactly_those_value_columns():
  params, memorised, ordinary = _nemo_case()
  before = copy.deepcopy(params)
  neurons = pruning.nemo_neurons(params, memorised, ordinary, z_threshold=3.0)
  pruned = pruning.nemo_prune(params, neurons)
  flat, new = _flat(params), _flat(pruned)
  expected = flat[V0].copy()
  expected[:, [0, 1]] = 0.0
  np.testing.assert_array_equal(np.asarray(new[V0]), expected)
  bias = V0[:-len("kernel")] + "bias"
  expected_bias = flat[bias].copy()
  expected_bias[[0, 1]] = 0.0
  np.testing.assert_array_equal(np.asarray(new[bias]), expected_bias)
  for path in set(flat) - {V0, bias}:  # to_k, the other value layer (no neurons), the rest: untouched
    assert new[path] is flat[path], path
  for path, leaf in _flat(before).items():
    np.testing.assert_array_equal(flat[path], leaf)
  after = pruning.value_activations(pruned, memorised)[V0]
  assert np.asarray(after)[:, :2].max() == 0.0  # the deactivated neurons are silent


def test_pruning_every_value_neuron_of_a_real_unet_cuts_it_off_the_text():
  cfg = tiny_latent.get_config()
  model = models.build(cfg.model, 8, 4, 0)
  rng = np.random.default_rng(0)  # random parameters of the real shapes: an eager init takes ~25 s on CPU
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(scale=0.1, size=a.shape), a.dtype),
                        models.abstract_params(model, 8, 4))
  apply = jax.jit(models.as_denoiser(model))
  x = jnp.asarray(np.repeat(rng.normal(size=(1, 8, 8, 4)), 2, 0), jnp.float32)
  t = jnp.array([10, 10], jnp.int32)
  context = jnp.asarray(rng.normal(size=(2, 3, cfg.model.cross_attention_dim)), jnp.float32)  # two prompts
  eps = np.asarray(apply(params, x, t, context))
  assert np.abs(eps[0] - eps[1]).max() > 1e-6
  values = {p: np.arange(w.shape[1]) for p, w in pruning.cross_attention_kv(params).items() if "/to_v/" in p}
  eps = np.asarray(apply(pruning.nemo_prune(params, values), x, t, context))
  np.testing.assert_array_equal(eps[0], eps[1])  # attention reads all-zero values: the text no longer matters
  pruned, info = pruning.wanda_prune(params, context, 0.5)
  assert len(info) == 2 * len(values) and set(info.values()) == {16 * 32}  # 16 of 32 inputs, 32 columns
  assert np.isfinite(np.asarray(apply(pruned, x, t, context))).all()


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), True, "0.5"])
def test_bad_sparsity_is_a_clear_error(sparsity):
  with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
    pruning.wanda_prune(_tree(), _emb(), sparsity)


def test_embeddings_of_the_wrong_dim_name_both_shapes():
  with pytest.raises(ValueError, match=r"shape \(3, 5, 7\).*kernel .*attn2/to_k/kernel of shape \(6, 8\)"):
    pruning.wanda_prune(_tree(), _emb(d=7), 0.5)
  with pytest.raises(ValueError, match=r"shape \(3, 5, 7\).*attn2/to_v/kernel of shape \(6, 8\)"):
    pruning.value_activations(_tree(), _emb(d=7))
  with pytest.raises(ValueError, match=r"\[P, L, D\] or \[L, D\]"):
    pruning.wanda_prune(_tree(), np.zeros(D, np.float32), 0.5)


def test_params_without_cross_attention_are_a_clear_error():
  params = _tree()
  for block in ("down_blocks_0", "mid_block"):
    del params["unet"][block]["attentions_0"]["transformer_blocks_0"]["attn2"]
  kv = r"no cross-attention key / value kernels.*attn2/to_k/kernel.*attn2/to_v/kernel"
  v = r"no cross-attention key / value kernels.*attn2/to_v/kernel"  # NeMo reads the value layers only
  for call, match in ((lambda: pruning.cross_attention_kv(params), kv),
                      (lambda: pruning.wanda_prune(params, _emb(), 0.5), kv),
                      (lambda: pruning.value_activations(params, _emb()), v),
                      (lambda: pruning.nemo_neurons(params, _emb(), _emb(2), 3.0), v),
                      (lambda: pruning.nemo_prune(params, {}), v)):
    with pytest.raises(ValueError, match=match):
      call()


@pytest.mark.parametrize("z", [0, -1.0, float("inf"), None])
def test_bad_z_threshold_is_a_clear_error(z):
  params, memorised, ordinary = _nemo_case()
  with pytest.raises(ValueError, match="z_threshold must be a finite number > 0"):
    pruning.nemo_neurons(params, memorised, ordinary, z)


def test_nemo_bad_settings_are_clear_errors():
  params, memorised, ordinary = _nemo_case()
  with pytest.raises(ValueError, match="at least 2 prompts"):
    pruning.nemo_neurons(params, memorised, ordinary[:1], 3.0)
  with pytest.raises(ValueError, match="max_neurons_per_layer"):
    pruning.nemo_neurons(params, memorised, ordinary, 3.0, max_neurons_per_layer=0)
  with pytest.raises(ValueError, match="not a cross-attention value kernel"):
    pruning.nemo_prune(params, {KV[0]: [0]})  # a to_k kernel
  with pytest.raises(ValueError, match=r"ids in \[0, 8\)"):
    pruning.nemo_prune(params, {V0: [8]})
  assert pruning.nemo_prune(params, {V0: []}) is params
