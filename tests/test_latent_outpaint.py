"""Latent outpainting: an oracle denoiser gets the key back within the VAE's border error, the
pipeline is exactly the VAE round trips it should be, compile once, sharded == unsharded, guidance
with an array null condition (text-like embeddings).

The VAE is a tiny FlaxAutoencoderKL (widths 8, 8: factor 2, 12 px images -> 6 x 6 x 4 latents)
trained here for a few hundred steps with the stage-1 train step on random bordered images:
a near-identity VAE cannot be set by hand, since GroupNorm before each output conv removes every
image's mean and scale. Measured: its border error |k(D(E(x))) - k| is about 0.01-0.025 mean,
0.03-0.05 max (the test prints it).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from solidmark_jax import marks, parallel
from solidmark_jax.diffusion import make_schedule, velocity
from solidmark_jax.models.vae import build_vae, init_vae_params
from solidmark_jax.outpaint import SamplerSpec, make_latent_outpaint_fn, sample
from solidmark_jax.outpaint.latent import remask_rows
from solidmark_jax.training import vae_stage

T = 100
SCHED = make_schedule("cosine", T)
PAD = 2
SIZE = 12  # 8 x 8 content + 2 px border
N = 8


def marked(n, seed):
  rs = np.random.default_rng(seed)
  content = rs.random((n, 4, 4, 1)).astype(np.float32).repeat(2, 1).repeat(2, 2)  # [n, 8, 8, 1]
  keys = rs.random(n).astype(np.float32)
  return marks.to_model_space(marks.apply_border(content, keys, PAD)), keys  # [n, 12, 12, 1]


@pytest.fixture(scope="module")
def tiny_vae():
  cfg = ml_collections.ConfigDict(dict(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4,
                                       norm_num_groups=8, learning_rate=1e-2, kl_weight=1e-6, scaling_factor=None))
  vae = build_vae(cfg, 1, SIZE)
  tx = vae_stage.make_vae_optimizer(cfg)
  state = jax.jit(lambda p: vae_stage.init_vae_state(p, tx))(init_vae_params(vae, 0, SIZE))
  step = jax.jit(vae_stage.make_vae_train_step(vae, tx, kl_weight=1e-6), donate_argnums=0)
  for i in range(300):
    state, _ = step(state, marked(32, 1000 + i)[0], jax.random.key(1))
  vae = vae.with_scaling_factor(0.7)  # any factor: the latents are scaled and unscaled consistently
  return vae, jax.device_get(state["params"])


def oracle(table):
  """eps = (z_t - sqrt(abar_t) z0) / sqrt(1 - abar_t) with z0 = table[condition]: knows the clean latent."""

  def denoiser(params, z_t, t, condition):
    del params
    z0 = table[condition]
    abar_t = SCHED.abar[t][:, None, None, None]
    return (z_t - jnp.sqrt(abar_t) * z0) / jnp.sqrt(1.0 - abar_t)

  return denoiser


def reference_keys(vae, params, x, mask, z0):
  """What the oracle's "x0" outpainting gives when its last step re-masks: the true clean latent
  re-masked, z0' = E(m clip(D(z0)) + (1 - m) x), then decoded, m clip(D(z0')) + (1 - m) x."""
  paste = lambda y: mask * jnp.clip(y, -1, 1) + (1 - mask) * x
  z1 = vae.encode(params, paste(vae.decode(params, z0)))
  return np.asarray(marks.predicted_key(paste(vae.decode(params, z1)), mask))


def test_remask_rows():
  np.testing.assert_array_equal(np.flatnonzero(remask_rows(25, 10, "x0")), [0, 10, 20])
  np.testing.assert_array_equal(np.flatnonzero(remask_rows(25, 10, "noisy")), [10, 20])
  assert not remask_rows(25, 0, "x0").any()


def test_oracle_recovers_key_within_vae_error_and_compiles_once(tiny_vae):
  """The oracle predicts the true clean latent z0 = E(x) at every step, whatever z_t is, so the
  outpainting ends on z0 and gives k(D(E(x))): the key within the VAE's border error, exactly."""
  vae, params = tiny_vae
  x, keys = marked(N, 0)
  mask = jnp.asarray(marks.key_mask(SIZE, SIZE, PAD))
  z0 = vae.encode(params, x)  # [N, 6, 6, 4]
  assert z0.shape == (N, 6, 6, 4)
  k_roundtrip = np.asarray(marks.predicted_key(vae.decode(params, z0), mask))
  vae_error = np.abs(k_roundtrip - keys)
  print(f"VAE border error |k(D(E(x))) - k|: mean {vae_error.mean():.4f}, max {vae_error.max():.4f}")
  assert vae_error.max() < 0.1  # the VAE is good enough for the claim to mean something (chance: ~0.33)

  # 6 steps, s = 2: re-masks after the denoiser calls of steps 0, 2, 4; the last step (5) is plain.
  fn = make_latent_outpaint_fn(oracle(z0), SCHED, vae, SamplerSpec(num_steps=6, remask_every=2), return_images=True)
  assert fn.num_remasks == 3
  ids = np.arange(N)
  p = {"unet": {}, "vae": params}
  out = fn(p, x, mask, ids, jax.random.key(0), repeats=2)
  k_pred = np.asarray(out["k_pred"])  # [N, 2]
  assert k_pred.shape == (N, 2) and out["images"].shape == (N, 2, SIZE, SIZE, 1)
  np.testing.assert_allclose(k_pred, np.repeat(k_roundtrip[:, None], 2, 1), atol=2e-4)
  assert np.all(np.abs(k_pred - keys[:, None]) <= vae_error[:, None] + 2e-4)
  centre = (1 - np.asarray(mask))[..., 0] > 0
  np.testing.assert_array_equal(np.asarray(out["images"])[:, 0][:, centre], np.asarray(x)[:, centre])

  fn(params=p, known=x, mask=mask, conditions=ids, rng=jax.random.key(1), repeats=2)
  assert fn.trace_count == 1  # new noise, same shapes: no recompile

  # 5 steps, s = 2: the last step (4) re-masks: the output is the re-masked clean latent, decoded.
  last = make_latent_outpaint_fn(oracle(z0), SCHED, vae, SamplerSpec(num_steps=5, remask_every=2))
  k_ref = reference_keys(vae, params, x, mask, z0)
  print(f"with a re-mask at the last step (two VAE round trips): mean {np.abs(k_ref - keys).mean():.4f}")
  np.testing.assert_allclose(np.asarray(last(p, x, mask, ids, jax.random.key(0))["k_pred"])[:, 0], k_ref,
                             atol=2e-4)

  # "noisy" mode re-masks at the start of steps 2, 4: the output is again one round trip D(E(x)).
  noisy = make_latent_outpaint_fn(oracle(z0), SCHED, vae, SamplerSpec(num_steps=6, remask_every=2, remask_from="noisy"))
  k_noisy = np.asarray(noisy(p, x, mask, ids, jax.random.key(0))["k_pred"])[:, 0]
  np.testing.assert_allclose(k_noisy, k_roundtrip, atol=2e-4)


