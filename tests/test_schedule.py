"""The v-parameterisation: our v target and v -> eps conversion are diffusers' (its Flax DDIM
scheduler, no torch needed), and a v-predicting denoiser becomes an eps denoiser in one place."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from solidmark_jax.export import scheduler_config
from solidmark_jax.diffusion import eps_denoiser, make_schedule, q_sample, training_target, v_to_eps, velocity

T = 100


def _inputs(seed=0, b=3):
  rs = np.random.default_rng(seed)
  x0 = rs.uniform(-1, 1, (b, 8, 8, 2)).astype(np.float32)
  eps = rs.standard_normal((b, 8, 8, 2)).astype(np.float32)
  return x0, eps


@pytest.mark.parametrize("kind", ["cosine", "scaled_linear"])
def test_v_target_and_conversion_match_diffusers_flax_scheduler(kind, tmp_path):
  from diffusers import FlaxDDIMScheduler
  from diffusers.schedulers.scheduling_utils_flax import get_velocity_common
  cfg = ml_collections.ConfigDict({"schedule": kind, "num_steps": T})
  schedulers = {}
  for prediction in ("v_prediction", "epsilon"):  # what our export writes, read by diffusers
    d = tmp_path / prediction / "scheduler"
    d.mkdir(parents=True)
    (d / "scheduler_config.json").write_text(json.dumps(
        scheduler_config(cfg, clip_sample=False, prediction_type=prediction)))
    scheduler, state = FlaxDDIMScheduler.from_pretrained(str(d.parent), subfolder="scheduler")
    schedulers[prediction] = (scheduler, scheduler.set_timesteps(state, 10))
  sched = make_schedule(kind, T)
  x0, eps = _inputs()
  (v_sched, v_state), (e_sched, e_state) = schedulers["v_prediction"], schedulers["epsilon"]
  for t in (0, 37, T - 1):
    tt = jnp.full((3,), t, jnp.int32)
    x_t = q_sample(sched, x0, tt, eps)
    v = velocity(sched, x0, tt, eps)
    np.testing.assert_allclose(np.asarray(v), np.asarray(get_velocity_common(v_state.common, x0, eps, tt)),
                               rtol=1e-5, atol=1e-6)
    # One DDIM step on the v output vs one on our eps conversion of it: the same sample.
    out_v = v_sched.step(v_state, v, t, x_t).prev_sample
    out_eps = e_sched.step(e_state, v_to_eps(sched, x_t, tt, v), t, x_t).prev_sample
    # The eps path divides by sqrt(abar_t) (x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)): float32
    # round-off grows by 1 / sqrt(abar_t) at the noisiest levels.
    np.testing.assert_allclose(np.asarray(out_v), np.asarray(out_eps), rtol=0,
                               atol=2e-6 / float(np.sqrt(sched.abar[t])) + 1e-5)
    # and the conversion recovers the true eps (v and x_t determine it)
    np.testing.assert_allclose(np.asarray(v_to_eps(sched, x_t, tt, v)), eps, atol=2e-5)


def test_eps_denoiser_converts_only_v():
  sched = make_schedule("cosine", T)
  x0, eps = _inputs(1)
  t = jnp.array([5, 50, 99], jnp.int32)
  x_t = q_sample(sched, x0, t, eps)
  v_model = lambda p, x, tt, c: velocity(sched, p, tt, (x - jnp.sqrt(sched.abar[tt])[:, None, None, None] * p)
                                         / jnp.sqrt(1 - sched.abar[tt])[:, None, None, None])
  as_eps = eps_denoiser(v_model, sched, "v_prediction")
  np.testing.assert_allclose(np.asarray(as_eps(jnp.asarray(x0), x_t, t, None)), eps, atol=2e-5)
  plain = lambda p, x, tt, c: x
  assert eps_denoiser(plain, sched, "epsilon") is plain
  np.testing.assert_array_equal(np.asarray(training_target(sched, "epsilon", x0, t, eps)), eps)
  np.testing.assert_array_equal(np.asarray(training_target(sched, "v_prediction", x0, t, eps)),
                                np.asarray(velocity(sched, x0, t, eps)))
  with pytest.raises(ValueError, match=r"diffusion.prediction_type must be one of \('epsilon', 'v_prediction'\), "
                                       r"got 'sample'"):
    eps_denoiser(plain, sched, "sample")
  jax.block_until_ready(x_t)
