"""The UNet adapter and its fast layers: same parameters, same results as diffusers' own layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solidmark_jax import models
from solidmark_jax.models import fast_layers
from solidmark_jax.models._diffusers import FlaxAttention
from configs import tiny


def _tiny_model(fast=True):
  cfg = tiny.get_config()
  return models.build(cfg.model, 16, 1, 10).clone(fast=fast)


def _inputs(b=4, size=16, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, size, size, 1)).astype(np.float32)
  t = rng.integers(0, 100, b).astype(np.int32)
  c = rng.integers(0, 11, b).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(t), jnp.asarray(c)


@pytest.mark.parametrize("shape,groups", [((2, 8, 8, 32), 32), ((3, 4, 4, 64), 32), ((2, 16, 64), 8),
                                          ((2, 5, 3, 3, 96), 32)])
def test_group_norm_swap_equals_flax(shape, groups):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(2.0, 3.0, shape).astype(np.float32))  # an offset mean, as activations have
  module = nn.GroupNorm(num_groups=groups, epsilon=1e-5)
  params = {"params": {"scale": jnp.asarray(rng.uniform(0.5, 1.5, shape[-1]).astype(np.float32)),
                       "bias": jnp.asarray(rng.normal(size=shape[-1]).astype(np.float32))}}
  ref = module.apply(params, x)
  with fast_layers.fast_layers():
    fast = module.apply(params, x)
  np.testing.assert_allclose(np.asarray(fast), np.asarray(ref), atol=1e-5, rtol=1e-5)
  grad = lambda p: jax.grad(lambda p, x: jnp.sum(jnp.sin(module.apply(p, x))), argnums=(0, 1))(p, x)
  g_ref = grad(params)
  with fast_layers.fast_layers():
    g_fast = grad(params)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("context_len", [None, 1, 7])
def test_attention_swap_equals_diffusers(context_len):
  rng = np.random.default_rng(2)
  module = FlaxAttention(query_dim=32, heads=4, dim_head=8)
  x = jnp.asarray(rng.normal(size=(2, 36, 32)).astype(np.float32))
  ctx = None if context_len is None else jnp.asarray(rng.normal(size=(2, context_len, 32)).astype(np.float32))
  params = module.init(jax.random.key(0), x, ctx)
  ref = module.apply(params, x, ctx)
  with fast_layers.fast_layers():
    fast = module.apply(params, x, ctx)
  np.testing.assert_allclose(np.asarray(fast), np.asarray(ref), atol=1e-5, rtol=1e-5)

  def grads(p, x):
    return jax.grad(lambda p, x: jnp.sum(jnp.sin(module.apply(p, x, ctx))), argnums=(0, 1))(p, x)

  g_ref = grads(params, x)
  with fast_layers.fast_layers():
    g_fast = grads(params, x)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def test_fast_unet_keeps_parameters_and_matches_reference():
  fast, ref = _tiny_model(True), _tiny_model(False)
  p_fast = models.init_params(fast, jax.random.key(0), 16, 1)
  p_ref = models.init_params(ref, jax.random.key(0), 16, 1)
  assert jax.tree.structure(p_fast) == jax.tree.structure(p_ref)
  for a, b in zip(jax.tree.leaves(p_fast), jax.tree.leaves(p_ref)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  x, t, c = _inputs()
  eps_fast = jax.jit(fast.apply)({"params": p_ref}, x, t, c)
  eps_ref = jax.jit(ref.apply)({"params": p_ref}, x, t, c)
  assert eps_fast.shape == x.shape
  np.testing.assert_allclose(np.asarray(eps_fast), np.asarray(eps_ref), atol=1e-5, rtol=1e-5)


def test_fast_unet_under_vmap_matches_batch():
  """The outpainting loop vmaps the denoiser over single images: the swap must batch the same way."""
  model = _tiny_model()
  params = models.init_params(model, jax.random.key(0), 16, 1)
  x, t, c = _inputs(b=3)
  batched = jax.jit(model.apply)({"params": params}, x, t, c)
  one = lambda x, t, c: model.apply({"params": params}, x[None], t[None], c[None])[0]
  np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(one))(x, t, c)), np.asarray(batched), atol=1e-5, rtol=1e-5)


def test_converted_pytorch_unet_matches():
  """diffusers' PyTorch UNet with our converted parameters computes our eps (what benchmarks/ relies on)."""
  pytest.importorskip("torch")
  import sys, os
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
  import torch
  from bench_unet import torch_unet
  model = _tiny_model()
  params = models.init_params(model, jax.random.key(3), 16, 1)
  pt, embed, _ = torch_unet(model, params)
  x, t, c = _inputs(b=2)
  ours = np.asarray(model.apply({"params": params}, x, t, c))
  with torch.inference_mode():
    theirs = pt(torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2), torch.from_numpy(np.asarray(t)).long(),
                embed(torch.from_numpy(np.asarray(c)).long())[:, None]).sample.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-4)