def test_sharded_equals_unsharded(tiny_vae):
  vae, params = tiny_vae
  x, _ = marked(N, 3)
  mask = marks.key_mask(SIZE, SIZE, PAD)
  table = vae.encode(params, x)
  ids = np.arange(N)
  mesh = parallel.make_mesh()
  assert mesh.size == 8
  plain = make_latent_outpaint_fn(oracle(table), SCHED, vae, SamplerSpec(num_steps=4, remask_every=2, sampler="ddpm"))
  sharded = make_latent_outpaint_fn(oracle(table), SCHED, vae, SamplerSpec(num_steps=4, remask_every=2, sampler="ddpm"), mesh=mesh)
  p = {"unet": {}, "vae": params}
  a = np.asarray(plain(p, x, mask, ids, jax.random.key(5))["k_pred"])
  out = sharded(p, x, mask, ids, jax.random.key(5))
  assert len(out["k_pred"].sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(out["k_pred"]), a, atol=1e-5)
  # Under vmap the re-mask stays a real branch (stablehlo.case), not a select that would run the VAE
  # round trip at every step.
  hlo = plain._jitted.lower(p, x, mask, ids, jax.random.key(5), ids, np.int32(0), None, 1, False).as_text()
  assert hlo.count("stablehlo.case") == 1


