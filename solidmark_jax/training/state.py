"""The train state and what restores it: the optimiser, the dict state on its shardings, the frozen parts.

- `make_optimizer`, `init_state`, `create_state` (initialised straight onto the mesh, shapes from
  `jax.eval_shape`), `abstract_state` (the targets a checkpoint is restored onto).
- `restore_ema(exp, workdir, mesh, step)`: only the EMA parameters of a checkpoint (an Orbax partial
  restore: the optimiser state is never read), checked against the config and the keymap; what
  evaluation, generations, sweeps and export use.
- `load_frozen(exp, workdir, train=...)`: the frozen text encoder and VAE parameters, and the
  experiment with its VAE as loaded (a new `Experiment`; the given one is not changed).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from solidmark_jax import marks, parallel
from solidmark_jax.experiment import Experiment
from solidmark_jax.models import init_params, load_pretrained_unet_params
from solidmark_jax.training import checkpoint as ckpt
from solidmark_jax.training import vae_stage
from solidmark_jax.training.step import State
from solidmark_jax.workdir import Workdir


def make_optimizer(train_cfg: Any) -> optax.GradientTransformation:
  """AdamW with linear warm-up and global-norm clipping."""
  lr = optax.linear_schedule(0.0, train_cfg.learning_rate, max(int(train_cfg.warmup_steps), 1))
  return optax.chain(
      optax.clip_by_global_norm(train_cfg.grad_clip),
      optax.adamw(lr, b1=0.9, b2=0.999, weight_decay=train_cfg.weight_decay),
  )


def learning_rate(train_cfg: Any, step: int) -> float:
  return float(train_cfg.learning_rate * min(1.0, step / max(int(train_cfg.warmup_steps), 1)))


def init_state(params: Any, tx: optax.GradientTransformation) -> State:
  return {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "ema_params": jax.tree.map(jnp.copy, params),
      "opt_state": tx.init(params),
  }


def create_state(exp: Experiment, mesh: Mesh | None, tx: optax.GradientTransformation,
                 rng: jax.Array) -> tuple[State, Any]:
  """Initialises the train state directly onto its shardings (shapes from eval_shape).

  With `model.pretrained` the UNet starts from that local diffusers UNet (a condition table, if
  any, starts random).
  """
  pretrained = load_pretrained_unet_params(exp.config.model) if exp.config.model.get("pretrained") else None

  def init(r, unet=None):
    params = init_params(exp.model, r, exp.model_size, exp.model_channels)
    if unet is not None:
      params = {**params, "unet": unet}
    return init_state(params, tx)

  abstract = jax.eval_shape(init, rng)
  shardings = parallel.state_shardings(mesh, abstract)
  if pretrained is not None:
    expected = jax.tree.map(lambda a: a.shape, abstract["params"]["unet"])
    got = jax.tree.map(lambda a: a.shape, pretrained)
    if expected != got:
      raise ValueError(f"model.pretrained={exp.config.model.pretrained}: its UNet weights do not match its config")
    state = jax.jit(init, out_shardings=shardings)(rng, pretrained)
  else:
    state = jax.jit(init, out_shardings=shardings)(rng)
  return state, shardings


def abstract_state(exp: Experiment, mesh: Mesh | None, tx: optax.GradientTransformation) -> tuple[State, Any]:
  """ShapeDtypeStructs (with shardings) of the train state, for restoring; and the shardings."""

  def init(r):
    return init_state(init_params(exp.model, r, exp.model_size, exp.model_channels), tx)

  abstract = jax.eval_shape(init, jax.random.key(0))
  shardings = parallel.state_shardings(mesh, abstract)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings), shardings


def restore_ema(exp: Experiment, workdir: str, mesh: Mesh | None, step: int | None = None) -> tuple[Any, int, dict]:
  """The EMA parameters of checkpoint `step` (default: the latest), on the training shardings.

  Only `ema_params` is read (an Orbax partial restore). The checkpoint must be of this config
  (`checkpoint.Checkpointer.check_compatible`) and the workdir's keymap the one the config draws.

  Returns:
    (ema_params, step, the checkpoint's metadata).

  Raises:
    FileNotFoundError: no checkpoints in the workdir.
    ValueError: no checkpoint at `step`, another config, or another keymap.
  """
  layout = Workdir(workdir)
  directory = layout.checkpoints
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory}: no checkpoints here; train first (python train.py ... --workdir {workdir})")
  checkpointer = ckpt.Checkpointer(directory, create=False)
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise FileNotFoundError(f"{directory}: no checkpoints here; train first")
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise ValueError(f"{directory}: no checkpoint at step {step}; there are {sorted(steps)}")
    meta = checkpointer.check_compatible(step, exp.config, keymap_hash=None)
    stored = marks.Keymap.load(layout.keymap, expected_hash=meta["keymap_hash"])
    if stored.hash != exp.keymap.hash:
      raise ValueError(f"{layout.keymap}: the keymap the model was trained with differs from the one this config "
                       "draws (data, subset, duplication or key seed changed)")
    target, _ = abstract_state(exp, mesh, make_optimizer(exp.config.train))
    ema = checkpointer.restore_subtree(step, {"ema_params": target["ema_params"]})["ema_params"]
  finally:
    checkpointer.close()
  return ema, step, meta


def load_frozen(exp: Experiment, workdir: str, *, train: bool, mesh: Mesh | None = None) -> tuple[Experiment, dict]:
  """The frozen parameters of latent / text models, and the experiment with its VAE as loaded.

  Returns:
    (exp, frozen): `frozen` is {"text", "text_null", "vae"} (empty for pixel models with ids); `exp`
    is a new `Experiment` whose `vae` is the loaded one (the scaling factor measured at stage 1), or
    the given one unchanged for pixel models. The VAE comes from `vae.pretrained`, or from the
    workdir's stage-1 result (`DIR/vae/`), which training produces first when it is missing
    (`training.vae_stage`); evaluation (`train=False`) needs it there.
  """
  frozen = {}
  if exp.is_text:
    frozen["text"] = exp.text.params
    # the empty caption's embedding [L, D]: the null condition, computed once here, not per train step
    null_ids = np.asarray(exp.text.null_ids, np.int32)[None]
    frozen["text_null"] = np.asarray(exp.text.encode(exp.text.params, null_ids))[0]
  if exp.is_latent:
    if train:  # runs (or resumes, or just checks) stage 1, or loads vae.pretrained
      vae, frozen["vae"] = vae_stage.train_vae(exp, workdir, mesh=mesh)
    else:
      vae, frozen["vae"] = vae_stage.load_trained_vae(exp.config, workdir)
    exp = dataclasses.replace(exp, vae=vae.with_dtype(exp.config.model.get("dtype", "float32")))  # stage 1: float32
  return exp, frozen