# -- attention implementations, precision, remat -------------------------------------------------


def test_attention_choice_by_backend_and_bad_names():
  assert fast_layers.resolve_attention("auto", "cpu") == "cpu"
  assert fast_layers.resolve_attention("auto", "gpu") == "dot_product"
  assert fast_layers.resolve_attention("auto", "tpu") == "dot_product"
  assert fast_layers.dot_product_implementation(jnp.bfloat16, 64, "gpu") == "cudnn"
  assert fast_layers.dot_product_implementation(jnp.float32, 64, "gpu") == "xla"  # cuDNN: half precision only
  assert fast_layers.dot_product_implementation(jnp.bfloat16, 4, "gpu") == "xla"
  assert fast_layers.dot_product_implementation(jnp.bfloat16, 64, "cpu") == "xla"
  cfg = tiny.get_config()
  cfg.model.attention = "flash"
  with pytest.raises(ValueError, match="model.attention must be one of"):
    models.build(cfg.model, 16, 1, 10)
  with pytest.raises(ValueError, match="train.remat must be one of"):
    models.with_remat(_tiny_model(), "dots")


def test_remat_on_the_cpu_backend_warns_that_it_saves_no_memory(caplog):
  with caplog.at_level("WARNING", logger="solidmark_jax.models.unet"):
    models.with_remat(_tiny_model(), "none")
    assert not caplog.records
    models.with_remat(_tiny_model(), "nothing_saveable")
  assert len(caplog.records) == 1 and "recomputes without saving memory" in caplog.records[0].getMessage()


@pytest.mark.parametrize("context_len", [None, 7])
def test_dot_product_attention_equals_diffusers(context_len):
  rng = np.random.default_rng(3)
  module = FlaxAttention(query_dim=32, heads=4, dim_head=8)
  x = jnp.asarray(rng.normal(size=(2, 36, 32)).astype(np.float32))
  ctx = None if context_len is None else jnp.asarray(rng.normal(size=(2, context_len, 32)).astype(np.float32))
  params = module.init(jax.random.key(0), x, ctx)
  f = lambda p, x: jnp.sum(jnp.sin(module.apply(p, x, ctx)))
  ref, g_ref = module.apply(params, x, ctx), jax.grad(f, argnums=(0, 1))(params, x)
  with fast_layers.fast_layers(attention="dot_product"):
    out, g = module.apply(params, x, ctx), jax.grad(f, argnums=(0, 1))(params, x)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def test_unet_attention_options_and_remat_keep_parameters_and_results():
  ref = _tiny_model(False)
  params = models.init_params(ref, jax.random.key(0), 16, 1)
  x, t, c = _inputs()
  eps_ref = np.asarray(jax.jit(ref.apply)({"params": params}, x, t, c))
  for kw in ({"attention": "dot_product"}, {"attention": "diffusers"}):
    m = _tiny_model(True).clone(**kw)
    assert jax.tree.structure(models.init_params(m, jax.random.key(0), 16, 1)) == jax.tree.structure(params)
    np.testing.assert_allclose(np.asarray(jax.jit(m.apply)({"params": params}, x, t, c)), eps_ref, atol=2e-5)
  # remat changes how the gradient is computed, not what it is
  loss = lambda m: (lambda p: jnp.sum(jnp.sin(m.apply({"params": p}, x, t, c))))
  fast = _tiny_model(True)
  g_ref = jax.jit(jax.grad(loss(fast)))(params)
  g = jax.jit(jax.grad(loss(models.with_remat(fast, "nothing_saveable"))))(params)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4, rtol=1e-3)


def test_remat_wraps_each_down_and_up_block():
  model = _tiny_model()
  params = models.init_params(model, jax.random.key(0), 16, 1)
  x, t, c = _inputs(2)

  def count(m):
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(m.apply({"params": p}, x, t, c))))(params))
    return jaxpr.count("remat") + jaxpr.count("checkpoint[")

  assert count(model) == 0
  assert count(models.with_remat(model, "nothing_saveable")) == 4  # 2 down + 2 up blocks (configs/tiny.py)