def test_guidance_with_array_null_condition_and_plain_sampling(tiny_vae):
  """Text-like conditions [N, L, D]: slot [0, 0] holds the image index, the null embedding -1.

  The denoiser returns 0 for the null condition and oracle / s for the image's own: only a guided
  step that combines both, eps_u + s (eps_c - eps_u), gives the oracle back.
  """
  vae, params = tiny_vae
  x, keys = marked(N, 4)
  mask = marks.key_mask(SIZE, SIZE, PAD)
  table = vae.encode(params, x)
  s = 3.0
  base = oracle(table)

  def denoiser(p, z_t, t, cond):  # cond [B, L, D]
    idx = cond[:, 0, 0].astype(jnp.int32)
    eps = base(p, z_t, t, jnp.maximum(idx, 0)) / s
    return jnp.where((idx >= 0)[:, None, None, None], eps, 0.0)

  conds = np.zeros((N, 2, 3), np.float32)
  conds[:, 0, 0] = np.arange(N)
  null = np.full((2, 3), -1.0, np.float32)
  fn = make_latent_outpaint_fn(denoiser, SCHED, vae, SamplerSpec(num_steps=4, remask_every=2, guidance_scale=s))
  k_pred = fn.run({"unet": {}, "vae": params}, x, mask, conds, jax.random.key(0), batch_size=N,
                  null_condition=null)["k_pred"][:, 0]
  k_roundtrip = np.asarray(marks.predicted_key(vae.decode(params, table), mask))
  np.testing.assert_allclose(k_pred, k_roundtrip, atol=2e-4)  # 4 steps, s = 2: the last step is plain
  with pytest.raises(ValueError, match="null_condition has shape"):
    fn({"unet": {}, "vae": params}, x, mask, conds[:, :1], jax.random.key(0), null_condition=null)

  # Plain sampling (no known region): never re-masks, decodes the oracle's clean latent.
  plain = make_latent_outpaint_fn(base, SCHED, vae, SamplerSpec(num_steps=3, remask_every=1))
  images = sample(plain, {"unet": {}, "vae": params}, np.arange(2), jax.random.key(0), (SIZE, SIZE, 1))
  np.testing.assert_allclose(images[:, 0], np.clip(vae.decode(params, table[:2]), -1, 1), atol=2e-4)


def test_four_keys_per_image_are_read_off_their_sides(tiny_vae):
  """m = 4 keys (one per border side): k_pred [N, r, 4], each read off its side of the decode, so the
  oracle gives the round trip's k(D(E(x))) per side, like one key."""
  vae, params = tiny_vae
  rs = np.random.default_rng(6)
  content = rs.random((N, 4, 4, 1)).astype(np.float32).repeat(2, 1).repeat(2, 2)
  keys = marks.keys_for(6, np.arange(N), 4)  # [N, 4]
  x = marks.to_model_space(marks.apply_border(content, keys.astype(np.float32), PAD))
  regions = marks.key_masks(SIZE, SIZE, PAD, "border", 4)
  mask = marks.key_mask(SIZE, SIZE, PAD)
  z0 = vae.encode(params, x)
  k_roundtrip = np.asarray(marks.predicted_key(vae.decode(params, z0), regions))  # [N, 4]
  # 4 steps, s = 2: re-masks after steps 0 and 2, the last step is plain (one VAE round trip)
  fn = make_latent_outpaint_fn(oracle(z0), SCHED, vae, SamplerSpec(num_steps=4, remask_every=2), key_masks=regions)
  k_pred = np.asarray(fn({"unet": {}, "vae": params}, x, mask, np.arange(N), jax.random.key(0), repeats=2)["k_pred"])
  assert k_pred.shape == (N, 2, 4)
  np.testing.assert_allclose(k_pred, np.repeat(k_roundtrip[:, None], 2, 1), atol=2e-4)


