"""The training loop: sharded steps over a mesh, checkpoints, logs, sample grids."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm import tqdm

from solidmark_jax import dirlock, parallel
from solidmark_jax.data.instances import BatchPlan
from solidmark_jax.experiment import Experiment, build_experiment, encode_conditions, make_outpainter
from solidmark_jax.experiment import outpaint_params, sync_keymap
from solidmark_jax.models import as_denoiser, with_remat
from solidmark_jax.outpaint import SamplerSpec, sample
from solidmark_jax.report import write_sample_grid
from solidmark_jax.training import checkpoint as ckpt
from solidmark_jax.training.preemption import PreemptionGuard
from solidmark_jax.training.state import abstract_state, create_state, learning_rate, load_frozen, make_optimizer
from solidmark_jax.training.step import Prepare, make_train_step
from solidmark_jax.workdir import Workdir

log = logging.getLogger(__name__)


def make_prepare(exp: Experiment, cached_latents: bool = False) -> Prepare:
  """What the train step denoises and is conditioned on, from a batch and the frozen parameters.

  Latent models: x0 = a sample of the VAE posterior of the marked image (as Stable Diffusion
  trains), or the cached posterior mean (`vae.cache_latents`). Text models: the condition is the
  frozen text encoder's output for the caption's token ids; the null condition the empty caption's.
  """
  text, vae, null_id = exp.text, exp.vae, exp.null_id

  def prepare(frozen, batch, rng):
    if vae is None:
      x0 = batch["image"]
    elif cached_latents:
      x0 = batch["latent"]
    else:
      x0 = vae.encode(frozen["vae"], batch["image"], rng)  # [B, h, w, c]
    if text is None:
      return x0, batch["condition"], null_id
    cond = text.encode(frozen["text"], batch["condition"])  # [B, L, D]
    return x0, cond, frozen["text_null"]  # [L, D]

  return prepare


def jit_train_step(exp: Experiment, mesh: Mesh, tx: optax.GradientTransformation, state_shardings: Any,
                   batch_keys: tuple[str, ...] = ("image", "condition"),
                   cached_latents: bool = False) -> Callable:
  """train_step(state, batch, rng, frozen) jitted with the state's and the batch's shardings.

  The UNet recomputes its down / up blocks in the backward pass per `train.remat`.
  """
  cfg = exp.config.train
  model = with_remat(exp.model, cfg.get("remat", "none"))
  step = make_train_step(as_denoiser(model), exp.sched, tx, ema_decay=cfg.ema_decay, cond_dropout=cfg.cond_dropout,
                         prepare=make_prepare(exp, cached_latents), prediction_type=exp.prediction_type)
  rep = parallel.replicated(mesh)
  batch = parallel.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(state_shardings, {k: batch for k in batch_keys}, rep, rep),
                 out_shardings=(state_shardings, rep), donate_argnums=(0,))


class _Writer:
  """TensorBoard scalars on process 0 (tensorboardX); a no-op elsewhere."""

  def __init__(self, logdir: str | None):
    self._w = None
    if logdir and jax.process_index() == 0:
      from tensorboardX import SummaryWriter  # lazy: process 0 only, TensorBoard is optional
      self._w = SummaryWriter(logdir)

  def scalars(self, step: int, values: dict):
    if self._w:
      for k, v in values.items():
        self._w.add_scalar(k, float(v), step)
      self._w.flush()

  def close(self):
    if self._w:
      self._w.close()


def _prefetch(fn, items, depth: int = 2):
  """Runs fn over items on a worker thread, `depth` ahead of the consumer."""
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    futures = [pool.submit(fn, i) for i in items[:depth]]
    for j in range(len(items)):
      if j + depth < len(items):
        futures.append(pool.submit(fn, items[j + depth]))
      yield futures[j].result()
      futures[j] = None


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the model of `config` in `workdir`; returns the final metrics.

  A workdir holding checkpoints of another config or keymap is an error; a checkpoint that
  cannot be restored is an error (never a silent fresh start). A workdir another live process
  trains in is an error (`dirlock.DirectoryInUse`). SIGTERM / SIGINT stop the run after the
  current step, with a checkpoint of it, by raising `preemption.Preempted` (train.py then exits
  with `preemption.PREEMPTED_EXIT_CODE`); a re-run resumes from there.
  """
  workdir = os.path.abspath(workdir)
  with dirlock.hold(workdir, "training"), PreemptionGuard() as guard:
    return _train(config, workdir, guard)


