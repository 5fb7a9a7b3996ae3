"""Adversarial fine-tuning (DoRI's mitigation): fine-tune the UNet against the triggers a DoRI search finds.

Finding DoRI (Kowalczuk, Hintersdorf, Struppek et al., arXiv 2507.16880) ends with a mitigation that does
not assume memorisation is local: an outer loop fine-tunes the model, an inner loop searches for
replication triggers of the targeted (memorised) images on the current model, and the update makes
those triggers fail while a retain set stays as it was. Here, outer step s:

  1. triggers: delta_i = DoRI's search (`dori.dori_search`, `spec.trigger`) for each targeted image i on the
     current parameters theta_s, a constant of the update;
  2. the update minimises, with one fresh set of (t, eps) draws per step shared by both conditions,
       L(theta) = L_retain(theta) + weight * mean_i [relu(cap - L_i(theta; c_i)) + relu(cap - L_i(theta; c_i + delta_i))] / 2
     L_i: the denoising loss of targeted image i (bordered) under a condition; L_retain: the mean
     denoising loss of the retain images under their own conditions (the training loss).

`cap` is the level a targeted image's loss is raised to and no further: the hinge stops the ascent there
(plain gradient ascent on L_i has no floor and wrecks the model). The sweep sets it to the held-out
images' mean loss on the starting model, the loss of an image the model never saw. The hinge and this
cap are this implementation's choices (the paper's exact objective could not be consulted): docs/dori.md.

`finetune` is a pure function of its inputs (any denoiser `(params, x_t, t, condition) -> eps`) plus an
optional Orbax checkpoint directory: killed and re-run, it resumes from the last checkpoint and ends
with the same parameters bit for bit (every step's randomness is fold_in(seed, step)).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from solidmark_jax.config import section_items
from solidmark_jax.diffusion import schedule as schedule_lib
from solidmark_jax.diffusion.schedule import NoiseSchedule
from solidmark_jax.evaluation import dori
from solidmark_jax.training import checkpoint as ckpt

log = logging.getLogger(__name__)

Denoiser = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]
FORMAT = "solidmark-adversarial-finetune/1"
_CONFIG_FIELDS = ("learning_rate", "trigger_steps", "trigger_learning_rate", "trigger_max_norm", "weight",
                  "cap", "draws", "targets", "checkpoint_every", "seed")


def _is_int(v: Any) -> bool:
  return not isinstance(v, bool) and isinstance(v, (int, np.integer))


def _positive(v: Any) -> bool:
  return not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(v) and v > 0


@dataclasses.dataclass(frozen=True)
class AdversarialSpec:
  """The settings of one adversarial fine-tuning.

  Attributes:
    steps: outer (fine-tuning) steps, >= 1.
    learning_rate: Adam's step size for the UNet, > 0.
    trigger_steps: Adam steps of each outer step's trigger search (DoRI's, one (t, eps) draw per Adam
      step: the outer step repeats the search anyway), >= 1.
    trigger_learning_rate: the trigger search's step size, > 0.
    trigger_max_norm: the l2 bound of a trigger (> 0) or None (unbounded, as the evaluation's DoRI search).
    weight: the weight of the targeted images' hinge against the retain loss, > 0.
    cap: the loss level a targeted image is raised to (> 0); None: given to `finetune` (the sweep
      measures the held-out images' loss).
    draws: (t, eps) draws per image per step, >= 1.
    targets: the sweep's targeted images: the first `targets` members by instance id (>= 1); the rest of
      the members are the retain set. `finetune` itself takes the two sets as arrays.
    checkpoint_every: outer steps between checkpoints (>= 1; the last step is always saved).
    seed: seeds the steps' draws and trigger searches.
  """

  steps: int = 100
  learning_rate: float = 1e-4
  trigger_steps: int = 10
  trigger_learning_rate: float = 0.01
  trigger_max_norm: float | None = None
  weight: float = 1.0
  cap: float | None = None
  draws: int = 4
  targets: int = 8
  checkpoint_every: int = 25
  seed: int = 0

  def __post_init__(self):
    self.validate()

  def validate(self, field: str = "adversarial") -> None:
    """Raises a ValueError naming `field`.<name> for a bad setting."""
    for name in ("steps", "trigger_steps", "draws", "targets", "checkpoint_every"):
      v = getattr(self, name)
      if not _is_int(v) or v < 1:
        raise ValueError(f"{field}.{name} must be an integer >= 1, got {v!r}")
    for name in ("learning_rate", "trigger_learning_rate", "weight"):
      v = getattr(self, name)
      if not _positive(v):
        raise ValueError(f"{field}.{name} must be a finite number > 0, got {v!r}")
    for name in ("trigger_max_norm", "cap"):
      v = getattr(self, name)
      if v is not None and not _positive(v):
        raise ValueError(f"{field}.{name} must be a finite number > 0 or None, got {v!r}")
    if not _is_int(self.seed) or self.seed < 0:
      raise ValueError(f"{field}.seed must be an integer >= 0, got {self.seed!r}")

  @property
  def trigger(self) -> dori.DoriSpec:
    """The inner search: DoRI's denoising-loss search with this spec's steps, rate and bound."""
    return dori.DoriSpec(steps=self.trigger_steps, learning_rate=self.trigger_learning_rate,
                         max_norm=self.trigger_max_norm, seed=self.seed, draws=1, eval_draws=1)

  def replace(self, **changes) -> "AdversarialSpec":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_config(cls, section: Any, field: str = "eval.adversarial") -> "AdversarialSpec":
    """The spec of `config.eval.adversarial`; bad values are errors naming `field`.<name>."""
    items = section_items(section, field, _CONFIG_FIELDS)
    try:
      return cls(**items)
    except ValueError as e:
      raise ValueError(str(e).replace("adversarial.", f"{field}.", 1)) from None

  def as_record(self) -> dict:
    return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# One outer step.


def _losses(denoiser, params, sched, x0, c, ids, key, draws: int, prediction_type: str):
  """Per image the denoising loss on `draws` draws seeded by fold_in(key, id) -> [N]."""
  def one(x, cond, image_id):
    t, eps = dori.loss_draws(jax.random.fold_in(key, image_id), draws, x.shape, 0, sched.num_steps)
    return dori.image_loss(denoiser, params, sched, x, cond, t, eps, prediction_type)
  return jax.vmap(one)(x0, c, ids)


def _outer_step(denoiser, tx, sched, state, data, cap, seed, hyper, trigger: dori.DoriSpec, draws: int,
                prediction_type: str):
  params, step = state["params"], state["step"]
  key = jax.random.fold_in(jax.random.key(seed), step)
  k_trigger, k_forget, k_retain = jax.random.split(key, 3)
  delta, _ = dori.dori_search(denoiser, params, sched, data["forget_x0"], data["forget_c"], k_trigger, trigger,
                              ids=data["forget_ids"], prediction_type=prediction_type)
  delta = jax.lax.stop_gradient(delta)  # the triggers of theta_s, constants of the update

  def objective(p):
    fx, fc, fi = data["forget_x0"], data["forget_c"], data["forget_ids"]
    plain = _losses(denoiser, p, sched, fx, fc, fi, k_forget, draws, prediction_type)  # [N_f]
    triggered = _losses(denoiser, p, sched, fx, fc + delta, fi, k_forget, draws, prediction_type)  # same draws
    hinge = 0.5 * jnp.mean(jax.nn.relu(cap - plain) + jax.nn.relu(cap - triggered))
    retain = jnp.mean(_losses(denoiser, p, sched, data["retain_x0"], data["retain_c"], data["retain_ids"], k_retain,
                              draws, prediction_type))
    return retain + hyper["weight"] * hinge, {"retain_loss": retain, "forget_loss": jnp.mean(plain),
                                             "trigger_loss": jnp.mean(triggered), "hinge": hinge}

  (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
  updates, opt_state = tx.update(grads, state["opt_state"], params)
  new = {"params": optax.apply_updates(params, updates), "opt_state": opt_state, "step": step + 1}
  return new, {"loss": loss, **metrics, "trigger_norm": jnp.mean(jnp.sqrt(jnp.sum(
      jnp.square(delta.reshape(delta.shape[0], -1)), axis=1)))}


_outer_jit = jax.jit(_outer_step, static_argnames=("denoiser", "tx", "trigger", "draws", "prediction_type"),
                     donate_argnames=("state",))


# ---------------------------------------------------------------------------------------------
# The loop.


def _inputs_hash(params: Any, data: dict) -> str:
  """A fingerprint of the starting parameters and the two sets: a checkpoint of other inputs is refused."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves((params, data)):
    a = np.asarray(jax.device_get(leaf))
    h.update(str((a.shape, a.dtype.str)).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def _check_set(name: str, x0: Any, c: Any, ids: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
  x0, c = jnp.asarray(x0, jnp.float32), jnp.asarray(c)
  if x0.ndim != 4 or x0.shape[0] < 1:
    raise ValueError(f"finetune: {name} images must be [N >= 1, H, W, C] in model space, got shape {x0.shape}")
  if not jnp.issubdtype(c.dtype, jnp.floating) or c.ndim < 2 or c.shape[0] != x0.shape[0]:
    raise ValueError(f"finetune: {name} conditions must be float embeddings [N, ...] with N = {x0.shape[0]} "
                     f"(a trigger perturbs them), got {c.dtype} {c.shape}")
  ids = jnp.arange(x0.shape[0], dtype=jnp.int32) if ids is None else jnp.asarray(ids, jnp.int32)
  if ids.shape != (x0.shape[0],):
    raise ValueError(f"finetune: {name} ids must be [{x0.shape[0]}], got shape {ids.shape}")
  return x0, c.astype(jnp.float32), ids


def finetune(denoiser: Denoiser, params: Any, sched: NoiseSchedule, forget: tuple, retain: tuple,
             spec: AdversarialSpec, *, cap: float | None = None, directory: str | None = None,
             prediction_type: str = "epsilon", progress: bool = True,
             on_step: Callable[[int, dict], None] | None = None) -> tuple[Any, dict]:
  """Adversarial fine-tuning of `params` against DoRI's triggers for the `forget` images.

  Args:
    denoiser: `(params, x_t [B, H, W, C], t [B] int32, condition [B, ...]) -> eps_hat` (or v_hat, see
      `prediction_type`); a jit static argument.
    params: the starting parameters (every leaf is fine-tuned; pass only the UNet's).
    sched: the training noise schedule.
    forget: (x0 [N, H, W, C] bordered images, c [N, ...] their condition embeddings, ids [N] or None):
      the targeted images.
    retain: (x0, c, ids) likewise: the images whose denoising loss must stay.
    spec: the settings.
    cap: the loss a targeted image is raised to (overrides `spec.cap`; one of them must be set).
    directory: an Orbax checkpoint directory; a re-run with the same inputs resumes from its latest step,
      other inputs there are a ValueError. None: no checkpoints.
    prediction_type: "epsilon" or "v_prediction" (the loss is on the training target).
    progress: a tqdm bar over the steps.
    on_step: called as on_step(step, metrics) after every step (host floats): for logs and tests.

  Returns:
    The fine-tuned parameters and a record: the spec, the cap, the steps done, and per step the loss,
    retain loss, targeted loss (plain and triggered), hinge and mean trigger norm ("history").
  """
  if not isinstance(spec, AdversarialSpec):
    raise TypeError(f"finetune: spec must be an AdversarialSpec, got {type(spec).__name__}")
  schedule_lib.check_prediction_type(prediction_type)
  cap = spec.cap if cap is None else cap
  if cap is None or not _positive(cap):
    raise ValueError(f"finetune: the cap (the loss a targeted image is raised to) must be a finite number > 0, got "
                     f"{cap!r}; set adversarial.cap or pass cap=")
  fx, fc, fi = _check_set("forget", *forget)
  rx, rc, ri = _check_set("retain", *retain)
  if fx.shape[1:] != rx.shape[1:] or fc.shape[1:] != rc.shape[1:]:
    raise ValueError(f"finetune: forget and retain sets differ in shape: images {fx.shape[1:]} vs {rx.shape[1:]}, "
                     f"conditions {fc.shape[1:]} vs {rc.shape[1:]}")
  data = {"forget_x0": fx, "forget_c": fc, "forget_ids": fi, "retain_x0": rx, "retain_c": rc, "retain_ids": ri}
  tx = optax.adam(spec.learning_rate)
  params = jax.tree.map(jnp.array, params)  # a copy: the step donates its state
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}
  record = {"format": FORMAT, "spec": spec.as_record(), "cap": float(cap),
            "inputs": _inputs_hash(params, data), "history": []}

  checkpointer = None
  if directory is not None:
    checkpointer = ckpt.Checkpointer(directory, save_every=spec.checkpoint_every, keep=2)
    latest = checkpointer.latest_step()
    if latest is not None:
      meta = checkpointer.read_meta(latest)
      mismatched = [k for k in ("format", "spec", "cap", "inputs") if meta.get(k) != record[k]]
      if mismatched:
        raise ValueError(f"{directory}: checkpoint {latest} is of another fine-tuning (differs in "
                         f"{', '.join(mismatched)}); use another directory or the same settings and inputs")
      abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
      state = checkpointer.restore_state(latest, abstract)
      record["history"] = list(meta["history"])
      log.info("%s: resuming adversarial fine-tuning at step %d of %d", directory, latest, spec.steps)

  hyper = {"weight": jnp.float32(spec.weight)}
  start = int(state["step"])
  bar = tqdm(total=spec.steps, initial=start, desc="adversarial fine-tuning", unit="step", dynamic_ncols=True,
             disable=not progress or jax.process_index() != 0)
  try:
    for step in range(start, spec.steps):
      state, metrics = _outer_jit(denoiser, tx, sched, state, data, jnp.float32(cap), spec.seed, hyper, spec.trigger,
                                  spec.draws, prediction_type)
      metrics = {k: float(v) for k, v in metrics.items()}
      record["history"].append(metrics)
      bar.update(1)
      bar.set_postfix(retain=f"{metrics['retain_loss']:.4f}", forget=f"{metrics['forget_loss']:.4f}")
      done = step + 1
      if checkpointer is not None and (done % spec.checkpoint_every == 0 or done == spec.steps):
        checkpointer.save(done, state, {**record, "step": done}, force=True)
        checkpointer.wait()  # committed before the next step: a kill loses at most the steps since
      if on_step is not None:
        on_step(done, metrics)
  finally:
    bar.close()
    if checkpointer is not None:
      checkpointer.close()
  record["steps_done"] = int(state["step"])
  return state["params"], record


def finetune_record(record: dict) -> dict:
  """The part of `finetune`'s record a report keeps: the spec, cap, steps, first and last step's metrics."""
  history = record.get("history") or []
  return {"spec": record["spec"], "cap": record["cap"], "steps_done": record.get("steps_done"),
          "first": history[0] if history else None, "last": history[-1] if history else None}

