"""RePaint outpainting: schedule, exactness with an oracle, chance with a blind model, compile once,
sharding, guidance. Analytic denoisers on tiny images keep it fast."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solidmark_jax import marks, metrics, parallel
from solidmark_jax.diffusion import make_schedule, velocity
from solidmark_jax.outpaint import (SamplerSpec, make_outpaint_fn, num_denoiser_calls, repaint_levels, repaint_steps,
                                    sample)

T = 100
SCHED = make_schedule("cosine", T)
PAD = 2
SIZE = 12  # 8x8 content + 2 px border


def marked_images(n, seed=0, channels=1):
  rs = np.random.default_rng(seed)
  content = rs.random((n, SIZE - 2 * PAD, SIZE - 2 * PAD, channels)).astype(np.float32)
  keys = marks.keys_for(seed, np.arange(n))
  x0 = marks.to_model_space(marks.apply_border(content, keys.astype(np.float32), PAD))  # [n, 12, 12, C]
  return x0, keys


def oracle_denoiser(table, x_t, t, condition):
  """Knows the clean images: eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t), x0 = table[condition]."""
  x0 = table[condition]
  abar_t = SCHED.abar[t][:, None, None, None]
  return (x_t - jnp.sqrt(abar_t) * x0) / jnp.sqrt(1.0 - abar_t)


@pytest.mark.parametrize("num_keys,layout,channels", [(4, "sides", 1), (3, "channels", 3)])
def test_oracle_scores_zero_exactly_with_several_keys(num_keys, layout, channels):
  """m keys per image: k_pred [N, r, m], each key read off its own region, l_SM == 0 exactly."""
  n, r = 8, 2
  rs = np.random.default_rng(3)
  content = rs.random((n, SIZE - 2 * PAD, SIZE - 2 * PAD, channels)).astype(np.float32)
  keys = marks.keys_for(5, np.arange(n), num_keys)  # [n, m]
  x0 = marks.to_model_space(marks.apply_border(content, keys.astype(np.float32), PAD, layout))
  regions = marks.key_masks(SIZE, SIZE, PAD, "border", num_keys, layout, channels)
  fn = make_outpaint_fn(oracle_denoiser, SCHED, SamplerSpec(num_steps=8, jump_length=2, resamples=2), key_masks=regions)
  k_pred = np.asarray(fn(jnp.asarray(x0), x0, marks.key_mask(SIZE, SIZE, PAD), np.arange(n), jax.random.key(1),
                         r)["k_pred"])
  assert k_pred.shape == (n, r, num_keys)
  np.testing.assert_array_equal(metrics.l_sm(k_pred, keys), np.zeros((n, r)))
  np.testing.assert_array_less(np.abs(k_pred - keys[:, None, :]), 2.0**-22)
  # the keys really are read region by region: the union's mean is none of them
  union = np.asarray(marks.predicted_key(jnp.asarray(x0), marks.key_mask(SIZE, SIZE, PAD)))
  assert np.all(np.abs(union[:, None] - keys).min(axis=1) > 0)
  with pytest.raises(ValueError, match="key_masks .* do not fit images"):
    fn(jnp.asarray(x0), x0[:, 1:, 1:], marks.key_mask(SIZE - 1, SIZE - 1, PAD), np.arange(n), jax.random.key(1), r)


def v_oracle_denoiser(table, x_t, t, condition):
  """The same oracle predicting v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (a v-parameterised model)."""
  return velocity(SCHED, table[condition], t, oracle_denoiser(table, x_t, t, condition))


def smooth_denoiser(params, x_t, t, condition):
  """A parametric, spatially mixing denoiser whose output depends on t and the condition."""
  mix = (jnp.roll(x_t, 1, axis=1) + jnp.roll(x_t, -1, axis=2) + x_t) / 3.0
  tt = (t.astype(jnp.float32) / T)[:, None, None, None]
  return jnp.tanh(params["w"] * mix + params["b"][condition][:, None, None, None] + tt)


SMOOTH_PARAMS = {"w": jnp.float32(0.7), "b": jnp.linspace(-0.5, 0.5, 33).astype(jnp.float32)}


# -- schedule ---------------------------------------------------------------------------------


def test_no_resampling_is_plain_descending_sequence():
  np.testing.assert_array_equal(repaint_levels(7, jump_length=3, resamples=1), np.arange(6, -2, -1))
  steps = repaint_steps(T, 7, jump_length=3, resamples=1)
  ts = np.round(np.linspace(0, T - 1, 7)).astype(np.int32)[::-1]
  np.testing.assert_array_equal(steps[:, 1], ts)  # t: T-1 ... 0
  np.testing.assert_array_equal(steps[:, 0], ts)  # no jumps
  np.testing.assert_array_equal(steps[:, 2], np.append(ts[1:], -1))  # t_prev, ending clean
  assert num_denoiser_calls(7, 3, 1) == 7


def test_jump_schedule_hand_example():
  # S=4, j=2, u=2: one jump point (level 0): 3 2 1 0 | up 1 2 | 1 0 | -1.
  np.testing.assert_array_equal(repaint_levels(4, 2, 2), [3, 2, 1, 0, 1, 2, 1, 0, -1])
  steps = repaint_steps(T, 4, 2, 2)  # levels -> t: 0, 33, 66, 99
  np.testing.assert_array_equal(steps, [[99, 99, 66], [66, 66, 33], [33, 33, 0], [0, 66, 33], [33, 33, 0],
                                        [0, 0, -1]])


@pytest.mark.parametrize("s,j,u", [(10, 3, 4), (20, 5, 10), (6, 2, 3), (5, 10, 10), (9, 1, 2)])
def test_jump_schedule_counts_and_end(s, j, u):
  levels = repaint_levels(s, j, u)
  diffs = np.diff(levels)
  assert set(np.unique(diffs)) <= {-1, 1}
  assert levels[0] == s - 1 and levels[-1] == -1
  jump_points = len(range(0, s - j, j))
  assert np.sum(diffs == -1) == s + jump_points * (u - 1) * j == num_denoiser_calls(s, j, u)
  assert np.sum(diffs == 1) == jump_points * (u - 1) * j  # forward single-level steps
  steps = repaint_steps(T, s, j, u)
  assert len(steps) == num_denoiser_calls(s, j, u)
  assert steps[-1, 2] == -1 and np.all(steps[:-1, 2] >= 0)
  assert np.all(steps[:, 2] < steps[:, 1]) and np.all(steps[:, 0] <= steps[:, 1])


def test_denoiser_called_once_per_schedule_row():
  seen = []

  def counting(params, x_t, t, condition):
    jax.debug.callback(lambda tt: seen.append(int(np.asarray(tt)[0])), t)
    return jnp.zeros_like(x_t)

  fn = make_outpaint_fn(counting, SCHED, SamplerSpec(num_steps=6, jump_length=2, resamples=3))
  out = fn({}, np.zeros((1, SIZE, SIZE, 1), np.float32), marks.key_mask(SIZE, SIZE, PAD), np.zeros(1),
           jax.random.key(0), 1)
  jax.block_until_ready(out)
  assert fn.num_denoiser_calls == num_denoiser_calls(6, 2, 3) == 14
  assert seen == fn.steps[:, 1].tolist()


# -- exactness and chance -----------------------------------------------------------------------


@pytest.mark.parametrize("sampler,resamples", [("ddim", 1), ("ddim", 3), ("ddpm", 3)])
def test_oracle_scores_zero_exactly(sampler, resamples):
  n, r = 16, 2
  x0, keys = marked_images(n, channels=3)
  mask = marks.key_mask(SIZE, SIZE, PAD)
  fn = make_outpaint_fn(oracle_denoiser, SCHED, SamplerSpec(num_steps=8, sampler=sampler, eta=0.0, jump_length=2, resamples=resamples), return_images=True)
  out = fn(jnp.asarray(x0), x0, mask, np.arange(n), jax.random.key(1), r)
  k_pred, images = np.asarray(out["k_pred"]), np.asarray(out["images"])
  assert k_pred.shape == (n, r) and images.shape == (n, r, SIZE, SIZE, 3)
  # l_SM == 0 exactly: k_pred read on the keys' 16-bit grid (metrics.l_sm).
  np.testing.assert_array_equal(metrics.l_sm(k_pred, keys), np.zeros((n, r)))
  # Raw float32 k_pred: within a few ulps (x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar) rounds).
  np.testing.assert_array_less(np.abs(k_pred - keys[:, None]), 2.0**-22)
  centre = mask[..., 0] == 0
  for j in range(r):  # the known centre is pasted back exactly
    np.testing.assert_array_equal(images[:, j][:, centre], x0[:, centre])
  # The public PyTorch pitfall (model-space border read against a [0, 1] key) would be caught:
  wrong = np.abs(images[:, 0, :PAD].mean(axis=(1, 2, 3)) - keys)
  assert wrong.max() > 0.1


def test_oracle_is_significant_against_exact_chance():
  """64 images recalled exactly: every count far beyond its exact chance (p < 1e-10 at every threshold)."""
  n = 64
  x0, keys = marked_images(n, seed=5)
  mask = marks.key_mask(SIZE, SIZE, PAD)
  fn = make_outpaint_fn(oracle_denoiser, SCHED, SamplerSpec(num_steps=4))
  k_pred = np.asarray(fn(jnp.asarray(x0), x0, mask, np.arange(n), jax.random.key(4), 2)["k_pred"])
  np.testing.assert_array_equal(metrics.l_sm(k_pred, keys), np.zeros((n, 2)))
  s = metrics.summarize(k_pred, keys, num_permutations=100)
  assert s["counts"] == [n] * 4
  assert max(s["chance"]["p_value"]) < 1e-10
  assert s["permutation"]["p_value"] == [1 / 101] * 4


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_v_oracle_scores_zero_exactly(sampler):
  """prediction_type="v_prediction": the v output is converted to eps once, and the oracle stays exact."""
  n = 16
  x0, keys = marked_images(n, seed=5)
  mask = marks.key_mask(SIZE, SIZE, PAD)
  fn = make_outpaint_fn(v_oracle_denoiser, SCHED, SamplerSpec(num_steps=8, sampler=sampler, jump_length=2, resamples=2), prediction_type="v_prediction")
  k_pred = np.asarray(fn(jnp.asarray(x0), x0, mask, np.arange(n), jax.random.key(1), 2)["k_pred"])
  np.testing.assert_array_equal(metrics.l_sm(k_pred, keys), np.zeros((n, 2)))


def test_blind_denoiser_is_at_chance():
  """Oracle on the centre, a random constant on the border: k_pred independent of k."""
  n = 4000
  x0, keys = marked_images(n, seed=3)
  mask = marks.key_mask(SIZE, SIZE, PAD)
  u = np.random.default_rng(7).random(n).astype(np.float32)  # independent of the keys
  blind_x0 = np.where(mask[None] > 0, marks.to_model_space(u)[:, None, None, None], x0).astype(np.float32)
  fn = make_outpaint_fn(oracle_denoiser, SCHED, SamplerSpec(num_steps=3))
  # The true bordered images go in as `known`: their border must not leak.
  k_pred = np.asarray(fn(jnp.asarray(blind_x0), x0, mask, np.arange(n), jax.random.key(2), 1)["k_pred"])
  l = metrics.l_sm(k_pred, keys)[:, 0]
  for d in (0.2, 0.1, 0.05, 0.01, 0.005):
    p = metrics.hit_probability(k_pred, d)  # exact chance given the blind predictions
    count = np.sum(l <= d)
    sd = np.sqrt(np.sum(p * (1 - p)))
    assert abs(count - p.sum()) <= 4 * sd + 1, (d, count, p.sum())
    assert metrics.chance.tail_at_least(int(count), p) > 1e-4


def test_noise_independent_per_image_and_repeat_and_seeded_by_id():
  n = 8
  x0, _ = marked_images(n)
  mask = marks.key_mask(SIZE, SIZE, PAD)
  fn = make_outpaint_fn(smooth_denoiser, SCHED, SamplerSpec(num_steps=4, sampler="ddpm"))
  cond = np.zeros(n, np.int32)
  same = np.repeat(x0[:1], n, axis=0)
  k = np.asarray(fn(SMOOTH_PARAMS, same, mask, cond, jax.random.key(0), 3)["k_pred"])
  assert len(np.unique(k)) == k.size  # every image and repeat draws its own noise
  ids = np.arange(100, 100 + n)
  a = np.asarray(fn(SMOOTH_PARAMS, x0, mask, cond, jax.random.key(0), 2, ids=ids)["k_pred"])
  perm = np.random.default_rng(0).permutation(n)
  b = np.asarray(fn(SMOOTH_PARAMS, x0[perm], mask, cond, jax.random.key(0), 2, ids=ids[perm])["k_pred"])
  np.testing.assert_array_equal(a[perm], b)  # results follow the id, not the batch position


# -- compilation, sharding, guidance, sampling ----------------------------------------------------


def test_compiles_once_per_shape():
  n = 4
  mask = marks.key_mask(SIZE, SIZE, PAD)
  fn = make_outpaint_fn(smooth_denoiser, SCHED, SamplerSpec(num_steps=3, jump_length=1, resamples=2))
  for seed in range(3):
    x0, _ = marked_images(n, seed=seed)
    jax.block_until_ready(fn(SMOOTH_PARAMS, x0, mask, np.arange(n) + seed, jax.random.key(seed), 2))
  assert fn.trace_count == 1
  fn(SMOOTH_PARAMS, x0, mask, np.arange(n), jax.random.key(0), 3)  # a new static r: one more trace
  assert fn.trace_count == 2


def test_sharded_matches_unsharded():
  mesh = parallel.make_mesh()
  assert mesh.size == 8
  n, r = 16, 2
  x0, _ = marked_images(n, seed=5)
  mask = marks.key_mask(SIZE, SIZE, PAD)
  cond = np.arange(n) % 7
  spec = SamplerSpec(num_steps=5, sampler="ddim", eta=0.5, jump_length=2, resamples=2)
  plain = make_outpaint_fn(smooth_denoiser, SCHED, spec, return_images=True)
  sharded = make_outpaint_fn(smooth_denoiser, SCHED, spec, mesh=mesh, return_images=True)
  a = plain(SMOOTH_PARAMS, x0, mask, cond, jax.random.key(3), r)
  b = sharded(SMOOTH_PARAMS, x0, mask, cond, jax.random.key(3), r)
  assert b["k_pred"].sharding.is_equivalent_to(parallel.batch_sharding(mesh), 2)
  assert len(b["k_pred"].sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(b["k_pred"]), np.asarray(a["k_pred"]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(b["images"]), np.asarray(a["images"]), rtol=1e-5, atol=1e-5)
  # Host helper: a ragged batch is padded to the mesh and cut back.
  c = sharded.run(SMOOTH_PARAMS, x0[:5], mask, cond[:5], jax.random.key(3), r)
  np.testing.assert_allclose(c["k_pred"], np.asarray(a["k_pred"])[:5], rtol=1e-5, atol=1e-6)


def test_classifier_free_guidance_combines_predictions():
  n, s, null = 4, 3.0, 32
  x0, _ = marked_images(n)
  mask = marks.key_mask(SIZE, SIZE, PAD)
  cond = np.array([0, 5, 9, 20])
  batch_sizes = []

  def recording(params, x_t, t, condition):
    batch_sizes.append(x_t.shape[0])  # trace time: the per-image batch the denoiser sees
    return smooth_denoiser(params, x_t, t, condition)

  def combined(params, x_t, t, condition):
    eps_u = smooth_denoiser(params, x_t, t, jnp.full_like(condition, null))
    return eps_u + s * (smooth_denoiser(params, x_t, t, condition) - eps_u)

  spec = SamplerSpec(num_steps=4, sampler="ddpm")
  guided = make_outpaint_fn(recording, SCHED, spec.replace(guidance_scale=s), return_images=True)
  reference = make_outpaint_fn(combined, SCHED, spec, return_images=True)
  a = guided(SMOOTH_PARAMS, x0, mask, cond, jax.random.key(4), 2, null_condition=null)
  b = reference(SMOOTH_PARAMS, x0, mask, cond, jax.random.key(4), 2)
  assert batch_sizes == [2]  # cond and uncond in one denoiser call
  # the null condition is traced: another null value runs the same compiled function
  guided(SMOOTH_PARAMS, x0, mask, cond, jax.random.key(4), 2, null_condition=null - 1)
  assert guided.trace_count == 1
  np.testing.assert_allclose(np.asarray(a["images"]), np.asarray(b["images"]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(a["k_pred"]), np.asarray(b["k_pred"]), rtol=1e-5, atol=1e-6)
  unguided = make_outpaint_fn(smooth_denoiser, SCHED, spec, return_images=True)
  c = unguided(SMOOTH_PARAMS, x0, mask, cond, jax.random.key(4), 2)
  assert not np.allclose(np.asarray(c["k_pred"]), np.asarray(a["k_pred"]))
  with pytest.raises(ValueError, match="needs null_condition"):
    guided(SMOOTH_PARAMS, x0, mask, cond, jax.random.key(4), 2)


@pytest.mark.parametrize("k,resamples", [(3, 1), (50, 2)])  # k > K: the mean over every call
def test_noise_magnitude_is_the_mean_text_term_over_the_first_k_calls(k, resamples):
  """Wen et al.'s detector from the guided loop: a denoiser whose conditional and unconditional predictions
  differ by (t / T) * [condition != null] everywhere gives ||eps_c - eps_u||_2 = t / T * sqrt(H W C) per
  call, averaged over the first k denoiser calls (RePaint's resampling rows count as calls); an image
  queried with the null condition, and a denoiser that ignores its condition, give exactly 0."""
  n, null = 4, 7
  x0, _ = marked_images(n)
  mask = marks.key_mask(SIZE, SIZE, PAD)
  cond = np.array([0, 3, null, 9])

  def blind(params, x_t, t, condition):  # the condition is never read
    return smooth_denoiser(params, x_t, t, jnp.zeros_like(condition))

  def text_term(params, x_t, t, condition):
    on = (condition != null).astype(jnp.float32)[:, None, None, None]
    return blind(params, x_t, t, condition) + on * (t.astype(jnp.float32) / T)[:, None, None, None]

  spec = SamplerSpec(num_steps=6, sampler="ddpm", guidance_scale=2.0, resamples=resamples, jump_length=2,
                     magnitude_steps=k)
  fn = make_outpaint_fn(text_term, SCHED, spec)
  out = fn(SMOOTH_PARAMS, x0, mask, cond, jax.random.key(1), 2, null_condition=null)
  first = fn.steps[:k, 1]  # the t of the first k denoiser calls
  assert len(fn.steps) > 6 if resamples > 1 else len(fn.steps) == 6
  expected = np.mean(first / T) * np.sqrt(SIZE * SIZE)
  magnitude = np.asarray(out["noise_magnitude"])
  assert magnitude.shape == (n, 2)
  np.testing.assert_allclose(magnitude[cond != null], expected, rtol=1e-5)
  assert np.all(magnitude[cond == null] == 0.0)
  if resamples > 1:
    return
  ignores = make_outpaint_fn(blind, SCHED, spec)
  assert np.all(np.asarray(ignores(SMOOTH_PARAMS, x0, mask, cond, jax.random.key(1), 2,
                                 null_condition=null)["noise_magnitude"]) == 0.0)
  unguided = make_outpaint_fn(text_term, SCHED, spec.replace(guidance_scale=1.0))
  assert "noise_magnitude" not in unguided(SMOOTH_PARAMS, x0, mask, cond, jax.random.key(1), 2)
  with pytest.raises(ValueError, match="magnitude_steps"):
    spec.replace(magnitude_steps=0)


def test_sample_without_known_region():
  n = 3
  x0, _ = marked_images(n)
  fn = make_outpaint_fn(oracle_denoiser, SCHED, SamplerSpec(num_steps=6))
  images = sample(fn, jnp.asarray(x0), np.arange(n), jax.random.key(0), (SIZE, SIZE, 1), repeats=2)
  assert images.shape == (n, 2, SIZE, SIZE, 1)
  # Nothing is pasted (mask all ones): the oracle's sample is its clean image, border and all.
  np.testing.assert_allclose(images, np.broadcast_to(x0[:, None], images.shape), atol=1e-5)


def test_bad_arguments():
  with pytest.raises(ValueError, match="sampler"):
    make_outpaint_fn(smooth_denoiser, SCHED, SamplerSpec(num_steps=4, sampler="euler"))
  with pytest.raises(ValueError, match="resamples"):
    make_outpaint_fn(smooth_denoiser, SCHED, SamplerSpec(num_steps=4, resamples=0))
  fn = make_outpaint_fn(smooth_denoiser, SCHED, SamplerSpec(num_steps=2))
  with pytest.raises(ValueError, match="mask"):
    fn(SMOOTH_PARAMS, np.zeros((2, SIZE, SIZE, 1), np.float32), np.ones((SIZE, SIZE), np.float32),
       np.zeros(2), jax.random.key(0), 1)
