"""Evaluation: outpaint members and non-members, score l_SM, write the memorisation report.

Groups (SPEC section 3):
- members: n training instances (chosen by eval.seed), their keys from the training keymap;
- non_members: n held-out images (data.eval_split), bordered with fresh keys, queried with the
  condition a new image would get (its class, its own caption for text models, or the null id for
  "image"/"none" models): the empirical null;
- random_init (optional): the members, outpainted by a randomly initialised model.

Results are appended to DIR/eval/results.jsonl as batches finish; a re-run skips what is done.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from tqdm import tqdm

from solidmark_jax import marks, metrics, mitigations, parallel, report
from solidmark_jax.data import open_source
from solidmark_jax.data.pipeline import marked_batch, select_records
from solidmark_jax.experiment import KEYMAP_FILE, Conditioner, Experiment, build_experiment, load_frozen
from solidmark_jax.experiment import make_outpainter, outpaint_params, source_captions
from solidmark_jax.models import init_params
from solidmark_jax.outpaint import augment as augment_lib
from solidmark_jax.training import checkpoint as ckpt
from solidmark_jax.training.loop import abstract_state
from solidmark_jax.training.step import make_optimizer

log = logging.getLogger(__name__)

NONMEMBER_KEY_SALT = 0x0E1D  # non-member keys: keys_for(key_seed + salt, record index)


def _validate(config, mesh) -> tuple[tuple[float, ...], mitigations.Mitigation, augment_lib.Augmentation]:
  c = config.eval
  mitigation = mitigations.Mitigation.from_config(c.get("mitigation"))
  mitigations.check_condition(mitigation, config.model.condition)
  augmentation = augment_lib.Augmentation.from_config(c.get("augment"))
  try:
    thresholds = metrics.validate_thresholds(tuple(c.thresholds))
  except ValueError as e:
    raise ValueError(f"eval.thresholds: {e}") from None
  if c.batch_size % mesh.size:
    raise ValueError(f"eval.batch_size={c.batch_size} must be divisible by the {mesh.size} devices of the mesh")
  if c.batch_size % jax.process_count():
    raise ValueError(f"eval.batch_size={c.batch_size} must be divisible by the {jax.process_count()} processes")
  if c.repeats < 1:
    raise ValueError(f"eval.repeats must be >= 1, got {c.repeats}")
  if c.score not in ("best", "mean"):
    raise ValueError(f"eval.score must be 'best' or 'mean', got {c.score!r}")
  if c.guidance_scale != 1.0 and config.model.condition == "none":
    raise ValueError("eval.guidance_scale != 1 needs a conditional model (model.condition is 'none')")
  return thresholds, mitigation, augmentation


class _Group:
  """What to outpaint for one report group: ids, keys, conditions, and a reader of marked images."""

  def __init__(self, name, ids, keys, conditions, read, bad_input=None, captions=None):
    self.name, self.ids, self.keys, self.conditions, self.read = name, ids, keys, conditions, read
    self.bad_input = bad_input or {}
    self.captions = captions  # text models: [n] captions in the order of ids


def _member_group(exp: Experiment, n: int, seed: int, name: str = "members") -> _Group:
  ids = select_records(len(exp.instances), n, "random", seed, field="eval.num_members")
  captions = [exp.captions[i] for i in ids] if exp.captions is not None else None
  return _Group(name, ids, exp.keymap.lookup(ids), exp.conditions[ids],
                lambda rows: exp.read_marked(rows)["image"], captions=captions)


def _nonmember_group(exp: Experiment, config) -> _Group:
  source = open_source(config.data, config.data.eval_split)
  if (source.image_size, source.channels) != (exp.source.image_size, exp.source.channels):
    raise ValueError(f"data.eval_split {config.data.eval_split!r} gives {source.image_size} px x {source.channels} "
                     f"channels, the training data {exp.source.image_size} x {exp.source.channels}")
  ids = select_records(len(source), config.eval.num_nonmembers, "random", config.eval.seed + 1,
                       field="eval.num_nonmembers")
  keys = marks.keys_for(config.marks.key_seed + NONMEMBER_KEY_SALT, ids)
  bad = {"skipped_records": len(getattr(source, "skipped", ()) or ())}
  if config.model.condition == "class":
    conds = source.labels()[ids]
  elif config.model.condition == "text":
    captions = [source_captions(source, f"data.eval_split {config.data.eval_split!r}")[i] for i in ids]
    tokens = exp.text.tokenize(captions)
    conds = np.asarray(tokens.ids, np.int32)  # [n, L]
    bad["truncated_captions"] = int(np.sum(tokens.truncated))
  else:
    conds = np.full(len(ids), exp.null_id, np.int64)
  if config.model.condition != "text":
    captions = None
  key_of = dict(zip(ids.tolist(), keys))
  pad, pattern = config.marks.pad, config.marks.pattern

  def read(rows):
    images = source.read(rows)["image"]
    return marked_batch(images, np.array([key_of[int(r)] for r in rows]), pad, pattern)

  return _Group("non_members", ids, keys, conds, read, bad_input=bad, captions=captions)


def load_checkpoint(exp: Experiment, workdir: str, step: int | None, mesh):
  """EMA parameters of checkpoint `step` (default: latest), checked against config and keymap."""
  directory = os.path.join(workdir, "checkpoints")
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
    keymap_path = os.path.join(workdir, KEYMAP_FILE)
    stored = marks.Keymap.load(keymap_path, expected_hash=meta["keymap_hash"])
    if stored.hash != exp.keymap.hash:
      raise ValueError(f"{keymap_path}: the keymap the model was trained with differs from the one this config "
                       "draws (data, subset, duplication or key seed changed)")
    target, _ = abstract_state(exp, mesh, make_optimizer(exp.config.train))
    state = checkpointer.restore_state(step, target)
  finally:
    checkpointer.close()
  return state["ema_params"], step, meta


def evaluate(config, workdir: str, step: int | None = None, out_dir: str | None = None) -> dict:
  """Outpaints members and non-members, writes the report under DIR/eval/, returns the summary."""
  workdir = os.path.abspath(workdir)
  exp = build_experiment(config)
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
  thresholds, mitigation, augmentation = _validate(config, mesh)
  c = config.eval
  groups = [_member_group(exp, c.num_members, c.seed), _nonmember_group(exp, config)]
  ema, step, _ = load_checkpoint(exp, workdir, step, mesh)
  frozen = jax.device_put(load_frozen(exp, workdir, train=False, mesh=mesh), parallel.replicated(mesh))
  params = outpaint_params(exp, ema, frozen)
  conditioner = Conditioner(exp, frozen, mitigation, ema)
  out_dir = out_dir or os.path.join(workdir, "eval")
  op = make_outpainter(exp, num_steps=c.num_steps, sampler=c.sampler, eta=c.eta, jump_length=c.jump_length,
                       resamples=c.resamples, guidance_scale=c.guidance_scale, null_condition=conditioner.null,
                       remask_every=c.get("remask_every", 10), mesh=mesh)
  meta = {
      "checkpoint_step": int(step),
      "keymap_hash": exp.keymap.hash,
      "config_fingerprint": ckpt.config_fingerprint(config),
      "eval": {k: v for k, v in c.to_dict().items() if k not in ("num_grid", "thresholds", "score")},
      "nonmember_split": config.data.eval_split,
      "model": {"space": config.model.get("space", "pixel"), "condition": config.model.condition},
      "bad_input": {"train": exp.bad_input, "non_members": groups[1].bad_input},
  }
  is_main = jax.process_index() == 0
  # Opened once every setting is validated and before anything is compiled: results of other
  # settings in out_dir fail fast, untouched.
  store = report.ResultStore(os.path.join(out_dir, "results.jsonl"), meta=meta) if is_main else None
  param_sets = {"members": params, "non_members": params}
  if c.random_init_baseline:
    groups.append(_member_group(exp, c.num_members, c.seed, name="random_init"))
    shardings = jax.tree.map(lambda x: x.sharding, ema)
    random = jax.jit(lambda r: init_params(exp.model, r, exp.model_size, exp.model_channels),
                     out_shardings=shardings)(jax.random.key(config.seed + 7))
    param_sets["random_init"] = outpaint_params(exp, random, frozen)
  mask = exp.mask
  rng = jax.random.key(c.seed)
  total = sum(len(g.ids) for g in groups)
  done = sum(len(g.ids) - len(store.remaining(g.name, g.ids)) for g in groups) if is_main else 0
  done = int(parallel.to_host(_broadcast(done)))
  if is_main and done:
    log.info("%s: %d of %d images already scored; outpainting the other %d", store.path, done, total,
             total - done)
  bar = tqdm(total=total, initial=done, desc="outpaint", unit="img", dynamic_ncols=True, disable=not is_main)
  for gi, g in enumerate(groups):
    todo = store.remaining(g.name, g.ids) if is_main else None
    todo = _broadcast_ids(todo)
    g_rng = jax.random.fold_in(rng, gi)
    for start in range(0, len(todo), c.batch_size):
      ids = todo[start:start + c.batch_size]
      k_pred = _outpaint_batch(op, param_sets[g.name], g, ids, c.batch_size, mask, g_rng, c.repeats, mesh,
                               conditioner, augmentation)
      if is_main:
        pos = np.searchsorted(g.ids, ids)
        store.append(g.name, ids, g.keys[pos], k_pred)
      bar.update(len(ids))
  bar.close()

  summary = None
  if is_main:
    summary = report.write_report(out_dir, store.results(), thresholds, statistic=c.score, metadata=meta)
  if c.num_grid:
    _write_grid(op, params, groups[0], c, mask, rng, mesh, out_dir, is_main, conditioner, augmentation)
  if is_main:
    log.info("report written to %s", out_dir)
  return summary


def _broadcast(x):
  """A host value from process 0, on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return multihost_utils.broadcast_one_to_all(np.asarray(x))


