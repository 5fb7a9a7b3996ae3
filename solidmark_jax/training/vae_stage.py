"""Stage 1 of a latent model: a fresh VAE trained on the bordered (marked) training images.

The loss is a reconstruction term plus a small KL term (Kingma & Welling 2014; Rombach et al. 2022
weight it by ~1e-6), on posterior samples z ~ q(z | x):

  L = mean |D(z) - x|  (or mean (D(z) - x)^2, `vae.reconstruction = "l2"`)
      + kl_weight * mean_b sum_{h,w,c} KL(q(z | x_b) || N(0, I))

Stable Diffusion's VAE also has a perceptual (LPIPS) and an adversarial (patch-GAN) term; they are
left out here on purpose: they sharpen textures, while what SolidMark needs from the VAE is that a
solid border of intensity k decodes back to k, which the pixel loss alone already asks for.

After training, the latent scale is measured (when `vae.scaling_factor` is None) as
1 / std of posterior samples of the first batches of training images (as for Stable Diffusion's
0.18215), and the VAE is written in diffusers format to <workdir>/vae/ (`models.vae.save_vae`),
with `solidmark_vae.json` in it recording the scaling factor, the steps and what it was trained on;
the folder appears in one rename, complete. The stage is resumable: Orbax checkpoints go to
<workdir>/vae_checkpoints/; a re-run continues from the last one, and a finished stage (vae/ there,
its steps reached) is not redone; a larger `vae.train_steps` continues it.

Multi-host: every process trains (its own rows of each batch); process 0 writes vae/; the workdir
must be on a file system every process sees, as for the UNet's checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from numpy.typing import ArrayLike
import optax
from jax.experimental import multihost_utils
from tqdm import tqdm

from solidmark_jax import atomic, parallel
from solidmark_jax.config import default_config
from solidmark_jax.data.instances import BatchPlan
from solidmark_jax.models.vae import VAE, abstract_vae_params, build_vae, init_vae_params, load_vae, save_vae
from solidmark_jax.training import checkpoint as ckpt
from solidmark_jax.training.preemption import PreemptionGuard
from solidmark_jax.workdir import Workdir

log = logging.getLogger(__name__)

STAGE_FILE = "solidmark_vae.json"
RECONSTRUCTION = ("l1", "l2")
SCALE_BATCHES = 4  # batches of training images the scaling factor is measured on
# Config fields that define the stage-1 VAE; a workdir's VAE of other values is an error.
VAE_FIELDS = ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups", "batch_size",
              "learning_rate", "kl_weight", "reconstruction", "scaling_factor")

State = dict  # {"step": int32 [], "params", "opt_state"}


# ---------------------------------------------------------------------------------------------
# The pure parts: loss and step.


def vae_loss(vae: VAE, params: Any, x: ArrayLike, rng: jax.Array, *, kl_weight: float,
             reconstruction: str = "l1") -> Any:
  """Stage-1 loss of images x [B, H, W, C] (model space) -> (loss [], metrics dict)."""
  mean, logvar = vae.posterior(params, x)  # [B, h, w, c] each
  logvar = jnp.clip(logvar, -30.0, 20.0)
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
  x_hat = vae.decode_unscaled(params, z)  # [B, H, W, C]
  err = x_hat - x
  recon = jnp.mean(jnp.abs(err)) if reconstruction == "l1" else jnp.mean(jnp.square(err))
  kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))  # [B]
  kl = jnp.mean(kl)
  return recon + kl_weight * kl, {"reconstruction": recon, "kl": kl}


def make_vae_optimizer(vae_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam at `vae.learning_rate` with global-norm clipping at 1."""
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(float(vae_cfg.learning_rate)))


def init_vae_state(params: Any, tx: optax.GradientTransformation) -> State:
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def make_vae_train_step(vae: VAE, tx: optax.GradientTransformation, *, kl_weight: float,
                        reconstruction: str = "l1") -> Callable[[State, jax.Array, jax.Array], tuple[State, dict]]:
  """Builds step(state, images [B, H, W, C], rng) -> (state, metrics) (pure; jit it with shardings)."""
  if reconstruction not in RECONSTRUCTION:
    raise ValueError(f"vae.reconstruction must be one of {RECONSTRUCTION}, got {reconstruction!r}")

  def step(state: State, images, rng):
    rng = jax.random.fold_in(rng, state["step"])
    loss_fn = lambda p: vae_loss(vae, p, images, rng, kl_weight=kl_weight, reconstruction=reconstruction)
    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
    return new, {"loss": loss, **parts, "grad_norm": optax.global_norm(grads)}

  return step