def test_repaint_resampling_jumps_the_latents_forward():
  """eps_hat = 0 under DDIM (eta 0) scales z_t deterministically from step to step; only RePaint's
  forward jumps add noise. Recording each denoiser call's (t, z_t) shows the resampling schedule of
  the pixel loop, and at every jump row exactly the forward process q(z_t | z_from) in latent space."""
  import types

  from solidmark_jax.experiment import make_outpainter
  from solidmark_jax.outpaint import num_denoiser_calls, repaint_steps

  cfg = ml_collections.ConfigDict(dict(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4,
                                       norm_num_groups=8, scaling_factor=1.0))
  vae = build_vae(cfg, 1, SIZE)
  params = {"unet": {}, "vae": init_vae_params(vae, 0, SIZE)}  # untrained: only decodes at the end here
  calls = []

  def denoiser(p, z_t, t, condition):
    del p, condition
    jax.debug.callback(lambda tt, zz: calls.append((int(np.asarray(tt).reshape(-1)[0]), np.asarray(zz).copy())),
                       t, z_t)
    return jnp.zeros_like(z_t)

  x, _ = marked(1, 7)
  mask = np.ones((SIZE, SIZE, 1), np.float32)  # no known region: no re-mask, only the sampler and the jumps
  model = types.SimpleNamespace(apply=lambda variables, z_t, t, c: denoiser(variables["params"], z_t, t, c))
  exp = types.SimpleNamespace(is_latent=True, model=model, sched=SCHED, vae=vae, key_masks=None,
                              prediction_type="epsilon")
  fn = make_outpainter(exp, SamplerSpec(num_steps=8, jump_length=2, resamples=3, remask_every=0))  # as evaluate builds it
  want = repaint_steps(T, 8, jump_length=2, resamples=3)
  np.testing.assert_array_equal(fn.steps, want)
  assert fn.num_denoiser_calls == num_denoiser_calls(8, 2, 3) == 20  # 8 + 3 jump points x 2 extra x 2 levels
  fn(params, x, mask, np.zeros(1, np.int32), jax.random.key(0))
  assert [t for t, _ in calls] == want[:, 1].tolist()  # one denoiser call per row, at the row's level
  abar = lambda t: float(SCHED.abar[t])
  residuals = []
  for (t_a, z_a), (t_b, z_b), (t_from, t, _) in zip(calls, calls[1:], want[1:]):
    z_det = np.sqrt(abar(t_b) / abar(t_a)) * z_a  # DDIM with eps 0 (and the jump's mean)
    if t_from == t:  # no jump: deterministic
      np.testing.assert_allclose(z_b, z_det, rtol=1e-4, atol=1e-5)
    else:  # jump t_from -> t: z_t = sqrt(abar_t / abar_from) z_from + sqrt(1 - abar_t / abar_from) eps
      residuals.append((z_b - z_det) / np.sqrt(1 - abar(t) / abar(t_from)))
  assert len(residuals) == 6  # 3 jump points, u - 1 = 2 jumps each
  eps = np.concatenate([r.ravel() for r in residuals])  # 6 x 144 draws of eps
  assert abs(eps.std() - 1) < 0.1 and abs(eps.mean()) < 0.1, (eps.mean(), eps.std())

  # u = 1 (the default): no jump rows, the rows of plain latent sampling
  plain = make_latent_outpaint_fn(denoiser, SCHED, vae, SamplerSpec(num_steps=8, jump_length=2, resamples=1))
  np.testing.assert_array_equal(plain.steps, repaint_steps(T, 8, jump_length=1, resamples=1))
  assert np.all(plain.steps[:, 0] == plain.steps[:, 1])


def test_v_prediction_oracle_matches_the_eps_oracle(tiny_vae):
  """prediction_type="v_prediction": a v-predicting oracle outpaints like the eps oracle."""
  vae, params = tiny_vae
  x, _ = marked(N, 6)
  mask = marks.key_mask(SIZE, SIZE, PAD)
  z0 = vae.encode(params, x)
  eps_oracle = oracle(z0)

  def v_oracle(p, z_t, t, condition):
    return velocity(SCHED, z0[condition], t, eps_oracle(p, z_t, t, condition))

  p, ids = {"unet": {}, "vae": params}, np.arange(N)
  want = np.asarray(make_latent_outpaint_fn(eps_oracle, SCHED, vae, SamplerSpec(num_steps=6, remask_every=2))(
      p, x, mask, ids, jax.random.key(0))["k_pred"])
  got = np.asarray(make_latent_outpaint_fn(v_oracle, SCHED, vae, SamplerSpec(num_steps=6, remask_every=2), prediction_type="v_prediction")(p, x, mask, ids, jax.random.key(0))["k_pred"])
  np.testing.assert_allclose(got, want, atol=2e-4)