def _train(config, workdir: str, guard: PreemptionGuard) -> dict:
  layout = Workdir(workdir)
  exp = build_experiment(config)
  cfg = config.train
  mesh = parallel.mesh_for_config(config.mesh)
  parallel.check_batch_size(cfg.batch_size, mesh)
  plan = BatchPlan(len(exp.instances), cfg.batch_size, config.seed, jax.process_index(), jax.process_count())

  checkpointer = ckpt.Checkpointer(layout.checkpoints, save_every=cfg.checkpoint_every,
                                   keep=cfg.keep_checkpoints)
  try:
    latest = checkpointer.latest_step()
    if latest is not None:
      checkpointer.check_compatible(latest, config, exp.keymap.hash)
    sync_keymap(exp, workdir, write=jax.process_index() == 0)

    tx = make_optimizer(cfg)
    if latest is None:
      state, shardings = create_state(exp, mesh, tx, jax.random.key(config.seed))
      start = 0
    else:
      target, shardings = abstract_state(exp, mesh, tx)
      state = checkpointer.restore_state(latest, target)
      start = int(state["step"])
      log.info("resumed from checkpoint %d in %s", start, workdir)
  except BaseException:
    checkpointer.close()  # a refused workdir leaves no Orbax threads behind
    raise
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
  log.info("%d instances, model %.2fM parameters, marked images %dx%dx%d (the UNet sees %dx%dx%d), mesh %s",
           len(exp.instances), n_params / 1e6, exp.image_size, exp.image_size, exp.channels, exp.model_size,
           exp.model_size, exp.model_channels, dict(mesh.shape))
  try:
    exp, frozen = load_frozen(exp, workdir, train=True, mesh=mesh)  # latent models: VAE stage 1 first if needed
    if exp.is_text and jax.process_index() == 0 and not os.path.isdir(layout.text):
      exp.text.save_pretrained(layout.text)  # for export
  except BaseException:
    checkpointer.close()
    raise
  frozen = jax.device_put(frozen, parallel.replicated(mesh))
  cached = exp.is_latent and bool(config.vae.get("cache_latents", False))
  latents = _cache_latents(exp, frozen, mesh, plan) if cached and start < cfg.num_steps else None
  keys = ("latent", "condition") if cached else ("image", "condition")
  train_step = jit_train_step(exp, mesh, tx, shardings, keys, cached)
  sampler = _sample_grid_fn(exp, mesh, frozen) if cfg.sample_every else None
  writer = _Writer(layout.tensorboard)
  rng = jax.random.key(config.seed + 1)

  def load(b):
    rows = plan.local_rows(b)
    if cached:
      return {"latent": latents[rows], "condition": exp.conditions[rows].astype(np.int32)}
    local = exp.read_marked(rows)
    return {"image": local["image"], "condition": local["condition"]}

  metrics = {}
  steps = list(range(start, cfg.num_steps))
  bar = tqdm(total=cfg.num_steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
             disable=jax.process_index() != 0)
  t_last, n_last = time.perf_counter(), start
  in_flight = None
  preempted = None
  if start < cfg.num_steps:
    log.info("training steps %d to %d", start + 1, cfg.num_steps)
  try:
    for step, local in zip(steps, _prefetch(load, steps)):
      batch = parallel.global_batch(mesh, local)
      state, out = train_step(state, batch, rng, frozen)
      if in_flight is not None:  # at most two steps queued: the bar shows finished steps, not dispatched ones
        jax.block_until_ready(in_flight)
      in_flight = out["loss"]
      done = step + 1
      bar.update(1)
      if done % cfg.log_every == 0 or done == cfg.num_steps:
        metrics = {k: float(v) for k, v in jax.device_get(out).items()}
        dt = time.perf_counter() - t_last
        rate = (done - n_last) / max(dt, 1e-9)
        metrics.update({"steps_per_s": rate, "images_per_s": rate * cfg.batch_size,
                        "learning_rate": learning_rate(cfg, done)})
        t_last, n_last = time.perf_counter(), done
        writer.scalars(done, metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['images_per_s']:.1f}")
      stop = guard.stop_requested() and done < cfg.num_steps  # the same answer on every process
      if checkpointer.should_save(done) or done == cfg.num_steps or stop:
        checkpointer.save(done, state, ckpt.make_meta(config, done, exp.keymap.hash), force=True)
      if sampler and done % cfg.sample_every == 0:
        sampler(outpaint_params(exp, state["ema_params"], frozen), done, layout.samples)
      if stop:
        preempted = guard.preempted("training", done, checkpointer.directory)
        break
  finally:
    bar.close()
    checkpointer.close()  # waits for the last checkpoint to be written
    writer.close()
  if preempted is not None:
    log.warning("%s", preempted)
    raise preempted
  if start >= cfg.num_steps:
    log.info("nothing to do: checkpoint step %d >= train.num_steps=%d", start, cfg.num_steps)
  return metrics


def _cache_latents(exp: Experiment, frozen: dict, mesh, plan: BatchPlan) -> np.ndarray:
  """Posterior means of every training instance [M, h, w, c], encoded once (every process holds all)."""
  vae = exp.vae
  encode = jax.jit(lambda p, x: vae.encode(p, x), in_shardings=(None, parallel.batch_sharding(mesh)))
  size = plan.global_batch
  n = len(exp.instances)
  out = []
  for start in tqdm(range(0, n, size), desc="cache latents", unit="batch", disable=jax.process_index() != 0):
    ids = np.arange(start, min(start + size, n))
    rows = parallel.pad_rows(ids, size)  # one shape: compile once
    local = parallel.process_slice(size)
    x = parallel.global_batch(mesh, exp.read_marked(rows[local])["image"])
    out.append(parallel.to_host(encode(frozen["vae"], x))[:len(ids)])
  return np.concatenate(out)


def _sample_grid_fn(exp: Experiment, mesh, frozen: dict):
  """Returns save(params, step, directory): a PNG grid of plain samples (no known region)."""
  cfg = exp.config.train
  spec = SamplerSpec(num_steps=cfg.sample_steps, remask_every=exp.config.eval.get("remask_every", 10))
  outpainter = make_outpainter(exp, spec, mesh=mesh)
  per_row = 4  # samples per condition: one row of the grid per condition
  rows = np.linspace(0, len(exp.conditions) - 1, max(cfg.num_samples // per_row, 1)).astype(np.int64)
  conds = encode_conditions(exp, frozen, exp.conditions[rows])
  labels = [f"instance {r}" for r in rows] if exp.is_text else [f"condition {c}" for c in conds]

  def save(params, step, directory):
    images = sample(outpainter, params, conds, jax.random.key(step), (exp.image_size, exp.image_size,
                                                                      exp.channels), repeats=per_row)
    if jax.process_index() != 0:  # every process samples (a collective), process 0 writes
      return
    os.makedirs(directory, exist_ok=True)
    write_sample_grid(os.path.join(directory, f"step_{step:07d}.png"), images, row_labels=labels)

  return save
