"""The pure train step over a dict state (`training.state`): epsilon (or v) prediction, MSE, EMA."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from solidmark_jax.diffusion import NoiseSchedule, check_prediction_type, q_sample, training_target

State = dict  # {"step": int32 [], "params", "ema_params", "opt_state"}: `training.state` builds it


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
  """EMA decay with the usual warm-up, min(decay, (1 + step) / (10 + step))."""
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


Prepare = Callable[[Any, dict, jax.Array], tuple[jax.Array, jax.Array, Any]]


def default_prepare(null_id: int) -> Prepare:
  """Pixel models with condition ids: x0 = batch["image"], condition = batch["condition"]."""

  def prepare(frozen, batch, rng):  # pylint: disable=unused-argument
    return batch["image"], batch["condition"], null_id

  return prepare


def make_train_step(apply_fn: Callable[..., jax.Array], sched: NoiseSchedule,
                    tx: optax.GradientTransformation, *, ema_decay: float, cond_dropout: float,
                    null_id: int | None = None, prepare: Prepare | None = None,
                    prediction_type: str = "epsilon") -> Callable[..., tuple[State, dict]]:
  """Builds train_step(state, batch, rng, frozen=None) -> (state, metrics).

  Args:
    apply_fn: (params, x_t [B,h,w,c], t [B], condition) -> eps_hat (or v_hat) [B,h,w,c]; condition
      is ids [B] or embeddings [B, L, D].
    sched: the training noise schedule.
    tx: the optimizer.
    ema_decay: EMA decay of the parameters used for evaluation.
    cond_dropout: probability of replacing a condition by the null condition (classifier-free
      guidance; for text, the empty caption).
    null_id: the null condition id (models with a condition table; ignored with `prepare`).
    prepare: (frozen, batch, rng) -> (x0, condition, null_condition): what the UNet denoises and is
      conditioned on, computed from the batch with frozen parameters (the VAE encoder of latent models,
      the text encoder); default: the batch's "image" and "condition" ids, `null_id`.
    prediction_type: "epsilon" (the loss is ||eps_hat - eps||^2) or "v_prediction" (the model
      predicts v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0, the loss is ||v_hat - v||^2).

  `frozen` holds the parameters `prepare` uses (never trained; None for pixel models with ids).
  """
  check_prediction_type(prediction_type)
  if prepare is None:
    if null_id is None:
      raise ValueError("make_train_step needs null_id or prepare")
    prepare = default_prepare(null_id)

  def train_step(state: State, batch: dict, rng: jax.Array, frozen=None) -> tuple[State, dict]:
    rng = jax.random.fold_in(rng, state["step"])
    r_t, r_eps, r_drop = jax.random.split(rng, 3)
    r_prep = jax.random.fold_in(rng, 0x9E9)  # e.g. VAE posterior samples
    x0, cond, null = prepare(frozen, batch, r_prep)  # x0 [B, h, w, c]
    b = x0.shape[0]
    t = jax.random.randint(r_t, (b,), 0, sched.num_steps)
    eps = jax.random.normal(r_eps, x0.shape, x0.dtype)
    x_t = q_sample(sched, x0, t, eps)
    target = training_target(sched, prediction_type, x0, t, eps)  # eps, or v
    drop = jax.random.uniform(r_drop, (b,)) < cond_dropout
    drop = drop.reshape((b,) + (1,) * (cond.ndim - 1))
    cond = jnp.where(drop, jnp.asarray(null, cond.dtype), cond)

    def loss_fn(params):
      pred = apply_fn(params, x_t, t, cond)  # any compute dtype: the loss is taken in float32
      return jnp.mean(jnp.square(pred.astype(jnp.float32) - target))

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    d = ema_decay_at(state["step"], ema_decay)
    ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state["ema_params"], params)
    new_state = {"step": state["step"] + 1, "params": params, "ema_params": ema, "opt_state": opt_state}
    return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

  return train_step