def latent_moments(vae: VAE, params: Any, images: jax.Array, rng: jax.Array) -> Any:
  """(sum, sum of squares, count) of unscaled posterior samples of images [B, H, W, C]."""
  z = vae.with_scaling_factor(1.0).encode(params, images, rng)  # [B, h, w, c]
  return jnp.sum(z), jnp.sum(jnp.square(z)), jnp.asarray(z.size, jnp.float32)


# ---------------------------------------------------------------------------------------------
# The stage.


def stage_fingerprint_fields(config: ml_collections.ConfigDict) -> dict:
  """What the stage-1 VAE depends on: its `vae` fields, the training data, the marks and the seed."""
  out = {"vae": {k: config.vae.get(k, None) for k in VAE_FIELDS}, "marks": config.marks.to_dict(),
         "data": {k: config.data.get(k) for k in ckpt.FINGERPRINT_DATA_FIELDS}, "seed": config.seed}
  return json.loads(json.dumps(out, sort_keys=True, default=str))


def _differences(stored: dict, current: dict, prefix: str = "", defaults: dict | None = None) -> list[str]:
  """Fields where the stored record and the config differ.

  A field the record lacks (added to the project after the stage ran, e.g. marks.num_keys) counts as
  equal when the config holds its default (`defaults`), which reproduces what the older code did.
  """
  out = []
  for k in sorted(set(stored) | set(current)):
    a, b = stored.get(k), current.get(k)
    d = defaults.get(k) if isinstance(defaults, dict) else None
    if isinstance(a, dict) and isinstance(b, dict):
      out += _differences(a, b, f"{prefix}{k}.", d if isinstance(d, dict) else None)
    elif k not in stored and isinstance(defaults, dict) and k in defaults and b == d:
      continue
    elif a != b:
      out.append(f"{prefix}{k}: workdir {a!r} vs config {b!r}")
  return out


def _check_same(what: str, record: dict, config, keymap_hash: str | None) -> None:
  diffs = _differences(record.get("fingerprint_fields", {}), stage_fingerprint_fields(config),
                       defaults=stage_fingerprint_fields(default_config()))
  if diffs:
    raise ValueError(f"{what} was trained with a different config; differing fields:\n  " + "\n  ".join(diffs)
                     + "\nUse another --workdir, or the config it was trained with.")
  if keymap_hash is not None and record.get("keymap_hash") not in (None, keymap_hash):
    raise ValueError(f"{what} was trained on images marked with keymap {str(record.get('keymap_hash'))[:16]}..., "
                     f"this config's keymap is {keymap_hash[:16]}...")


def read_stage_record(workdir: str) -> dict | None:
  """The finished stage's record <workdir>/vae/solidmark_vae.json, or None."""
  path = os.path.join(Workdir(workdir).vae, STAGE_FILE)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _make_record(config, steps: int, keymap_hash: str | None, scaling_factor: float, measured: bool,
                 metrics: dict) -> dict:
  return {"format": "solidmark-vae/1", "steps": int(steps), "scaling_factor": float(scaling_factor),
          "scaling_factor_measured": bool(measured), "keymap_hash": keymap_hash,
          "fingerprint_fields": stage_fingerprint_fields(config), "final_metrics": metrics}


