"""RePaint outpainting for pixel-space models: one jitted function, vmapped over images and repeats.

Per denoising step at noise level t (Lugmayr et al. 2022), with known image x0_known
and mask m (1 = unknown / marked region):

1. x_known_t = sqrt(abar_t) x0_known + sqrt(1 - abar_t) eps
2. x_t = m * x_t + (1 - m) * x_known_t
3. one reverse step x_t -> x_{t_prev} (DDIM or DDPM, from `diffusion.schedule`)
4. resampling: after every j steps, jump back j steps by forward noising and redo them, u - 1 extra
   times (u = 1: no resampling, as in the public SolidMark code).

The time-pair schedule is built on the host (`repaint_levels`, RePaint's `get_schedule_jump`) over
the strided sampling timesteps and compressed into one row per denoiser call (`repaint_steps`): a
row (t_from, t, t_prev) first jumps forward t_from -> t when t_from < t (a chain of RePaint's
single-level "undo" steps composes to one jump), then denoises t -> t_prev. The reverse process is a
`lax.scan` over those rows, so the denoiser runs exactly once per row, with no wasted branch.

The function takes any denoiser `(params, x_t [B, H, W, C], t [B] int32, condition [B] int32) ->
eps_hat [B, H, W, C]` in model space, so anyone's JAX model plugs in.

The predicted key is read off the call's mask (`marks.predicted_key`), or, with m keys per image, off
the m key regions given to the factory (`key_masks`, `marks.key_masks`): k_pred [N, r, m].
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from solidmark_jax import marks, parallel
from solidmark_jax.diffusion import schedule as schedule_lib
from solidmark_jax.diffusion.schedule import NoiseSchedule
from solidmark_jax.outpaint.spec import SamplerSpec, check_jump

Denoiser = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


# ---------------------------------------------------------------------------------------------
# Host-side schedule.


def repaint_levels(num_steps: int, jump_length: int = 10, resamples: int = 1) -> np.ndarray:
  """RePaint's `get_schedule_jump` over level indices of the strided sampling sequence.

  Level i in 0 .. S-1 is the i-th smallest sampling timestep; -1 is the clean image. The list
  starts at the noisiest level S-1 and ends at -1. A step to a lower level is a denoiser call, a
  step to a higher level is forward noising. Jumps start at levels 0, j, 2j, ... below S - j.

  Args:
    num_steps: S, the number of sampling timesteps.
    jump_length: j, levels per jump.
    resamples: u, passes over each jumped segment (u - 1 extra); 1 means no resampling.

  Returns:
    int32 [L] levels, e.g. [S-1, S-2, ..., 0, -1] for u = 1.
  """
  check_jump(num_steps, jump_length, resamples)
  jumps = {j: resamples - 1 for j in range(0, num_steps - jump_length, jump_length)}
  t = num_steps
  levels = []
  while t >= 1:
    t -= 1
    levels.append(t)
    if jumps.get(t, 0) > 0:
      jumps[t] -= 1
      for _ in range(jump_length):
        t += 1
        levels.append(t)
  levels.append(-1)
  return np.asarray(levels, np.int32)


def num_denoiser_calls(num_steps: int, jump_length: int = 10, resamples: int = 1) -> int:
  """Denoiser calls per image and repeat: S + (number of jump points) (u - 1) j."""
  check_jump(num_steps, jump_length, resamples)
  jump_points = len(range(0, num_steps - jump_length, jump_length))
  return num_steps + jump_points * (resamples - 1) * jump_length


def repaint_steps(num_train_steps: int, num_steps: int, jump_length: int = 10,
                  resamples: int = 1) -> np.ndarray:
  """One row (t_from, t, t_prev) per denoiser call, in training timesteps (-1 = clean).

  A row forward-noises t_from -> t if t_from < t (t_from == t: no jump), then denoises t -> t_prev.

  Args:
    num_train_steps: T of the noise schedule.
    num_steps: S strided sampling timesteps (`schedule.sampling_timesteps`).
    jump_length: j.
    resamples: u.

  Returns:
    int32 [K, 3] with K = `num_denoiser_calls(num_steps, jump_length, resamples)`; the last row
    ends at t_prev = -1.
  """
  levels = repaint_levels(num_steps, jump_length, resamples)
  ascending = schedule_lib.sampling_timesteps(num_train_steps, num_steps)[::-1]  # [S], level -> t
  to_t = lambda level: int(ascending[level]) if level >= 0 else -1
  rows, jump_from = [], None
  for a, b in zip(levels[:-1], levels[1:]):
    if b > a:  # forward noising; consecutive single-level jumps compose into one
      jump_from = a if jump_from is None else jump_from
      continue
    start = a if jump_from is None else jump_from
    rows.append((to_t(start), to_t(a), to_t(b)))
    jump_from = None
  return np.asarray(rows, np.int32).reshape(-1, 3)


# ---------------------------------------------------------------------------------------------
# The jitted outpainting function.


def as_conditions(conditions: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
  """Condition ids as int32 [N], or float embeddings ([N, D] / [N, L, D]) as float32."""
  xp = jnp if isinstance(conditions, jax.Array) else np
  conditions = xp.asarray(conditions)
  return conditions.astype(xp.int32 if xp.issubdtype(conditions.dtype, xp.integer) else xp.float32)


class Outpainter:
  """A compiled RePaint outpainting function; build it with `make_outpaint_fn`.

  Call it as `fn(params, known, mask, conditions, rng, repeats, ids=None, null_condition=None, regions=None)`:

  Args (of a call):
    params: the denoiser's parameters (any pytree; their sharding is kept).
    known: [N, H, W, C] model-space images; only the region where mask == 0 is read.
    mask: [H, W, 1], 1 on the unknown (marked) region; all ones for plain sampling.
    conditions: [N] int condition ids, or per-image float embeddings [N, D] / [N, L, D] (text);
      whatever the denoiser takes as its condition.
    rng: a JAX PRNG key.
    repeats: r (static), independent outpaintings per image.
    ids: [N] int ids (e.g. instance ids) that seed each image's noise, fold_in(rng, id); default
      the row index. Seeding by instance id makes results independent of batching, so a resumed
      evaluation reproduces an uninterrupted one.
    null_condition: the unconditional condition of classifier-free guidance (needed when the
      spec's guidance_scale != 1): an id, or one image's condition (e.g. the empty caption's
      embedding [L, D]). A traced argument: another null value compiles nothing new.
    return_images: overrides the factory's `return_images` for this call (static).
    regions: [N, H, W, 1] per-image regions hidden beside the mask (1 = also outpainted), e.g. an
      image's foreground for a region query (evaluation/regions.py); the key is still read off the
      mask (or `key_masks`) alone. None: the mask alone, for every image.

  Returns:
    dict with "k_pred" [N, r] float32 ([N, r, m] with m key regions, `key_masks`); with guidance,
    "noise_magnitude" [N, r] float32: Wen et al.'s ||eps(x_t, c) - eps(x_t, null)||_2 averaged over
    the first `spec.magnitude_steps` denoiser calls (docs/noise_magnitude.md); when images are
    requested, "images" [N, r, H, W, C] (model space, known region pasted back). Sharded over the
    mesh's batch axes if a mesh was given.

  Attributes:
    spec: the `SamplerSpec`.
    key_masks: None (one key, read off the call's mask) or [m, H, W, 1|C] key regions.
    trace_count: how many times the function was traced (one per distinct shape / static args).
    steps: int32 [K, 3] the (t_from, t, t_prev) rows of the reverse process.
    num_denoiser_calls: K, denoiser calls per image and repeat (x2 batch rows with guidance).
  """

  name = "outpaint"  # error messages

  def __init__(self, denoiser: Denoiser, sched: NoiseSchedule, spec: SamplerSpec, *, return_images: bool = False,
               mesh: Mesh | None = None, key_masks: np.ndarray | None = None):
    if not isinstance(spec, SamplerSpec):
      raise TypeError(f"{self.name}: spec must be a SamplerSpec, got {type(spec).__name__}")
    self.denoiser = denoiser
    self.key_masks = None if key_masks is None else np.asarray(key_masks, np.float32)
    if self.key_masks is not None and self.key_masks.ndim != 4:
      raise ValueError(f"{self.name}: key_masks must be [m, H, W, 1|C] key regions, got shape "
                       f"{self.key_masks.shape}")
    self.sched = sched
    self.spec = spec
    self.steps = repaint_steps(sched.num_steps, spec.num_steps, spec.jump_length, spec.resamples)  # [K, 3]
    self.return_images = bool(return_images)
    self.mesh = mesh
    self.trace_count = 0
    jit_kwargs = dict(static_argnums=(8, 9))
    if mesh is not None:
      batch, repl = parallel.batch_sharding(mesh), parallel.replicated(mesh)
      # params keep their own sharding (None); known, conditions, ids split over the batch axes.
      jit_kwargs.update(in_shardings=(None, batch, repl, batch, repl, batch, repl, batch), out_shardings=batch)
    self._jitted = jax.jit(self._run, **jit_kwargs)

  @property
  def num_denoiser_calls(self) -> int:
    return int(self.steps.shape[0])

  # -- per image -------------------------------------------------------------------------------

  def _eps(self, params, x, t, condition, null):
    """eps_hat for one image: x [H, W, C], t [] int32, condition and null of one image -> (eps_hat
    [H, W, C] float32, the noise magnitude ||eps_c - eps_u||_2 [] float32, 0 without guidance).

    A bf16 network's output is cast to float32: x_t, the known-region mixing and the key read stay float32.
    """
    if not self.spec.guided:
      eps = self.denoiser(params, x[None], t[None], condition[None])[0].astype(jnp.float32)
      return eps, jnp.zeros((), jnp.float32)
    xx = jnp.stack([x, x])  # [2, H, W, C]: conditional and unconditional in one call
    tt = jnp.stack([t, t])
    cc = jnp.stack([condition, null.astype(condition.dtype)])
    eps_c, eps_u = self.denoiser(params, xx, tt, cc).astype(jnp.float32)  # [H, W, C] each
    text = eps_c - eps_u
    return eps_u + self.spec.guidance_scale * text, jnp.sqrt(jnp.sum(jnp.square(text)))

  def _magnitude(self, total: jax.Array) -> jax.Array:
    """The mean noise magnitude over the first k denoiser calls, from their sum."""
    return total / min(self.spec.magnitude_steps, self.num_denoiser_calls)

  def _accumulate(self, total: jax.Array, i: jax.Array, magnitude: jax.Array) -> jax.Array:
    return total + jnp.where(i < self.spec.magnitude_steps, magnitude, 0.0)

  def _k_pred(self, x, key_mask):
    """k_pred of one outpainted image x [H, W, C]: [] off the key mask [H, W, 1], or [m] off the key regions."""
    return marks.predicted_key(x, key_mask if self.key_masks is None else self.key_masks)

  def _one(self, params, x0_known, mask, key_mask, condition, null, key):
    """Outpaints one image once: x0_known [H, W, C], the unknown region `mask` [H, W, 1] and the key's
    `key_mask` (within it) -> (k_pred [] or [m], x0 [H, W, C], noise magnitude [])."""
    sched = self.sched
    key_init, key_loop = jax.random.split(key)
    x = jax.random.normal(key_init, x0_known.shape, x0_known.dtype)  # x at the noisiest level
    steps = jnp.asarray(self.steps)  # [K, 3]
    rows = jnp.concatenate([jnp.arange(steps.shape[0], dtype=jnp.int32)[:, None], steps], axis=1)

    def step(carry, row):
      x_t, total = carry
      i, t_from, t, t_prev = row[0], row[1], row[2], row[3]
      k_jump, k_known, k_step = jax.random.split(jax.random.fold_in(key_loop, i), 3)
      shape, dtype = x_t.shape, x_t.dtype
      # RePaint resampling: back from t_from to the noisier t (no-op row when t_from == t).
      jumped = schedule_lib.forward_jump(sched, x_t, t_from, t, jax.random.normal(k_jump, shape, dtype))
      x_t = jnp.where(t_from < t, jumped, x_t)
      x_known_t = schedule_lib.q_sample(sched, x0_known, t, jax.random.normal(k_known, shape, dtype))
      x_t = mask * x_t + (1.0 - mask) * x_known_t
      eps_hat, magnitude = self._eps(params, x_t, t, condition, null)
      noise = jax.random.normal(k_step, shape, dtype)
      if self.spec.sampler == "ddim":  # x0 clipped to [-1, 1] (pixels)
        x_prev = schedule_lib.ddim_step(sched, x_t, t, t_prev, eps_hat, noise, eta=self.spec.eta)
      else:
        x_prev = schedule_lib.ddpm_step(sched, x_t, t, t_prev, eps_hat, noise)
      return (x_prev, self._accumulate(total, i, magnitude)), None

    (x, total), _ = jax.lax.scan(step, (x, jnp.zeros((), jnp.float32)), rows)
    x = mask * x + (1.0 - mask) * x0_known  # paste the known region back
    return self._k_pred(x, key_mask), x, self._magnitude(total)

  # -- batched ---------------------------------------------------------------------------------

  def _run(self, params, known, mask, conditions, rng, ids, null, regions, repeats: int, return_images: bool):
    self.trace_count += 1  # Python side effect: runs once per trace, never per call
    known = jnp.asarray(known, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    conditions = as_conditions(conditions)
    if ids is None:
      ids = jnp.arange(known.shape[0], dtype=jnp.int32)

    def per_image(x0_known, condition, image_id, region):
      key = jax.random.fold_in(rng, image_id)
      keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(repeats, dtype=jnp.int32))
      # [H, W, 1]; without regions the one shared mask, so the border-only query traces as it always did
      unknown = mask if region is None else jnp.maximum(mask, jnp.asarray(region, jnp.float32))
      one = lambda k: self._one(params, x0_known, unknown, mask, condition, null, k)
      return jax.vmap(one)(keys)  # [r] (or [r, m]), [r, H, W, C], [r]

    # regions = None is an empty pytree: vmap passes it through as None
    k_pred, images, magnitude = jax.vmap(per_image)(known, conditions, jnp.asarray(ids, jnp.int32), regions)
    out = {"k_pred": k_pred}  # [N, r], or [N, r, m]
    if self.spec.guided:
      out["noise_magnitude"] = magnitude  # [N, r]
    if return_images:
      out["images"] = images  # [N, r, H, W, C]
    return out

  def _null(self, null_condition, conditions) -> np.ndarray:
    """The null condition checked against one image's condition, or zeros of that shape (no guidance)."""
    one = tuple(conditions.shape[1:])
    dtype = np.int32 if np.issubdtype(conditions.dtype, np.integer) else np.float32
    if not self.spec.guided:
      return np.zeros(one, dtype)
    if null_condition is None:
      raise ValueError(f"{self.name}: guidance_scale != 1 needs null_condition (the unconditional condition) "
                       "in the call")
    null = np.asarray(null_condition, dtype)
    if null.shape != one:
      raise ValueError(f"{self.name}: null_condition has shape {null.shape}, one image's condition {one}")
    return null

  def check_call(self, params: Any, known: np.ndarray, mask: np.ndarray, conditions: np.ndarray | jax.Array,
                 regions: np.ndarray | None = None) -> None:
    """Checks a call's shapes (subclasses add theirs)."""
    n = known.shape[0]
    if regions is not None and tuple(regions.shape) != (n, *known.shape[1:3], 1):
      raise ValueError(f"{self.name}: regions must be [N, H, W, 1] = {(n, *known.shape[1:3], 1)}, got "
                       f"{tuple(regions.shape)}")
    if self.mesh is not None and n % self.mesh.size:
      raise ValueError(f"{self.name}: batch of {n} images must be divisible by the {self.mesh.size} devices "
                       "of the mesh (use Outpainter.run, which pads)")
    if mask.shape != (*known.shape[1:3], 1):
      raise ValueError(f"{self.name}: mask must be [H, W, 1] = {(*known.shape[1:3], 1)}, got {mask.shape}")
    if self.key_masks is not None and (self.key_masks.shape[1:3] != known.shape[1:3]
                                       or self.key_masks.shape[3] not in (1, known.shape[3])):
      raise ValueError(f"{self.name}: key_masks {self.key_masks.shape} do not fit images {known.shape[1:]}: "
                       f"they must be [m, {known.shape[1]}, {known.shape[2]}, 1 or {known.shape[3]}]")

  def __call__(self, params, known, mask, conditions, rng, repeats: int = 1, ids=None, null_condition=None,
               return_images: bool | None = None, regions=None) -> dict:
    self.check_call(params, known, mask, conditions, regions)
    null = self._null(null_condition, conditions)
    if ids is None and self.mesh is not None:
      ids = np.arange(known.shape[0], dtype=np.int32)
    images = self.return_images if return_images is None else bool(return_images)
    return self._jitted(params, known, mask, conditions, rng, ids, null, regions, int(repeats), images)

  def run(self, params: Any, known: np.ndarray, mask: np.ndarray, conditions: np.ndarray, rng: jax.Array,
          repeats: int = 1,
          ids: np.ndarray | None = None, batch_size: int | None = None, null_condition: int | np.ndarray | None = None,
          return_images: bool | None = None) -> dict[str, np.ndarray]:
    """Host convenience: numpy in, numpy out, rows padded to `batch_size`.

    Padding every batch (the ragged last one included) to one `batch_size` keeps the shape fixed,
    so the function compiles once per evaluation. Default `batch_size`: N rounded up to the mesh.
    In a multi-process run every process passes the same rows and gets all results back; each
    contributes its own block of rows to the sharded batch.
    """
    n = known.shape[0]
    multiple = self.mesh.size if self.mesh is not None else 1
    size = batch_size or n
    size = -(-max(size, n) // multiple) * multiple
    if ids is None:
      ids = np.arange(n)
    rows = parallel.pad_rows((np.asarray(known, np.float32), np.asarray(as_conditions(conditions)),
                              np.asarray(ids, np.int32)), size)
    if self.mesh is not None and jax.process_count() > 1:  # numpy cannot feed other processes' devices
      local = parallel.process_slice(size)
      rows = parallel.global_batch(self.mesh, tuple(a[local] for a in rows))
    known, conditions, ids = rows
    out = self(params, known, np.asarray(mask, np.float32), conditions, rng, repeats, ids=ids,
               null_condition=null_condition, return_images=return_images)
    return {name: parallel.to_host(v)[:n] for name, v in out.items()}


def make_outpaint_fn(denoiser: Denoiser, sched: NoiseSchedule, spec: SamplerSpec, *, return_images: bool = False,
                     mesh: Mesh | None = None, key_masks: np.ndarray | None = None,
                     prediction_type: str = "epsilon") -> Outpainter:
  """Builds the jitted RePaint outpainting function for a pixel-space denoiser.

  Args:
    denoiser: `(params, x_t [B, H, W, C], t [B] int32, condition [B] int32) -> eps_hat [B, H, W, C]`.
    sched: the training noise schedule (T levels).
    spec: the sampler settings (steps, sampler, eta, RePaint's j and u, guidance).
    return_images: also return the outpainted images.
    mesh: shard the image batch over this mesh's batch axes.
    key_masks: m key regions [m, H, W, 1|C] (`marks.key_masks`) to read m keys per image off
      (k_pred [N, r, m]); None reads one key off the call's mask (k_pred [N, r]).
    prediction_type: what `denoiser` returns: "epsilon", or "v_prediction" (converted to eps_hat
      by `schedule.eps_denoiser`).

  Returns:
    An `Outpainter`; see its docstring for the call signature.
  """
  denoiser = schedule_lib.eps_denoiser(denoiser, sched, prediction_type)
  return Outpainter(denoiser, sched, spec, return_images=return_images, mesh=mesh, key_masks=key_masks)


def sample(outpainter: Outpainter, params: Any, conditions: np.ndarray, rng: jax.Array, image_shape: tuple[int, int,
           int],
           repeats: int = 1, batch_size: int | None = None, ids: np.ndarray | None = None,
           null_condition: int | np.ndarray | None = None) -> np.ndarray:
  """Plain sampling (no known region) through the same function: images [N, r, H, W, C] in model space.

  Args:
    outpainter: from `make_outpaint_fn`.
    params: denoiser parameters.
    conditions: [N] condition ids (the null id for unconditional samples).
    rng: PRNG key.
    image_shape: (H, W, C).
    repeats: samples per condition.
    batch_size: pad rows to this size (see `Outpainter.run`).
    ids: [N] ids seeding each sample's noise (default the row index): with ids, a sample does not
      depend on how the rows are batched.
    null_condition: the unconditional condition, with guidance (see `Outpainter`).
  """
  h, w, c = image_shape
  n = len(conditions)
  known = np.zeros((n, h, w, c), np.float32)
  mask = np.ones((h, w, 1), np.float32)
  out = outpainter.run(params, known, mask, conditions, rng, repeats, ids=ids, batch_size=batch_size,
                       null_condition=null_condition, return_images=True)
  return out["images"]
