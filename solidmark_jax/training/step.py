"""Train state and the pure train step: epsilon prediction, MSE, AdamW, EMA."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from solidmark_jax.diffusion import NoiseSchedule, q_sample

State = dict  # {"step": int32 [], "params", "ema_params", "opt_state"}


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  """AdamW with linear warm-up and global-norm clipping."""
  lr = optax.linear_schedule(0.0, train_cfg.learning_rate, max(int(train_cfg.warmup_steps), 1))
  return optax.chain(
      optax.clip_by_global_norm(train_cfg.grad_clip),
      optax.adamw(lr, b1=0.9, b2=0.999, weight_decay=train_cfg.weight_decay),
  )


def learning_rate(train_cfg, step: int) -> float:
  return float(train_cfg.learning_rate * min(1.0, step / max(int(train_cfg.warmup_steps), 1)))


def init_state(params, tx: optax.GradientTransformation) -> State:
  return {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "ema_params": jax.tree.map(jnp.copy, params),
      "opt_state": tx.init(params),
  }


def ema_decay_at(step, decay: float):
  """EMA decay with the usual warm-up, min(decay, (1 + step) / (10 + step))."""
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def make_train_step(apply_fn: Callable[..., jax.Array], sched: NoiseSchedule,
                    tx: optax.GradientTransformation, *, ema_decay: float, cond_dropout: float,
                    null_id: int) -> Callable[[State, dict, jax.Array], tuple[State, dict]]:
  """Builds train_step(state, batch, rng) -> (state, metrics).

  Args:
    apply_fn: (params, x_t [B,H,W,C], t [B], condition [B]) -> eps_hat [B,H,W,C].
    sched: the training noise schedule.
    tx: the optimizer.
    ema_decay: EMA decay of the parameters used for evaluation.
    cond_dropout: probability of replacing a condition by the null id (classifier-free guidance).
    null_id: the null condition id.

  `batch` holds "image" ([B,H,W,C] marked, model space) and "condition" ([B] int).
  """

  def train_step(state: State, batch: dict, rng: jax.Array) -> tuple[State, dict]:
    rng = jax.random.fold_in(rng, state["step"])
    r_t, r_eps, r_drop = jax.random.split(rng, 3)
    x0 = batch["image"]  # [B, H, W, C]
    b = x0.shape[0]
    t = jax.random.randint(r_t, (b,), 0, sched.num_steps)
    eps = jax.random.normal(r_eps, x0.shape, x0.dtype)
    x_t = q_sample(sched, x0, t, eps)
    drop = jax.random.uniform(r_drop, (b,)) < cond_dropout
    cond = jnp.where(drop, null_id, batch["condition"])

    def loss_fn(params):
      eps_hat = apply_fn(params, x_t, t, cond)
      return jnp.mean(jnp.square(eps_hat - eps))

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    d = ema_decay_at(state["step"], ema_decay)
    ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state["ema_params"], params)
    new_state = {"step": state["step"] + 1, "params": params, "ema_params": ema, "opt_state": opt_state}
    return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

  return train_step
