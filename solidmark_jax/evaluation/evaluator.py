"""Evaluation: outpaint members and non-members, score l_SM, write the memorisation report.

Groups (SPEC section 3):
- members: n training instances (chosen by eval.seed), their keys from the training keymap;
- non_members: n held-out images (data.eval_split), bordered with fresh keys, queried with the
  condition a new image would get (its class, its own caption for text models, or the null id for
  "image"/"none" models): the empirical null;
- random_init (optional): the members, outpainted by a randomly initialised model.

`Evaluator` builds the experiment, loads the checkpoint and the frozen parts, picks the groups and
builds the outpainter once; `Evaluator.score` then scores one setting (an inference-time mitigation
and a query augmentation) into its own directory. Several settings of one evaluator (a sweep,
sweeps.py) share the compiled outpainter: a mitigation changes the conditions on the host (same
shapes, no recompile), each augmentation level is one compile of the augmentation. `evaluate` is
one setting, the config's own.

Results are appended to <out>/results.jsonl as batches finish; a re-run skips what is done. With
`data.duplicates`, the members are distinct images (each queried eval.repeats times whatever its
copies, as the paper) and are also scored per duplication level (any evaluation of an image against
any of its keys, exact chance per image, metrics/duplication.py) into <out>/duplication.{md,json}.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from tqdm import tqdm

from solidmark_jax import atomic, dirlock, marks, metrics, parallel, report
from solidmark_jax.data import open_source
from solidmark_jax.data.pipeline import class_labels, marked_batch, select_records
from solidmark_jax.evaluation import augment as augment_lib
from solidmark_jax.evaluation import mitigations
from solidmark_jax.evaluation.conditioning import Conditioner
from solidmark_jax.experiment import KEYMAP_FILE, Experiment, build_experiment, load_frozen
from solidmark_jax.experiment import make_outpainter, outpaint_params, source_captions
from solidmark_jax.metrics import duplication
from solidmark_jax.models import init_params
from solidmark_jax.training import checkpoint as ckpt
from solidmark_jax.training.loop import abstract_state
from solidmark_jax.training.step import make_optimizer

log = logging.getLogger(__name__)

NONMEMBER_KEY_SALT = 0x0E1D  # non-member keys: keys_for(key_seed + salt, record index)
DUPLICATION_FILES = ("duplication.json", "duplication.md")


def _validate(config, mesh) -> tuple[tuple[float, ...], mitigations.Mitigation, augment_lib.Augmentation]:
  c = config.eval
  mitigation = mitigations.Mitigation.from_config(c.get("mitigation"))
  mitigations.check_condition(mitigation, config.model.condition)
  augmentation = augment_lib.Augmentation.from_config(c.get("augment"))
  try:
    thresholds = metrics.validate_thresholds(tuple(c.thresholds))
  except ValueError as e:
    raise ValueError(f"eval.thresholds: {e}") from None
  parallel.check_batch_size(c.batch_size, mesh, what="eval.batch_size")
  if c.repeats < 1:
    raise ValueError(f"eval.repeats must be >= 1, got {c.repeats}")
  if c.score not in ("best", "mean"):
    raise ValueError(f"eval.score must be 'best' or 'mean', got {c.score!r}")
  num_keys = config.marks.get("num_keys", 1)
  if c.score == "mean" and c.repeats > 1 and num_keys > 1:
    raise ValueError(f"eval.score='mean' with eval.repeats={c.repeats} and marks.num_keys={num_keys}: the exact "
                     "chance of a mean over repeats of several keys is not computed; use eval.score='best'")
  if config.data.get("duplicates") and num_keys > 1:
    raise ValueError(f"data.duplicates with marks.num_keys={num_keys}: duplication scoring takes one key per "
                     "instance; use marks.num_keys=1")
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
  """n training instances chosen by `seed`; with duplicated data, n distinct images, each queried once
  (through its first copy) so that every image gets eval.repeats evaluations whatever its copies."""
  if exp.config.data.get("duplicates"):
    _, first = np.unique(exp.instances.image_id, return_index=True)
    candidates = np.sort(first).astype(np.int64)
    ids = candidates[select_records(len(candidates), n, "random", seed, field="eval.num_members (distinct images)")]
  else:
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
  keys = marks.keys_for(config.marks.key_seed + NONMEMBER_KEY_SALT, ids, exp.num_keys)  # [n] or [n, m]
  bad = {"skipped_records": len(getattr(source, "skipped", ()) or ())}
  if config.model.condition == "class":
    conds = class_labels(source.labels()[ids], "data.eval_split", config.data.eval_split)
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
  pad, pattern, layout = config.marks.pad, config.marks.pattern, config.marks.get("key_layout", "sides")

  def read(rows):
    images = source.read(rows)["image"]
    return marked_batch(images, np.array([key_of[int(r)] for r in rows]), pad, pattern, layout)

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


class Evaluator:
  """One checkpoint, its groups and its outpainter, built once; scores any number of settings.

  Args:
    config: the experiment config (`eval` section: groups, sampler, thresholds; its `mitigation`
      and `augment` are only the defaults of `score`).
    workdir: the training workdir (checkpoints, keymap, frozen parts).
    step: checkpoint step (default: the latest).

  Attributes:
    exp, mesh, thresholds, step, groups (list of `_Group`), mitigation and augmentation (the
    config's), is_main (process 0 writes).
  """

  def __init__(self, config, workdir: str, step: int | None = None):
    self.config = config
    self.workdir = os.path.abspath(workdir)
    self.exp = exp = build_experiment(config)
    self.mesh = parallel.mesh_for_config(config.mesh)
    self.thresholds, self.mitigation, self.augmentation = _validate(config, self.mesh)
    c = config.eval
    self.groups = [_member_group(exp, c.num_members, c.seed), _nonmember_group(exp, config)]
    self.ema, self.step, _ = load_checkpoint(exp, self.workdir, step, self.mesh)
    self.frozen = jax.device_put(load_frozen(exp, self.workdir, train=False, mesh=self.mesh),
                                 parallel.replicated(self.mesh))
    self.params = outpaint_params(exp, self.ema, self.frozen)
    self.param_sets = {"members": self.params, "non_members": self.params}
    self.is_main = jax.process_index() == 0
    self._ops: dict = {}  # outpainters by the kind of null condition (guidance) they bake in
    self._random_init = bool(c.random_init_baseline)
    if self._random_init:
      self.groups.append(_member_group(exp, c.num_members, c.seed, name="random_init"))

  # -- shared pieces -----------------------------------------------------------------------------

  def _random_params(self):
    if "random_init" not in self.param_sets:
      exp = self.exp
      shardings = jax.tree.map(lambda x: x.sharding, self.ema)
      random = jax.jit(lambda r: init_params(exp.model, r, exp.model_size, exp.model_channels),
                       out_shardings=shardings)(jax.random.key(self.config.seed + 7))
      self.param_sets["random_init"] = outpaint_params(exp, random, self.frozen)
    return self.param_sets["random_init"]

  def conditioner(self, mitigation: mitigations.Mitigation) -> Conditioner:
    """Conditions -> denoiser input under `mitigation` (validated against the model's condition)."""
    mitigations.check_condition(mitigation, self.config.model.condition)
    return Conditioner(self.exp, self.frozen, mitigation, self.ema)

  def outpainter(self, conditioner: Conditioner):
    """The compiled outpainter for this conditioner's null condition; one per kind, built once."""
    null = conditioner.null
    if isinstance(null, (int, np.integer)):
      kind = ("id", int(null))
    else:
      null = np.asarray(null)
      kind = ("embedding", null.shape, null.tobytes())
    if kind not in self._ops:
      c = self.config.eval
      self._ops[kind] = make_outpainter(
          self.exp, num_steps=c.num_steps, sampler=c.sampler, eta=c.eta, jump_length=c.jump_length,
          resamples=c.resamples, guidance_scale=c.guidance_scale, null_condition=null,
          remask_every=c.get("remask_every", 10), remask_from=c.get("remask_from", "x0"), mesh=self.mesh)
    return self._ops[kind]

  @property
  def trace_count(self) -> int:
    """Traces of every outpainter built so far (one per distinct shape / static arguments)."""
    return sum(op.trace_count for op in self._ops.values())

  @property
  def images_per_setting(self) -> int:
    return sum(len(g.ids) for g in self.groups)

  def meta(self, mitigation: mitigations.Mitigation, augmentation: augment_lib.Augmentation) -> dict:
    """The metadata of one setting's result store and report."""
    c = self.config.eval
    ev = {k: v for k, v in c.to_dict().items() if k not in ("num_grid", "thresholds", "score")}
    ev["mitigation"] = mitigation.as_record()
    ev["augment"] = augmentation.as_record()
    return {
        "checkpoint_step": int(self.step),
        "keymap_hash": self.exp.keymap.hash,
        "config_fingerprint": ckpt.config_fingerprint(self.config),
        "eval": ev,
        "nonmember_split": self.config.data.eval_split,
        "model": {"space": self.config.model.get("space", "pixel"), "condition": self.config.model.condition},
        "bad_input": {"train": self.exp.bad_input, "non_members": self.groups[1].bad_input},
    }

  def open_store(self, out_dir: str, mitigation, augmentation) -> report.ResultStore | None:
    """The setting's result store (process 0; None elsewhere). Other settings' results there are an error."""
    if not self.is_main:
      return None
    return report.ResultStore(os.path.join(out_dir, "results.jsonl"), meta=self.meta(mitigation, augmentation))

  def done_count(self, store) -> int:
    """Images of this setting already in `store`, the same on every process."""
    done = sum(len(g.ids) - len(store.remaining(g.name, g.ids)) for g in self.groups) if self.is_main else 0
    return int(parallel.broadcast_from_main(done))

  # -- one setting -------------------------------------------------------------------------------

  def score(self, out_dir: str, mitigation: mitigations.Mitigation | None = None,
            augmentation: augment_lib.Augmentation | None = None, *, bar=None, store=None,
            write_grid: bool = True) -> dict | None:
    """Outpaints every group under one setting, writes its report to `out_dir`, returns the summary.

    Args:
      out_dir: the setting's directory (results.jsonl, summary.json/.md, per_image.csv, plots, and
        duplication.{json,md} with `data.duplicates`).
      mitigation: inference-time mitigation (default: the config's `eval.mitigation`).
      augmentation: query augmentation (default: the config's `eval.augment`).
      bar: a tqdm bar to advance (a sweep's); default: a bar of this setting.
      store: the setting's store if already opened (`open_store`).
      write_grid: write outpaintings.png (`eval.num_grid` members).

    Returns:
      The summary (summary.json; with "duplication" for duplicated data) on process 0, else None.
    """
    mitigation = self.mitigation if mitigation is None else mitigation
    augmentation = self.augmentation if augmentation is None else augmentation
    c = self.config.eval
    conditioner = self.conditioner(mitigation)
    # Opened before anything is compiled: results of other settings in out_dir fail fast, untouched.
    store = store if store is not None else self.open_store(out_dir, mitigation, augmentation)
    op = self.outpainter(conditioner)
    if self._random_init:
      self._random_params()
    own_bar = bar is None
    if own_bar:
      done = self.done_count(store)
      total = self.images_per_setting
      if self.is_main and done:
        log.info("%s: %d of %d images already scored; outpainting the other %d", store.path, done, total,
                 total - done)
      bar = tqdm(total=total, initial=done, desc="outpaint", unit="img", dynamic_ncols=True,
                 disable=not self.is_main)
    mask = self.exp.mask
    rng = jax.random.key(c.seed)
    for gi, g in enumerate(self.groups):
      todo = parallel.broadcast_ids(store.remaining(g.name, g.ids) if self.is_main else None)
      g_rng = jax.random.fold_in(rng, gi)  # the same noise for every setting: settings differ only by the setting
      for start in range(0, len(todo), c.batch_size):
        ids = todo[start:start + c.batch_size]
        k_pred = _outpaint_batch(op, self.param_sets[g.name], g, ids, c.batch_size, mask, g_rng, c.repeats,
                                 self.mesh, conditioner, augmentation)
        if self.is_main:
          pos = np.searchsorted(g.ids, ids)
          store.append(g.name, ids, g.keys[pos], k_pred)
        bar.update(len(ids))
    if own_bar:
      bar.close()

    summary = None
    if self.is_main:
      results = store.results()
      summary = report.write_report(out_dir, results, self.thresholds, statistic=c.score,
                                    metadata=self.meta(mitigation, augmentation))
      if self.exp.config.data.get("duplicates"):
        summary["duplication"] = write_duplication_report(self.exp, results, self.thresholds, out_dir)
    if write_grid and c.num_grid:
      _write_grid(op, self.params, self.groups[0], c, mask, rng, self.mesh, out_dir, self.is_main, conditioner,
                  augmentation)
    return summary


def write_duplication_report(exp: Experiment, results: report.Results, thresholds, out_dir: str) -> dict:
  """Members scored per duplication level (any evaluation x any key): duplication.json and .md.

  Every evaluated member is one distinct image (copies share the image and its condition; only
  their keys differ) with its r evaluations, scored against all c keys of its training copies.
  """
  members = results.select("members")
  inst = exp.instances
  all_ids = np.arange(len(inst.image_id), dtype=np.int64)
  summary = duplication.summarize_duplication(inst.image_id, exp.keymap.lookup(all_ids),
                                              inst.image_id[members.instance_id], members.k_pred, thresholds)
  atomic.write_json(os.path.join(out_dir, DUPLICATION_FILES[0]), summary, indent=2)
  atomic.write_text(os.path.join(out_dir, DUPLICATION_FILES[1]), report.duplication_markdown(summary))
  return summary


def evaluate(config, workdir: str, step: int | None = None, out_dir: str | None = None) -> dict:
  """Outpaints members and non-members, writes the report under DIR/eval/, returns the summary.

  Raises `dirlock.DirectoryInUse` when another live process writes to the same output directory.
  """
  out_dir = out_dir or os.path.join(os.path.abspath(workdir), "eval")
  with dirlock.hold(out_dir, "evaluation"):
    evaluator = Evaluator(config, workdir, step)
    summary = evaluator.score(out_dir)
  if evaluator.is_main:
    log.info("report written to %s", out_dir)
  return summary


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