def _broadcast_ids(ids):
  if jax.process_count() == 1:
    return np.asarray(ids, np.int64)
  n = int(_broadcast(len(ids) if ids is not None else 0))
  buf = np.zeros(n, np.int64) if ids is None else np.asarray(ids, np.int64)
  return np.asarray(_broadcast(buf), np.int64)


def _outpaint_batch(op, params, g: _Group, ids, batch_size, mask, rng, repeats, mesh, conditioner, augmentation,
                    return_images=False):
  """One padded batch: each process reads its rows, the batch runs sharded, k_pred comes back [n, r].

  The query augmentation changes the known region, the mitigation the condition; both seeded by id.
  """
  n = len(ids)
  rows = np.concatenate([ids, np.repeat(ids[-1:], batch_size - n)])  # fixed shape: compile once
  local = parallel.process_slice(batch_size)
  pos = np.searchsorted(g.ids, rows)[local]
  mine = rows[local]
  known = g.read(mine)
  if not augmentation.is_identity:
    known = np.asarray(augment_lib.augment(known, mask, augmentation, augmentation.key(), mine))
  captions = [g.captions[p] for p in pos] if g.captions is not None else None
  batch = {"known": known, "condition": conditioner(g.conditions[pos], mine, captions),
           "ids": mine.astype(np.int32)}
  batch = parallel.global_batch(mesh, batch)
  out = op(params, batch["known"], mask, batch["condition"], rng, repeats, ids=batch["ids"],
           return_images=return_images)
  out = {k: parallel.to_host(v)[:n] for k, v in out.items()}
  return out if return_images else out["k_pred"]


def _write_grid(op, params, g: _Group, c, mask, rng, mesh, out_dir, is_main, conditioner, augmentation):
  n = min(c.num_grid, len(g.ids), c.batch_size)
  ids = g.ids[:n]
  out = _outpaint_batch(op, params, g, ids, c.batch_size, mask, jax.random.fold_in(rng, 0), 1, mesh, conditioner,
                        augmentation, return_images=True)
  if is_main:
    known = g.read(ids)
    if not augmentation.is_identity:
      known = np.asarray(augment_lib.augment(known, mask, augmentation, augmentation.key(), ids))
    report.write_image_grid(os.path.join(out_dir, "outpaintings.png"), known, mask, out["images"],
                            keys=g.keys[:n], k_pred=out["k_pred"], row_labels=[f"member {i}" for i in ids])
