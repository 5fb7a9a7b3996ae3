"""The train step: a sharded step equals the unsharded one; FSDP shards the state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solidmark_jax import models, parallel
from solidmark_jax.diffusion import make_schedule
from solidmark_jax.training.state import init_state, make_optimizer
from solidmark_jax.training.step import make_train_step
from configs import tiny


# One UNet level (a cross-attention block, as configs/tiny.py's inner one): the same layers and
# collectives as the two-level tiny model in about 60% of its compile time; its convolutions are still
# large enough for FSDP to shard.
ONE_LEVEL = {"block_out_channels": (32,), "down_block_types": ("CrossAttnDownBlock2D",),
             "up_block_types": ("CrossAttnUpBlock2D",)}


def _setup():
  cfg = tiny.get_config()
  cfg.model.update(ONE_LEVEL)
  model = models.build(cfg.model, 16, 1, 10)
  tx = make_optimizer(cfg.train)
  step = make_train_step(models.as_denoiser(model), make_schedule("cosine", 100), tx, ema_decay=0.99,
                         cond_dropout=0.2, null_id=model.null_id)
  params = models.init_params(model, jax.random.key(0), 16, 1)
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(-1, 1, (8, 16, 16, 1)).astype(np.float32),
           "condition": rng.integers(0, 10, 8).astype(np.int32)}
  return tx, step, params, batch


def _run(mesh, tx, step, params, batch, n=2):
  state = init_state(jax.tree.map(jnp.array, params), tx)  # a copy: the step donates its state
  abstract = jax.eval_shape(lambda: state)
  shardings = parallel.state_shardings(mesh, abstract)
  state = jax.device_put(state, shardings)
  bs = parallel.batch_sharding(mesh)
  fn = jax.jit(step, in_shardings=(shardings, {"image": bs, "condition": bs}, parallel.replicated(mesh)),
               out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=(0,))
  for _ in range(n):
    state, metrics = fn(state, parallel.global_batch(mesh, batch), jax.random.key(1))
  return state, metrics


def test_sharded_step_equals_unsharded():
  assert jax.device_count() == 8
  tx, step, params, batch = _setup()
  one, m1 = _run(parallel.make_mesh(1, 1, jax.devices()[:1]), tx, step, params, batch)
  for data, fsdp in ((8, 1), (2, 4)):
    many, m8 = _run(parallel.make_mesh(data, fsdp), tx, step, params, batch)
    np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m8["grad_norm"]), float(m1["grad_norm"]), rtol=1e-4)
    assert int(many["step"]) == 2
    if fsdp > 1:  # the state is really split over "fsdp"
      assert any("fsdp" in tuple(x.sharding.spec) for x in jax.tree.leaves(many["params"]))
    # Adam divides each gradient by its own scale, so a near-zero gradient whose last bits depend
    # on the reduction order moves a parameter by up to ~lr either way: tolerance 0.1 * lr.
    for tree in ("params", "ema_params"):
      for a, b in zip(jax.tree.leaves(one[tree]), jax.tree.leaves(many[tree])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_fsdp_shards_large_parameters():
  tx, step, params, batch = _setup()
  mesh = parallel.make_mesh(2, 4)
  state, _ = _run(mesh, tx, step, params, batch, n=1)
  specs = [x.sharding.spec for x in jax.tree.leaves(state["params"])]
  assert any("fsdp" in tuple(s) for s in specs)
  big = [x for x in jax.tree.leaves(state["params"]) if x.size >= 4096]
  assert big and all(len(x.addressable_shards[0].data.flatten()) < x.size for x in big)


def test_training_reduces_loss_on_a_fixed_batch():
  tx, step, params, batch = _setup()
  state, m0 = _run(parallel.make_mesh(8, 1), tx, step, params, batch, n=1)
  _, m = _run(parallel.make_mesh(8, 1), tx, step, params, batch, n=30)
  assert float(m["loss"]) < float(m0["loss"])


def test_v_prediction_step_regresses_v():
  """An oracle that knows x0 (passed as the condition) and predicts v has loss ~0 under
  prediction_type="v_prediction" and a large one under "epsilon"; the eps oracle the reverse."""
  from solidmark_jax.diffusion import velocity
  sched = make_schedule("cosine", 100)
  tx = make_optimizer(tiny.get_config().train)
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(-1, 1, (8, 16, 16, 1)).astype(np.float32)}

  def prepare(frozen, b, r):  # the condition is the clean image itself
    return b["image"], b["image"], 0.0

  def oracle(kind):
    def apply_fn(params, x_t, t, x0):
      abar = sched.abar[t][:, None, None, None]
      eps = (x_t - jnp.sqrt(abar) * x0) / jnp.sqrt(1 - abar)
      return params["s"] * (velocity(sched, x0, t, eps) if kind == "v" else eps)
    return apply_fn

  losses = {}
  for kind in ("v", "eps"):
    for prediction in ("v_prediction", "epsilon"):
      step = make_train_step(oracle(kind), sched, tx, ema_decay=0.99, cond_dropout=0.0, prepare=prepare,
                             prediction_type=prediction)
      state = init_state({"s": jnp.float32(1.0)}, tx)
      _, m = jax.jit(step)(state, batch, jax.random.key(0))
      losses[kind, prediction] = float(m["loss"])
  assert losses["v", "v_prediction"] < 1e-8 and losses["eps", "epsilon"] < 1e-8
  assert losses["eps", "v_prediction"] > 0.1 and losses["v", "epsilon"] > 0.1
  with pytest.raises(ValueError, match="diffusion.prediction_type must be one of"):
    make_train_step(oracle("v"), sched, tx, ema_decay=0.99, cond_dropout=0.0, prepare=prepare,
                    prediction_type="v")
