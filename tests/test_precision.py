"""model.dtype = "bfloat16": the networks compute in bf16, everything else stays float32.

Parameters, optimiser state and EMA are float32 (master weights), the loss is taken in float32, and
in outpainting only the network runs in bf16: x_t, the known-region mixing and the key read stay
float32, so an oracle still scores l_SM == 0 and bf16 keys track fp32 keys of the same model.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from solidmark_jax import marks, metrics, models
from solidmark_jax.diffusion import make_schedule
from solidmark_jax.models import text as text_lib
from solidmark_jax.models.vae import build_vae, init_vae_params
from solidmark_jax.outpaint import SamplerSpec, make_outpaint_fn
from solidmark_jax.training.state import init_state, make_optimizer
from solidmark_jax.training.step import make_train_step
from configs import tiny

PAD, SIZE = 2, 16
# Measured on the CI CPU (the tiny UNet, seed 0, 10 steps of AdamW at lr 1e-3 on 8 images, then
# 4 DDIM steps, 8 images x 2 repeats): max |k_bf16 - k_fp32| = 0.0081, mean 0.0010; the bounds
# leave about 3-4x. docs/performance.md records the same figures.
TRAIN_STEPS, OUTPAINT_STEPS = 10, 4
KEY_MAX_BOUND, KEY_MEAN_BOUND = 0.03, 0.004
# Measured: bf16 losses within 0.13% (relative) of the fp32 losses over the same 10 steps; bound 1%.
LOSS_RTOL = 0.01


def _bordered(n, seed=0):
  rs = np.random.default_rng(seed)
  content = rs.random((n, SIZE - 2 * PAD, SIZE - 2 * PAD, 1)).astype(np.float32)
  keys = marks.keys_for(seed, np.arange(n))
  return marks.to_model_space(marks.apply_border(content, keys.astype(np.float32), PAD)), keys


def test_bad_dtype_is_a_clear_error():
  cfg = tiny.get_config()
  cfg.model.dtype = "float16"
  with pytest.raises(ValueError, match=r"model.dtype must be one of \('float32', 'bfloat16'\)"):
    models.build(cfg.model, SIZE, 1, 10)


def test_bf16_oracle_outpainting_scores_zero():
  """The denoiser's output is bf16 (as a bf16 network's is); l_SM == 0 still holds on the key grid."""
  sched = make_schedule("cosine", 1000)
  n = 16
  x0, keys = _bordered(n, seed=1)

  def bf16_oracle(table, x_t, t, condition):
    abar_t = sched.abar[t][:, None, None, None]
    eps = (x_t - jnp.sqrt(abar_t) * table[condition]) / jnp.sqrt(1.0 - abar_t)
    return eps.astype(jnp.bfloat16)  # the network's precision

  mask = marks.key_mask(SIZE, SIZE, PAD)
  fn = make_outpaint_fn(bf16_oracle, sched, SamplerSpec(num_steps=8), return_images=True)
  out = fn(jnp.asarray(x0), x0, mask, np.arange(n), jax.random.key(1), 2)
  assert out["k_pred"].dtype == jnp.float32 and out["images"].dtype == jnp.float32
  k_pred = np.asarray(out["k_pred"])
  np.testing.assert_array_equal(metrics.l_sm(k_pred, keys), np.zeros((n, 2)))
  # Had the key been read in bf16, it would be off by up to 2^-9: the check above would fail.
  k_bf16 = np.asarray(jnp.asarray(k_pred).astype(jnp.bfloat16).astype(jnp.float32))
  assert metrics.l_sm(k_bf16, keys).max() > 0


def _train(model, params, batch, steps):
  cfg = tiny.get_config()
  tx = make_optimizer(cfg.train)
  step = jax.jit(make_train_step(models.as_denoiser(model), make_schedule("cosine", 100), tx, ema_decay=0.99,
                                 cond_dropout=0.0, null_id=model.null_id))
  state = init_state(jax.tree.map(jnp.array, params), tx)
  losses = []
  for _ in range(steps):
    state, m = step(state, batch, jax.random.key(3))
    losses.append(float(m["loss"]))
  return state, np.array(losses)


@pytest.fixture(scope="module")
def trained():
  """The tiny UNet trained in fp32 and in bf16 from the same start on the same batches."""
  cfg = tiny.get_config()
  model = models.build(cfg.model, SIZE, 1, 10)
  params = models.init_params(model, jax.random.key(0), SIZE, 1)
  x0, keys = _bordered(8)
  batch = {"image": x0, "condition": np.arange(8, dtype=np.int32)}
  fp32, l32 = _train(model, params, batch, TRAIN_STEPS)
  bf16, l16 = _train(model.clone(dtype="bfloat16"), params, batch, TRAIN_STEPS)
  return model, fp32, bf16, l32, l16, x0, keys


def test_bf16_train_step_keeps_fp32_master_weights_and_tracks_fp32_loss(trained):
  _, fp32, bf16, l32, l16, _, _ = trained
  for tree in ("params", "ema_params", "opt_state"):
    dtypes = {str(a.dtype) for a in jax.tree.leaves(bf16[tree]) if jnp.issubdtype(a.dtype, jnp.floating)}
    assert dtypes == {"float32"}, (tree, dtypes)
  assert l16[-1] < l16[0]  # it trains
  np.testing.assert_allclose(l16, l32, rtol=LOSS_RTOL)
  assert not np.array_equal(l16, l32)  # the bf16 path really ran in another precision


def test_bf16_keys_track_fp32_keys_of_a_trained_model(trained):
  model, fp32, _, _, _, x0, keys = trained
  sched = make_schedule("cosine", 100)
  mask = marks.key_mask(SIZE, SIZE, PAD)
  out = {}
  for dtype in ("float32", "bfloat16"):
    fn = make_outpaint_fn(models.as_denoiser(model.clone(dtype=dtype)), sched, SamplerSpec(num_steps=OUTPAINT_STEPS))
    out[dtype] = np.asarray(fn(fp32["params"], x0, mask, np.arange(8), jax.random.key(5), 2)["k_pred"])
  diff = np.abs(out["bfloat16"] - out["float32"])
  assert diff.max() < KEY_MAX_BOUND and diff.mean() < KEY_MEAN_BOUND, (diff.max(), diff.mean())
  assert diff.max() > 0


def test_bf16_vae_and_text_encoder_keep_fp32_parameters_and_outputs():
  vcfg = ml_collections.ConfigDict(dict(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4,
                                        norm_num_groups=8, scaling_factor=0.5))
  vae = build_vae(vcfg, 1, SIZE)
  params = init_vae_params(vae, 0, SIZE)
  x = np.random.default_rng(0).uniform(-1, 1, (2, SIZE, SIZE, 1)).astype(np.float32)
  vae16 = vae.with_dtype("bfloat16")
  z32 = jax.jit(vae.encode)(params, x)
  z16, y16 = jax.jit(lambda p, x: (vae16.encode(p, x), vae16.decode(p, vae16.encode(p, x))))(params, x)
  assert z16.dtype == jnp.float32 and y16.dtype == jnp.float32
  assert 0 < float(jnp.abs(z16 - z32).max()) < 0.05 * float(jnp.abs(z32).max())
  with pytest.raises(ValueError, match="model.dtype must be one of"):
    vae.with_dtype("half")

  tcfg = ml_collections.ConfigDict(dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                        max_length=8, num_merges=0))
  enc32 = text_lib.build_text_encoder(tcfg, 0)
  enc16 = text_lib.build_text_encoder(tcfg, 0, dtype="bfloat16")
  ids = enc32.tokenize(["a shoe", "a grey bag"]).ids
  e32, e16 = jax.jit(enc32.encode)(enc32.params, ids), jax.jit(enc16.encode)(enc16.params, ids)
  assert e16.dtype == jnp.float32
  assert {str(a.dtype) for a in jax.tree.leaves(enc16.params)} == {"float32"}
  assert 0 < float(jnp.abs(e16 - e32).max()) < 0.1