def train_vae(exp: Any, workdir: str, *, mesh: Any = None) -> tuple[VAE, dict]:
  """Stage 1: trains (or resumes, or just loads) the VAE of a latent model; returns (VAE, params).

  With `vae.pretrained` set nothing is trained: that VAE is loaded (its scaling factor, unless
  `vae.scaling_factor` overrides it).

  Args:
    exp: the `experiment.Experiment` (anything with `config`, `read_marked(instance_ids)["image"]`,
      `instances`, `image_size`, `channels` and optionally `keymap.hash`). Config sections used:
      vae, data, marks, seed, mesh, train.checkpoint_every and train.log_every.
    workdir: the run's directory; the VAE goes to <workdir>/vae/ (written last, in one rename: its
      presence means stage 1 is finished), checkpoints to <workdir>/vae_checkpoints/.
    mesh: the device mesh (default: from `config.mesh`).

  Returns:
    (VAE with its scaling factor, params as numpy arrays).

  Raises:
    preemption.Preempted: SIGTERM / SIGINT arrived; the checkpoint of the step it stopped after is
      written, a re-run resumes from it.
  """
  with PreemptionGuard() as guard:
    return _train_vae(exp, workdir, mesh, guard)


def _train_vae(exp, workdir: str, mesh, guard: PreemptionGuard) -> tuple[VAE, dict]:
  config = exp.config
  vcfg = config.vae
  if vcfg.get("pretrained"):
    return load_vae(vcfg.pretrained, scaling_factor=vcfg.get("scaling_factor"))
  workdir = os.path.abspath(workdir)
  keymap_hash = getattr(getattr(exp, "keymap", None), "hash", None)
  folder = Workdir(workdir).vae
  record = read_stage_record(workdir)
  if record is not None:
    _check_same(os.path.join(folder, STAGE_FILE), record, config, keymap_hash)
    if record["steps"] >= int(vcfg.train_steps):
      log.info("stage 1 done before: VAE of %d steps in %s", record["steps"], folder)
      return load_vae(folder)

  mesh = mesh or parallel.mesh_for_config(config.mesh)
  num = len(exp.instances)
  batch = int(vcfg.batch_size)
  if batch > num:
    raise ValueError(f"vae.batch_size={batch} is larger than the {num} training instances")
  parallel.check_batch_size(batch, mesh, what="vae.batch_size")
  vae = build_vae(vcfg, exp.channels, exp.image_size).with_scaling_factor(1.0)
  reconstruction = vcfg.get("reconstruction", None) or "l1"
  tx = make_vae_optimizer(vcfg)
  abstract = jax.eval_shape(lambda: init_vae_state(abstract_vae_params(vae, exp.image_size), tx))
  shardings = parallel.state_shardings(mesh, abstract)

  checkpointer = ckpt.Checkpointer(Workdir(workdir).vae_checkpoints,
                                   save_every=int(vcfg.get("checkpoint_every", None) or config.train.checkpoint_every),
                                   keep=2)
  try:
    latest = checkpointer.latest_step()
    if latest is None:
      host = init_vae_params(vae, config.seed + 11, exp.image_size)  # numpy, the same on every process
      params = jax.tree.map(lambda a, s: jax.make_array_from_callback(a.shape, s, lambda idx: a[idx]), host,
                            shardings["params"])
      state = jax.jit(lambda p: init_vae_state(p, tx), out_shardings=shardings)(params)
    else:
      _check_same(f"{checkpointer.directory}: checkpoint {latest}", checkpointer.read_meta(latest), config,
                  keymap_hash)
      target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
      state = checkpointer.restore_state(latest, target)
      log.info("stage 1 resumed from VAE checkpoint %d", int(state["step"]))
  except BaseException:
    checkpointer.close()
    raise

  plan = BatchPlan(num, batch, config.seed + 11, jax.process_index(), jax.process_count())
  batch_sharding, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  step_fn = jax.jit(make_vae_train_step(vae, tx, kl_weight=float(vcfg.kl_weight), reconstruction=reconstruction),
                    in_shardings=(shardings, batch_sharding, rep), out_shardings=(shardings, rep),
                    donate_argnums=(0,))
  load = lambda b: parallel.global_batch(mesh, np.asarray(exp.read_marked(plan.local_rows(b))["image"], np.float32))
  rng = jax.random.key(config.seed + 12)
  start, total = int(state["step"]), int(vcfg.train_steps)
  metrics = {}
  bar = tqdm(total=total, initial=start, desc="vae", unit="step", dynamic_ncols=True,
             disable=jax.process_index() != 0)
  t0 = time.perf_counter()
  preempted = None
  if start < total:
    log.info("stage 1: training the VAE, steps %d to %d", start + 1, total)
  try:
    for step in range(start, total):
      state, out = step_fn(state, load(step), rng)
      done = step + 1
      bar.update(1)
      if done % int(config.train.log_every) == 0 or done == total:
        metrics = {k: float(v) for k, v in jax.device_get(out).items()}
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", rec=f"{metrics['reconstruction']:.4f}")
      stop = guard.stop_requested() and done < total  # the same answer on every process
      if checkpointer.should_save(done) or done == total or stop:
        meta = {"format": "solidmark-vae-checkpoint/1", "step": done, "keymap_hash": keymap_hash,
                "fingerprint_fields": stage_fingerprint_fields(config)}
        checkpointer.save(done, state, meta, force=True)
      if stop:
        preempted = guard.preempted("stage 1 (VAE)", done, checkpointer.directory)
        break
  finally:
    bar.close()
    checkpointer.close()  # waits for the last checkpoint to be written
  if preempted is not None:
    log.warning("%s", preempted)
    raise preempted
  if total > start:
    dt = time.perf_counter() - t0
    log.info("stage 1: %d VAE steps in %.1f s (%.1f images/s), last %s", total - start, dt,
             (total - start) * batch / max(dt, 1e-9), metrics)
  steps_done = int(state["step"])

  measured = vcfg.get("scaling_factor") is None
  scale = float(vcfg.scaling_factor) if not measured else measure_scaling_factor(
      vae, state["params"], lambda b: load(b), min(SCALE_BATCHES, plan.batches_per_epoch), mesh,
      jax.random.key(config.seed + 13))
  vae = vae.with_scaling_factor(scale)
  params = parallel.to_host(state["params"])
  if jax.process_index() == 0:
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_vae(vae, params, tmp)
    record = _make_record(config, steps_done, keymap_hash, scale, measured, metrics)
    atomic.write_json(os.path.join(tmp, STAGE_FILE), record, indent=1, sort_keys=True, trailing_newline=False)
    shutil.rmtree(folder, ignore_errors=True)  # a shorter run's VAE, now extended
    os.rename(tmp, folder)  # one rename: vae/ exists only complete
    log.info("stage 1: VAE written to %s (scaling factor %.5f%s)", folder, scale, ", measured" if measured else "")
  if jax.process_count() > 1:  # the others may read vae/ next
    multihost_utils.sync_global_devices("solidmark_vae_stage_written")
  return vae, params


