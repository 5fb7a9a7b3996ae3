"""DoRI: search a perturbation of each image's condition embedding that brings its memorised image back.

DoRI (Kowalczuk, Hintersdorf, Struppek et al., arXiv 2507.16880) asks whether a mitigation removed a
memorised image or only hid it: from the (mitigated) condition embedding c0 it minimises, with Adam and
a fresh batch of (t, eps) draws every step, the denoising loss of the image on the (mitigated) model,
L(delta) = E || eps_theta(q_sample(x0, t, eps), t, c0 + delta) - eps ||^2. Here x0 is the *bordered*
image, and the SolidMark question is whether the key read off an outpainting with c0 + delta is its key.

- `dori_search`: the paper's objective; `denoising_loss`: the same loss without a search. Key-blind
  (`DoriSpec.key_blind`): the key region is a fresh random grey each step and out of the loss, so the
  search cannot write the key; non-members stay at exact chance by construction.
- `key_search`: beyond the paper, (k_pred - key)^2 differentiated through a short DDIM outpainting loop
  (`jax.checkpoint` on its body), fresh noise every Adam step.

Both are jitted and vmapped over images (an Adam state each); delta is projected onto the l2 ball of
`DoriSpec.max_norm` after every step; the learning rate, max_norm and timestep range are traced (a
sweep over them compiles nothing new). An `Outpainter` takes conditions as a call argument, so
`outpainter(params, known, mask, c0 + delta, rng, repeats)` queries with the found perturbation; sweeps
run it as a setting "<setting>+dori". docs/dori.md: the choices, the defaults and what is not built.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from solidmark_jax import marks
from solidmark_jax.config import section_items
from solidmark_jax.diffusion import schedule as schedule_lib
from solidmark_jax.diffusion.schedule import NoiseSchedule
from solidmark_jax.outpaint.repaint import Outpainter

Denoiser = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]
_CONFIG_FIELDS = ("steps", "learning_rate", "max_norm", "timesteps", "seed", "draws", "eval_draws", "inner_steps",
                  "key_blind")
OBJECTIVES = ("loss", "key")  # DoRI's denoising loss; the key-targeted search


def _is_int(v: Any) -> bool:
  return not isinstance(v, bool) and isinstance(v, (int, np.integer))


def _is_number(v: Any) -> bool:
  return not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(v)


@dataclasses.dataclass(frozen=True)
class DoriSpec:
  """The settings of one DoRI search.

  The defaults of the search are the paper's: 50 Adam steps at learning rate 0.1, a batch of 8 fresh
  (t, eps) draws per step, t uniform over all training timesteps, no norm bound.
  Adam moves each coordinate by about `learning_rate` per step, so the scale of the condition
  embeddings decides how far that reaches: compare `delta_norm` with ||c0|| (docs/dori.md).

  Attributes:
    steps: Adam steps (>= 0; 0 leaves delta at zero).
    learning_rate: Adam's step size (>= 0; 0 leaves delta at exactly zero).
    max_norm: radius of the l2 ball delta is projected onto after every step (> 0), per image over the
      whole perturbation; None: unbounded.
    timesteps: (t_lo, t_hi): each step's t is drawn uniformly from the training timesteps [t_lo, t_hi)
      (half-open, like training's draw from [0, T)); None: the full range [0, T). `dori_search` only.
    seed: seeds the search when the call's rng is None.
    draws: fresh draws per Adam step (>= 1), averaged in its objective: `dori_search`'s (t, eps) pairs
      (the paper's batch of 8), `key_search`'s outpainting noises.
    eval_draws: K fixed (t, eps) draws per image on which `dori_search` reports the loss before and after
      (>= 1); one draw per step is too noisy to compare.
    objective: what a query with this spec searches: "loss" (`dori_search`, the paper's) or "key"
      (`key_search`, the SolidMark key through a short outpainting loop).
    inner_steps: the key search's DDIM steps per Adam step (>= 1; "key" only).
    key_blind: "loss" only: the search never sees the key. The key region (`dori_search`'s `hidden`)
      is filled with a fresh uniform random grey at every step and left out of the loss, so delta is a
      function of the image's content alone and a non-member's outpainted key is independent of its
      true key: its hits are at exact chance by construction. False: the paper's loss on the whole
      bordered image, key included (a large enough delta can then write any key).
  """

  steps: int = 50
  learning_rate: float = 0.1
  max_norm: float | None = None
  timesteps: tuple[int, int] | None = None
  seed: int = 0
  draws: int = 8
  eval_draws: int = 8
  objective: str = "loss"
  inner_steps: int = 5
  key_blind: bool = False

  def __post_init__(self):
    if self.timesteps is not None and isinstance(self.timesteps, (list, np.ndarray)):
      object.__setattr__(self, "timesteps", tuple(self.timesteps))  # a frozen spec stays hashable
    self.validate()

  def validate(self, field: str = "dori") -> None:
    """Raises a ValueError naming `field`.<name> for a bad setting."""
    if not _is_int(self.steps) or self.steps < 0:
      raise ValueError(f"{field}.steps must be an integer >= 0 (Adam steps), got {self.steps!r}")
    if not _is_number(self.learning_rate) or self.learning_rate < 0:
      raise ValueError(f"{field}.learning_rate must be a finite number >= 0, got {self.learning_rate!r}")
    if self.max_norm is not None and (not _is_number(self.max_norm) or self.max_norm <= 0):
      raise ValueError(f"{field}.max_norm must be a finite number > 0 (the l2 radius of delta) or None "
                       f"(unbounded), got {self.max_norm!r}")
    if self.timesteps is not None:
      ts = self.timesteps
      if (not isinstance(ts, tuple) or len(ts) != 2 or not all(_is_int(t) for t in ts)
          or not 0 <= ts[0] < ts[1]):
        raise ValueError(f"{field}.timesteps must be None (all of [0, T)) or a pair of integers (t_lo, t_hi) "
                         f"with 0 <= t_lo < t_hi, the half-open range t is drawn from, got {ts!r}")
    if not _is_int(self.seed) or self.seed < 0:
      raise ValueError(f"{field}.seed must be an integer >= 0, got {self.seed!r}")
    if not _is_int(self.draws) or self.draws < 1:
      raise ValueError(f"{field}.draws must be an integer >= 1 (fresh draws per Adam step), got {self.draws!r}")
    if not _is_int(self.eval_draws) or self.eval_draws < 1:
      raise ValueError(f"{field}.eval_draws must be an integer >= 1, got {self.eval_draws!r}")
    if self.objective not in OBJECTIVES:
      raise ValueError(f"{field}.objective must be one of {OBJECTIVES}, got {self.objective!r}")
    if not _is_int(self.inner_steps) or self.inner_steps < 1:
      raise ValueError(f"{field}.inner_steps must be an integer >= 1 (DDIM steps of the key search's loop), got "
                       f"{self.inner_steps!r}")
    if not isinstance(self.key_blind, (bool, np.bool_)):
      raise ValueError(f"{field}.key_blind must be True or False, got {self.key_blind!r}")
    if self.objective == "key" and self.key_blind:
      raise ValueError(f"{field}.key_blind is for the denoising-loss search; the key search aims at the key itself")
    if self.objective == "key" and self.timesteps is not None:
      raise ValueError(f"{field}.timesteps={self.timesteps} is for the denoising-loss search; the key search runs "
                       "the whole short DDIM loop, leave it None")

  def timestep_range(self, num_train_steps: int) -> tuple[int, int]:
    """[t_lo, t_hi) for a schedule of T = `num_train_steps` levels; a ValueError if it does not fit."""
    if self.timesteps is None:
      return 0, int(num_train_steps)
    lo, hi = self.timesteps
    if hi > num_train_steps:
      raise ValueError(f"dori.timesteps={self.timesteps} reaches past the schedule's T = {num_train_steps} "
                       f"levels: t_hi must be <= {num_train_steps}")
    return int(lo), int(hi)

  def replace(self, **changes) -> "DoriSpec":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_config(cls, section: Any, field: str = "eval.dori", objective: str = "loss") -> "DoriSpec":
    """The spec of a config section (`config.eval.dori`: steps, learning_rate, max_norm, seed,
    eval_draws; `config.eval.key_search` with objective "key": steps, learning_rate, max_norm, seed,
    inner_steps); bad values are errors naming `field`.<name>."""
    items = section_items(section, field, _CONFIG_FIELDS)
    try:
      return cls(**items, objective=objective)
    except ValueError as e:
      raise ValueError(str(e).replace("dori.", f"{field}.", 1)) from None

  def as_record(self) -> dict:
    """The spec as stored beside a setting's results; key_blind only when set and draws only when not 1,
    so the stores of searches written before those fields existed (one draw per step) still match."""
    record = dataclasses.asdict(self)
    if not self.key_blind:
      del record["key_blind"]
    if self.draws == 1:
      del record["draws"]
    return record


# ---------------------------------------------------------------------------------------------
# Shared pieces.


def _hyper(spec: DoriSpec) -> dict[str, jax.Array]:
  """The traced settings: another learning rate or bound compiles nothing new (max_norm None: inf)."""
  return {"learning_rate": jnp.float32(spec.learning_rate),
          "max_norm": jnp.float32(np.inf if spec.max_norm is None else spec.max_norm)}


def _project(delta: jax.Array, max_norm: jax.Array) -> jax.Array:
  """delta scaled onto the l2 ball of radius max_norm (the identity inside it, or with max_norm = inf)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(delta)))
  return delta * jnp.where(norm > max_norm, max_norm / jnp.maximum(norm, 1e-30), 1.0)


def _adam_scan(objective: Callable[[jax.Array, jax.Array], jax.Array], delta0: jax.Array, key: jax.Array,
               hyper: dict[str, jax.Array], steps: int) -> tuple[jax.Array, jax.Array]:
  """Adam on `objective(delta, step_key)` for `steps` steps -> (delta, losses [steps])."""
  tx = optax.adam(hyper["learning_rate"])

  def step(carry, i):
    delta, opt_state = carry
    loss, grad = jax.value_and_grad(objective)(delta, jax.random.fold_in(key, i))
    updates, opt_state = tx.update(grad, opt_state, delta)
    delta = _project(optax.apply_updates(delta, updates), hyper["max_norm"])
    return (delta, opt_state), loss

  (delta, _), losses = jax.lax.scan(step, (delta0, tx.init(delta0)), jnp.arange(steps, dtype=jnp.int32))
  return delta, losses


def _check_inputs(name: str, x0: Any, c0: Any, ids: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
  """x0 [N, H, W, C] float32, c0 [N, ...] float32 embeddings, ids [N] int32 (default the row index)."""
  x0 = jnp.asarray(x0)
  c0 = jnp.asarray(c0)
  if x0.ndim != 4:
    raise ValueError(f"{name}: images must be [N, H, W, C] in model space, got shape {x0.shape}")
  if not jnp.issubdtype(c0.dtype, jnp.floating):
    raise ValueError(f"{name}: c0 must be float condition embeddings [N, D] / [N, L, D], got {c0.dtype}; integer "
                     "condition ids cannot be perturbed (look the ids up first: "
                     "evaluation.mitigations.condition_embeddings)")
  if c0.ndim < 2 or c0.shape[0] != x0.shape[0]:
    raise ValueError(f"{name}: c0 must be [N, ...] with N = {x0.shape[0]} images, got shape {c0.shape}")
  n = x0.shape[0]
  ids = jnp.arange(n, dtype=jnp.int32) if ids is None else jnp.asarray(ids, jnp.int32)
  if ids.shape != (n,):
    raise ValueError(f"{name}: ids must be [N] = ({n},), got shape {ids.shape}")
  return x0.astype(jnp.float32), c0.astype(jnp.float32), ids


def _rng(rng: jax.Array | None, spec: DoriSpec) -> jax.Array:
  return jax.random.key(spec.seed) if rng is None else rng


# ---------------------------------------------------------------------------------------------
# The paper's search: the denoising loss of the bordered training image.


def image_loss(denoiser: Denoiser, params: Any, sched: NoiseSchedule, x: jax.Array, c: jax.Array, t: jax.Array,
               eps: jax.Array, prediction_type: str = "epsilon", weight: jax.Array | None = None) -> jax.Array:
  """The training loss of one image x [H, W, C] under condition c [...] on K draws (t [K] int32, eps
  [K, H, W, C]): the mean squared error of the prediction, a scalar. Pure; differentiable in params and c.
  `weight` [H, W, 1|C] (>= 0, not all 0): the weighted mean over pixels instead (0 leaves a pixel out)."""
  k = t.shape[0]
  xs = jnp.broadcast_to(x, (k, *x.shape))
  x_t = schedule_lib.q_sample(sched, xs, t, eps)
  cond = jnp.broadcast_to(c, (k, *c.shape))
  pred = denoiser(params, x_t, t, cond).astype(jnp.float32)
  target = schedule_lib.training_target(sched, prediction_type, xs, t, eps)
  sq = jnp.square(pred - target)
  if weight is None:
    return jnp.mean(sq)
  w = jnp.broadcast_to(weight, sq.shape)
  return jnp.sum(w * sq) / jnp.sum(w)


def loss_draws(key: jax.Array, k: int, shape: tuple[int, ...], t_lo: Any, t_hi: Any) -> tuple[jax.Array, jax.Array]:
  """K (t, eps) draws for `image_loss`: t [K] uniform on [t_lo, t_hi), eps [K, *shape] standard normal."""
  k_t, k_eps = jax.random.split(key)
  return jax.random.randint(k_t, (k,), t_lo, t_hi), jax.random.normal(k_eps, (k, *shape), jnp.float32)


def _dori(denoiser, params, sched, x0, c0, rng, ids, hyper, hidden, steps: int, draws_per_step: int,
          eval_draws: int, prediction_type: str):
  lo, hi = hyper["t_lo"], hyper["t_hi"]
  weight = None if hidden is None else 1.0 - hidden  # a key-blind search's loss leaves the key region out

  def loss(delta, x, c, t, eps):  # x [H, W, C], t [K], eps [K, H, W, C] -> mean over the K draws
    return image_loss(denoiser, params, sched, x, c + delta, t, eps, prediction_type, weight)

  def draws(key, k, shape):
    return loss_draws(key, k, shape, lo, hi)

  def seen(x, key):
    """The image the search sees: key-blind, its key region a uniform random grey (model space 2u - 1)."""
    if hidden is None:
      return x, key
    k_fill, key = jax.random.split(key)
    return hidden * (2.0 * jax.random.uniform(k_fill, ()) - 1.0) + (1.0 - hidden) * x, key

  def step_loss(delta, x, c, key):  # a fresh batch of (t, eps) per step, and a fresh grey if key-blind
    x, key = seen(x, key)
    return loss(delta, x, c, *draws(key, draws_per_step, x.shape))

  def per_image(x, c, image_id):
    k_train, k_eval = jax.random.split(jax.random.fold_in(rng, image_id))
    delta, losses = _adam_scan(lambda delta, key: step_loss(delta, x, c, key), jnp.zeros_like(c), k_train, hyper,
                               steps)
    x_eval, k_eval = seen(x, k_eval)
    t_eval, eps_eval = draws(k_eval, eval_draws, x.shape)
    info = {"loss_initial": loss(jnp.zeros_like(c), x_eval, c, t_eval, eps_eval),
            "loss_final": loss(delta, x_eval, c, t_eval, eps_eval),
            "losses": losses,
            "delta_norm": jnp.sqrt(jnp.sum(jnp.square(delta)))}
    return delta, info

  return jax.vmap(per_image)(x0, c0, ids)


_dori_jit = jax.jit(_dori, static_argnames=("denoiser", "steps", "draws_per_step", "eval_draws", "prediction_type"))


def dori_search(denoiser: Denoiser, params: Any, sched: NoiseSchedule, x0: Any, c0: Any, rng: jax.Array | None,
                spec: DoriSpec, *, ids: Any = None, hidden: Any = None,
                prediction_type: str = "epsilon") -> tuple[jax.Array, dict[str, jax.Array]]:
  """DoRI's search: per image, the delta minimising the denoising loss of x0 under c0 + delta.

  Args:
    denoiser: `(params, x_t [B, H, W, C], t [B] int32, condition [B, ...]) -> eps_hat` (or v_hat, see
      `prediction_type`), the (mitigated) model. A jit static argument: pass the same function object
      each call, or it compiles again.
    params: its parameters (constants of the search).
    sched: the training noise schedule.
    x0: [N, H, W, C] the *bordered* training images, model space.
    c0: [N, D] or [N, L, D] float condition embeddings (after any mitigation).
    rng: a PRNG key; None: `jax.random.key(spec.seed)`.
    spec: the search settings.
    ids: [N] ids seeding each image's draws, fold_in(rng, id) (default the row index): with ids, an
      image's result does not depend on the rest of its batch.
    hidden: [H, W, 1], 1 on the key region, for a `spec.key_blind` search (required then, refused
      otherwise): x0 is read only where hidden == 0, so the marked or the known image will do.
    prediction_type: "epsilon", or "v_prediction" (the loss is then on v, as in training).

  Returns:
    delta [N, ...] like c0 (float32), and info: "loss_initial" / "loss_final" [N], the mean loss under
    c0 and under c0 + delta on the same `spec.eval_draws` fixed draws per image (key-blind: on the
    content, with one fixed random grey in the key region); "losses" [N, steps],
    the loss of each Adam step on its own fresh `spec.draws` draws ([:, 0] is under c0); "delta_norm" [N],
    ||delta||_2.
  """
  schedule_lib.check_prediction_type(prediction_type)
  if not isinstance(spec, DoriSpec):
    raise TypeError(f"dori_search: spec must be a DoriSpec, got {type(spec).__name__}")
  lo, hi = spec.timestep_range(sched.num_steps)
  x0, c0, ids = _check_inputs("dori_search", x0, c0, ids)
  if spec.objective != "loss":
    raise ValueError(f"dori_search: spec.objective={spec.objective!r}; the key-targeted search is key_search")
  if spec.key_blind != (hidden is not None):
    raise ValueError("dori_search: a key-blind search (spec.key_blind) needs `hidden`, the [H, W, 1] key region it "
                     "must not see, and only a key-blind one takes it; got key_blind="
                     f"{spec.key_blind} with hidden {'given' if hidden is not None else 'None'}")
  if hidden is not None:
    hidden = jnp.asarray(hidden, jnp.float32)
    if hidden.shape != (*x0.shape[1:3], 1):
      raise ValueError(f"dori_search: hidden must be [H, W, 1] = {(*x0.shape[1:3], 1)} (1 on the key region), got "
                       f"{hidden.shape}")
  hyper = {**_hyper(spec), "t_lo": jnp.int32(lo), "t_hi": jnp.int32(hi)}
  return _dori_jit(denoiser, params, sched, x0, c0, _rng(rng, spec), ids, hyper, hidden, spec.steps, spec.draws,
                   spec.eval_draws, prediction_type)


def denoising_loss(denoiser: Denoiser, params: Any, sched: NoiseSchedule, x0: Any, c: Any, rng: jax.Array,
                   *, draws: int = 8, ids: Any = None, prediction_type: str = "epsilon") -> jax.Array:
  """The training loss of each image x0 [N, H, W, C] under condition c [N, ...]: the mean over `draws`
  (t, eps) draws seeded by fold_in(rng, id) (the same draws for any params: paired across models). [N]."""
  spec = DoriSpec(steps=0, draws=1, eval_draws=draws)
  _, info = dori_search(denoiser, params, sched, x0, c, rng, spec, ids=ids, prediction_type=prediction_type)
  return info["loss_initial"]


# ---------------------------------------------------------------------------------------------
# The key-targeted search, through a short outpainting loop.


def _ddim_rows(num_train_steps: int, num_steps: int) -> np.ndarray:
  """int32 [S, 2] (t, t_prev) rows of a plain strided DDIM sequence, the last ending at -1 (clean)."""
  ts = schedule_lib.sampling_timesteps(num_train_steps, num_steps)  # descending
  return np.stack([ts, np.append(ts[1:], -1)], axis=1).astype(np.int32)


def _short_outpaint(denoiser, params, sched, rows, x0_known, mask, key_mask, condition, key, eta):
  """One RePaint-style DDIM outpainting of one image, differentiable in `condition` -> k_pred [] or [m].

  Each step pastes the known region, noised to level t, over the unknown one, then takes one DDIM step;
  the known region is pasted back at the end and the key read off `key_mask`.
  """
  k_init, k_loop = jax.random.split(key)
  x = jax.random.normal(k_init, x0_known.shape, jnp.float32)  # [H, W, C] at the noisiest level

  @jax.checkpoint
  def step(x_t, row):  # the body's activations are recomputed in the backward pass, not stored
    i, t, t_prev = row[0], row[1], row[2]
    k_known, k_step = jax.random.split(jax.random.fold_in(k_loop, i))
    x_known_t = schedule_lib.q_sample(sched, x0_known, t, jax.random.normal(k_known, x_t.shape, x_t.dtype))
    x_t = mask * x_t + (1.0 - mask) * x_known_t
    eps_hat = denoiser(params, x_t[None], t[None], condition[None])[0].astype(jnp.float32)
    noise = jax.random.normal(k_step, x_t.shape, x_t.dtype)
    return schedule_lib.ddim_step(sched, x_t, t, t_prev, eps_hat, noise, eta=eta), None

  steps = jnp.concatenate([jnp.arange(rows.shape[0], dtype=jnp.int32)[:, None], jnp.asarray(rows)], axis=1)
  x, _ = jax.lax.scan(step, x, steps)
  x = mask * x + (1.0 - mask) * x0_known
  return marks.predicted_key(x, key_mask)


def _key(denoiser, params, sched, x0_known, mask, key_mask, c0, true_key, rng, ids, hyper, steps: int,
         draws_per_step: int, num_steps_inner: int, eta: float, prediction_type: str):
  rows = _ddim_rows(sched.num_steps, num_steps_inner)
  denoiser = schedule_lib.eps_denoiser(denoiser, sched, prediction_type)  # v_hat -> eps_hat, inside the trace

  def k_pred(delta, x, c, key):
    return _short_outpaint(denoiser, params, sched, rows, x, mask, key_mask, c + delta, key, eta)

  def per_image(x, c, k, image_id):
    k_train, k_eval = jax.random.split(jax.random.fold_in(rng, image_id))
    def objective(delta, key):  # the squared key error, averaged over fresh outpainting noises each step
      if draws_per_step == 1:  # the step's key itself, as before `draws` existed: stored searches still match
        return jnp.mean(jnp.square(k_pred(delta, x, c, key) - k))
      k_hat = jax.vmap(lambda kk: k_pred(delta, x, c, kk))(jax.random.split(key, draws_per_step))
      return jnp.mean(jnp.square(k_hat - k))
    delta, losses = _adam_scan(objective, jnp.zeros_like(c), k_train, hyper, steps)
    info = {"k_pred_initial": k_pred(jnp.zeros_like(c), x, c, k_eval),
            "k_pred_final": k_pred(delta, x, c, k_eval),
            "losses": losses,
            "delta_norm": jnp.sqrt(jnp.sum(jnp.square(delta)))}
    return delta, info

  return jax.vmap(per_image)(x0_known, c0, true_key, ids)


_key_jit = jax.jit(_key, static_argnames=("denoiser", "steps", "draws_per_step", "num_steps_inner", "eta",
                                          "prediction_type"))


def key_search(denoiser: Denoiser, params: Any, sched: NoiseSchedule, x0_known: Any, mask: Any, c0: Any,
               true_key: Any, rng: jax.Array | None, spec: DoriSpec, num_steps_inner: int = 5, *,
               key_masks: Any = None, ids: Any = None, eta: float = 0.0,
               prediction_type: str = "epsilon") -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per image, the delta whose short outpainting reads the true key: min (k_pred(c0 + delta) - key)^2.

  Each Adam step outpaints `spec.draws` times (fresh noise each) with `num_steps_inner` strided DDIM
  steps and differentiates the mean squared key error through the whole loop; spec.timesteps is not
  used (the loop runs the full strided sequence).

  Args:
    denoiser: `(params, x_t [B, H, W, C], t [B] int32, condition [B, ...]) -> eps_hat` (or v_hat); a jit
      static argument, like `dori_search`'s.
    params: its parameters (constants).
    sched: the training noise schedule.
    x0_known: [N, H, W, C] model-space images; only the region where mask == 0 is read.
    mask: [H, W, 1], 1 on the unknown (marked) region.
    c0: [N, D] or [N, L, D] float condition embeddings.
    true_key: [N] keys in [0, 1]; [N, m] with m key regions (`key_masks`).
    rng: a PRNG key; None: `jax.random.key(spec.seed)`.
    spec: steps, learning_rate, max_norm, seed, draws (outpaintings per Adam step).
    num_steps_inner: S, DDIM steps of the differentiated loop (static; memory grows with S images, time
      with S denoiser calls forward and backward per Adam step).
    key_masks: [m, H, W, 1|C] key regions (`marks.key_masks`) for m keys per image; None: one key read
      off `mask`.
    ids: [N] ids seeding each image's noise (default the row index).
    eta: DDIM noise scale of the loop (0: deterministic given the initial noise).
    prediction_type: "epsilon" or "v_prediction" (converted by `schedule.eps_denoiser`).

  Returns:
    delta [N, ...] like c0, and info: "k_pred_initial" / "k_pred_final" [N] (or [N, m]), the key the
    loop reads under c0 and under c0 + delta on one fixed noise draw per image; "losses" [N, steps], each
    step's mean squared key error on its own noises; "delta_norm" [N].
  """
  if not isinstance(spec, DoriSpec):
    raise TypeError(f"key_search: spec must be a DoriSpec, got {type(spec).__name__}")
  if spec.timesteps is not None:
    raise ValueError(f"key_search: dori.timesteps={spec.timesteps} is for dori_search's denoising loss; the key "
                     "search runs the whole short DDIM loop, leave it None")
  if not _is_int(num_steps_inner) or not 1 <= num_steps_inner <= sched.num_steps:
    raise ValueError(f"key_search: num_steps_inner must be an integer in [1, {sched.num_steps}], got "
                     f"{num_steps_inner!r}")
  x0_known, c0, ids = _check_inputs("key_search", x0_known, c0, ids)
  mask = jnp.asarray(mask, jnp.float32)
  if mask.shape != (*x0_known.shape[1:3], 1):
    raise ValueError(f"key_search: mask must be [H, W, 1] = {(*x0_known.shape[1:3], 1)}, got {mask.shape}")
  regions = mask if key_masks is None else jnp.asarray(key_masks, jnp.float32)
  true_key = jnp.asarray(true_key, jnp.float32)
  if key_masks is not None and (regions.ndim != 4 or regions.shape[1:3] != mask.shape[:2]):
    raise ValueError(f"key_search: key_masks must be [m, H, W, 1|C] key regions of [H, W] = {mask.shape[:2]}, got "
                     f"shape {regions.shape}")
  n = x0_known.shape[0]
  want = (n,) if key_masks is None else (n, regions.shape[0])
  if true_key.shape != want:
    what = "one key per image" if key_masks is None else "one key per image and key region"
    raise ValueError(f"key_search: true_key must be {want} ({what}), got {true_key.shape}")
  return _key_jit(denoiser, params, sched, x0_known, mask, regions, c0, true_key, _rng(rng, spec), ids,
                  _hyper(spec), spec.steps, spec.draws, int(num_steps_inner), float(eta),
                  schedule_lib.check_prediction_type(prediction_type))


# ---------------------------------------------------------------------------------------------
# Outpainting with the found perturbation.


def outpaint_perturbed(outpainter: Outpainter, params: Any, known: Any, mask: Any, c0: Any, delta: Any,
                       rng: jax.Array, repeats: int = 1, **kwargs) -> dict:
  """`outpainter(params, known, mask, c0 + delta, rng, repeats, **kwargs)`, after checking delta fits c0.

  Any `Outpainter` call argument (ids, null_condition, return_images, regions) passes through `kwargs`.
  """
  c0 = jnp.asarray(c0)
  delta = jnp.asarray(delta)
  if not jnp.issubdtype(c0.dtype, jnp.floating):
    raise ValueError(f"outpaint_perturbed: c0 must be float condition embeddings, got {c0.dtype}")
  if delta.shape != c0.shape:
    raise ValueError(f"outpaint_perturbed: delta has shape {delta.shape}, c0 {c0.shape}; they must match")
  return outpainter(params, known, mask, c0.astype(jnp.float32) + delta.astype(jnp.float32), rng, repeats, **kwargs)