def measure_scaling_factor(vae: VAE, params: Any, load_batch: Callable[[int], jax.Array], num_batches: int, mesh: Any,
                           rng: jax.Array) -> float:
  """1 / std of posterior samples over `num_batches` global batches (sharded, summed on device)."""
  moments = jax.jit(lambda p, x, r: latent_moments(vae, p, x, r), out_shardings=parallel.replicated(mesh))
  s1 = s2 = n = 0.0
  for b in range(max(num_batches, 1)):
    a, b2, c = jax.device_get(moments(params, load_batch(b), jax.random.fold_in(rng, b)))
    s1, s2, n = s1 + float(a), s2 + float(b2), n + float(c)
  mean = s1 / n
  std = float(np.sqrt(max(s2 / n - mean * mean, 0.0)))
  if not std > 0:
    raise ValueError("stage 1: the VAE's latents have zero variance; cannot measure vae.scaling_factor")
  return 1.0 / std


def load_trained_vae(config: ml_collections.ConfigDict, workdir: str) -> tuple[VAE, dict]:
  """The latent model's VAE for evaluation and export: `vae.pretrained`, else <workdir>/vae/.

  Raises:
    FileNotFoundError: no stage-1 VAE in the workdir (train first).
    ValueError: the workdir's VAE was trained with another config.
  """
  vcfg = config.vae
  if vcfg.get("pretrained"):
    return load_vae(vcfg.pretrained, scaling_factor=vcfg.get("scaling_factor"))
  record = read_stage_record(os.path.abspath(workdir))
  folder = Workdir(workdir).vae
  if record is None:
    raise FileNotFoundError(f"{folder}: no finished stage-1 VAE ({STAGE_FILE} missing); train first "
                            f"(python train.py ... --workdir {workdir})")
  _check_same(os.path.join(folder, STAGE_FILE), record, config, None)
  return load_vae(folder)
