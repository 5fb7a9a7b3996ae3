"""Evaluation: outpaint members and non-members, score l_SM, write the memorisation report.

Groups (the paper's Section 4; docs/statistics.md):
- members: n training instances (chosen by eval.seed), their keys from the training keymap;
- non_members: n held-out images (data.eval_split), bordered with fresh keys, queried with the
  condition a new image would get (its class, its own caption for text models, or the null id for
  "image"/"none" models): the empirical null;
- random_init (optional): the members, outpainted by a randomly initialised model.

`build_evaluator(config, workdir)` restores the EMA parameters and the frozen parts, picks the groups
and builds the outpainter once; `Evaluator.score(out_dir, mitigation, augmentation)` scores one
setting into its own directory. The settings of a sweep share the compiled outpainter: a mitigation
changes the conditions on the host, the null condition is a traced argument, each augmentation is one
compile of the augmentation. `evaluate(config, workdir)` is one setting, the config's own.

Results are appended to <out>/results.jsonl as batches finish; a re-run skips what is done. With
`data.duplicates`, the members are distinct images (each queried eval.repeats times whatever its
copies, as the paper) and are also scored per duplication level (any evaluation of an image against
any of its keys, exact chance per image, metrics/duplication.py) into <out>/duplication.{md,json}.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from solidmark_jax import atomic, dirlock, marks, metrics, parallel, report
from solidmark_jax.data import open_source
from solidmark_jax.data.instances import class_labels, marked_batch, select_records
from solidmark_jax.evaluation import augment as augment_lib
from solidmark_jax.evaluation import dori as dori_lib
from solidmark_jax.evaluation import mitigations
from solidmark_jax.evaluation import regions as regions_lib
from solidmark_jax.evaluation.conditioning import Conditioner
from solidmark_jax.experiment import Experiment, build_experiment, make_outpainter, outpaint_params, source_captions
from solidmark_jax.metrics import duplication
from solidmark_jax.models import init_params
from solidmark_jax.outpaint import Outpainter, SamplerSpec
from solidmark_jax.training import checkpoint as ckpt
from solidmark_jax.training.state import load_frozen, restore_ema
from solidmark_jax.workdir import Workdir

log = logging.getLogger(__name__)

NONMEMBER_KEY_SALT = 0x0E1D  # non-member keys: keys_for(key_seed + salt, record index)
DUPLICATION_FILES = ("duplication.json", "duplication.md")


# ---------------------------------------------------------------------------------------------
# Settings and groups.


def validate(config: ml_collections.ConfigDict,
             mesh: Mesh) -> tuple[tuple[float, ...], mitigations.Mitigation, augment_lib.Augmentation]:
  """The eval section checked against the model and the mesh: (thresholds, mitigation, augmentation)."""
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


@dataclasses.dataclass(frozen=True)
class Group:
  """What to outpaint for one report group.

  Attributes:
    name: "members", "non_members" or "random_init".
    ids: int64 [n] instance ids (members) or record indices (non-members), sorted.
    keys: [n] or [n, m] keys.
    conditions: [n] condition ids or [n, L] caption token ids.
    read: rows -> marked images [len(rows), H, W, C] in model space (process-local reads).
    bad_input: counts of skipped / truncated inputs for the report.
    captions: text models: [n] captions in the order of ids.
  """

  name: str
  ids: np.ndarray
  keys: np.ndarray
  conditions: np.ndarray
  read: Callable[[np.ndarray], np.ndarray]
  bad_input: dict = dataclasses.field(default_factory=dict)
  captions: list[str] | None = None


def member_group(exp: Experiment, n: int, seed: int, name: str = "members") -> Group:
  """n training instances chosen by `seed`; with duplicated data, n distinct images, each queried once
  (through its first copy) so that every image gets eval.repeats evaluations whatever its copies."""
  if exp.config.data.get("duplicates"):
    _, first = np.unique(exp.instances.image_id, return_index=True)
    candidates = np.sort(first).astype(np.int64)
    ids = candidates[select_records(len(candidates), n, "random", seed, field="eval.num_members (distinct images)")]
  else:
    ids = select_records(len(exp.instances), n, "random", seed, field="eval.num_members")
  captions = [exp.captions[i] for i in ids] if exp.captions is not None else None
  return Group(name, ids, exp.keymap.lookup(ids), exp.conditions[ids], lambda rows: exp.read_marked(rows)["image"],
               captions=captions)


def nonmember_group(exp: Experiment, config: ml_collections.ConfigDict) -> Group:
  """eval.num_nonmembers held-out records of data.eval_split, bordered with fresh keys."""
  source = open_source(config.data, config.data.eval_split)
  if (source.image_size, source.channels) != (exp.source.image_size, exp.source.channels):
    raise ValueError(f"data.eval_split {config.data.eval_split!r} gives {source.image_size} px x {source.channels} "
                     f"channels, the training data {exp.source.image_size} x {exp.source.channels}")
  ids = select_records(len(source), config.eval.num_nonmembers, "random", config.eval.seed + 1,
                       field="eval.num_nonmembers")
  keys = marks.keys_for(config.marks.key_seed + NONMEMBER_KEY_SALT, ids, exp.num_keys)  # [n] or [n, m]
  bad = {"skipped_records": len(getattr(source, "skipped", ()) or ())}
  captions = None
  if config.model.condition == "class":
    conds = class_labels(source.labels()[ids], "data.eval_split", config.data.eval_split)
  elif config.model.condition == "text":
    captions = [source_captions(source, f"data.eval_split {config.data.eval_split!r}")[i] for i in ids]
    tokens = exp.text.tokenize(captions)
    conds = np.asarray(tokens.ids, np.int32)  # [n, L]
    bad["truncated_captions"] = int(np.sum(tokens.truncated))
  else:
    conds = np.full(len(ids), exp.null_id, np.int64)
  key_of = dict(zip(ids.tolist(), keys))
  pad, pattern, layout = config.marks.pad, config.marks.pattern, config.marks.get("key_layout", "sides")

  def read(rows):
    images = source.read(rows)["image"]
    return marked_batch(images, np.array([key_of[int(r)] for r in rows]), pad, pattern, layout)

  return Group("non_members", ids, keys, conds, read, bad_input=bad, captions=captions)


# ---------------------------------------------------------------------------------------------
# One batch of queries.


def local_rows(g: Group, ids: np.ndarray, batch_size: int, conditioner: Conditioner) -> tuple[np.ndarray, Any]:
  """This process's rows of the batch of `ids` padded to `batch_size` (one shape: one compilation), and
  their conditions through `conditioner`."""
  rows = parallel.pad_rows(ids, batch_size)
  local = parallel.process_slice(batch_size)
  pos, mine = np.searchsorted(g.ids, rows)[local], rows[local]
  captions = [g.captions[p] for p in pos] if g.captions is not None else None
  return mine, conditioner(g.conditions[pos], mine, captions)


@dataclasses.dataclass(frozen=True)
class Query:
  """How one setting queries the model: the outpainter, the conditions (with a mitigation), the
  augmentation of the known region, and the fixed batch shape (one compilation); with `dori`, each
  condition perturbed first by DoRI's search on the image's own bordered truth (objective "loss"; key-blind:
  the same image with its key region hidden) or by the key-targeted search for the image's own key
  (objective "key"; docs/dori.md)."""

  op: Outpainter
  conditioner: Conditioner
  augmentation: augment_lib.Augmentation
  mask: np.ndarray  # [H, W, 1], 1 on the key region
  batch_size: int
  mesh: Mesh
  dori: dori_lib.DoriSpec | None = None

  def known(self, g: Group, rows: np.ndarray) -> np.ndarray:
    """The marked images of `rows`, their known region augmented (seeded by id)."""
    known = g.read(rows)
    if not self.augmentation.is_identity:
      known = np.asarray(augment_lib.augment(known, self.mask, self.augmentation, self.augmentation.key(), rows))
    return known

  def run(self, params: Any, g: Group, ids: np.ndarray, rng: jax.Array, repeats: int,
          return_images: bool = False, hide: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
          ) -> dict[str, np.ndarray]:
    """One padded batch: each process reads its rows, the batch runs sharded; k_pred [n, r] (and images).

    hide: (marked images, their ids) -> the region hidden beside the key [n, H, W, 1] (a region query).
    """
    n = len(ids)
    mine, condition = local_rows(g, ids, self.batch_size, self.conditioner)
    known = self.known(g, mine)
    batch = {"known": known, "condition": condition, "ids": mine.astype(np.int32)}
    if hide is not None:
      batch["regions"] = hide(known, mine)
    search = self.dori
    if search is not None and search.objective == "loss":
      batch["truth"] = g.read(mine) if not self.augmentation.is_identity else known  # the bordered image
    if search is not None and search.objective == "key":
      batch["key"] = g.keys[np.searchsorted(g.ids, mine)].astype(np.float32)  # what the search aims at
    batch = parallel.global_batch(self.mesh, batch)
    condition, found = batch["condition"], {}
    # a search is seeded by the query's rng and the image's id, like its outpainting noise
    if search is not None and search.objective == "loss":
      # key-blind: the search never reads the truth's key region (dori.py)
      hidden = self.mask if search.key_blind else None
      delta, info = dori_lib.dori_search(self.op.denoiser, params, self.op.sched, batch["truth"], condition, rng,
                                         search, ids=batch["ids"], hidden=hidden)
      found = {f"dori_{k}": info[k] for k in ("delta_norm", "loss_initial", "loss_final")}
    elif search is not None:
      delta, info = dori_lib.key_search(self.op.denoiser, params, self.op.sched, batch["known"], self.mask,
                                        condition, batch["key"], rng, search, search.inner_steps, ids=batch["ids"])
      # the squared key error of the short loop's read-out, under c0 and under c0 + delta
      found = {"dori_delta_norm": info["delta_norm"],
               "dori_loss_initial": (info["k_pred_initial"] - batch["key"]) ** 2,
               "dori_loss_final": (info["k_pred_final"] - batch["key"]) ** 2}
    if search is not None:
      condition = condition + delta
    out = self.op(params, batch["known"], self.mask, condition, rng, repeats, ids=batch["ids"],
                  null_condition=self.conditioner.null, return_images=return_images, regions=batch.get("regions"))
    return {k: parallel.to_host(v)[:n] for k, v in {**out, **found}.items()}


# ---------------------------------------------------------------------------------------------
# The evaluator: built once, scores any number of settings.


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """One checkpoint, its groups and its outpainter (`build_evaluator`); scores any number of settings.

  Attributes:
    config: the experiment config (its eval `mitigation` / `augment` are only the defaults of `score`).
    exp: the experiment (with the loaded VAE for latent models).
    mesh: the device mesh.
    thresholds, mitigation, augmentation: the validated eval settings.
    groups: members, non-members (and random_init).
    params: the outpainter's params per group name (the random-init model's for "random_init").
    step: the checkpoint step.
    frozen: the frozen text / VAE parameters.
    unet_params: the EMA parameters.
    op: the compiled outpainter (one for every setting).
    is_main: process 0 writes.
    pruning: the record of a pruned model (`sweeps.pruned_evaluator`), kept in every store's metadata; None.
  """

  config: Any
  exp: Experiment
  mesh: Mesh
  thresholds: tuple[float, ...]
  mitigation: mitigations.Mitigation
  augmentation: augment_lib.Augmentation
  groups: tuple[Group, ...]
  params: dict
  step: int
  frozen: dict
  unet_params: Any
  op: Outpainter
  is_main: bool
  pruning: dict | None = None

  @property
  def trace_count(self) -> int:
    """Traces of the outpainter so far (one per distinct shape / static arguments)."""
    return self.op.trace_count

  @property
  def images_per_setting(self) -> int:
    return sum(len(g.ids) for g in self.groups)

  def conditioner(self, mitigation: mitigations.Mitigation) -> Conditioner:
    """Conditions -> denoiser input under `mitigation` (validated against the model's condition)."""
    return Conditioner(self.exp, self.frozen, mitigation, self.unet_params)

  def query(self, mitigation: mitigations.Mitigation, augmentation: augment_lib.Augmentation,
            dori: dori_lib.DoriSpec | None = None) -> Query:
    if dori is not None and (self.exp.is_latent or not self.exp.is_text):
      raise ValueError("a DoRI query perturbs text embeddings through the pixel denoiser: it needs a pixel model "
                       f"with model.condition = 'text' (got space {self.config.model.get('space', 'pixel')!r}, "
                       f"condition {self.config.model.condition!r}); latent models are not supported yet")
    if dori is not None and dori.objective == "key" and self.exp.num_keys > 1:
      raise ValueError(f"the key-targeted search aims at one key per image; marks.num_keys={self.exp.num_keys} is "
                       "not supported (use the denoising-loss search, \"+dori\")")
    return Query(self.op, self.conditioner(mitigation), augmentation, self.exp.mask, self.config.eval.batch_size,
                 self.mesh, dori)

  def meta(self, mitigation: mitigations.Mitigation, augmentation: augment_lib.Augmentation,
           dori: dori_lib.DoriSpec | None = None) -> dict:
    """The metadata of one setting's result store and report (DoRI's settings only where a query uses it)."""
    c = self.config.eval
    ev = {k: v for k, v in c.to_dict().items() if k not in ("num_grid", "thresholds", "score", "dori", "key_search",
                                                            "adversarial")}
    if c.guidance_scale == 1.0:  # the noise magnitude is computed with guidance only
      ev.pop("magnitude_steps", None)
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
        **({"pruning": self.pruning} if self.pruning is not None else {}),
        **({"dori": dori.as_record()} if dori is not None else {}),
    }

  def open_store(self, out_dir: str, mitigation: mitigations.Mitigation, augmentation: augment_lib.Augmentation,
                 dori: dori_lib.DoriSpec | None = None) -> report.ResultStore | None:
    """The setting's result store (process 0; None elsewhere). Other settings' results there are an error."""
    if not self.is_main:
      return None
    return report.ResultStore(os.path.join(out_dir, "results.jsonl"), meta=self.meta(mitigation, augmentation, dori))

  def done_count(self, store: report.ResultStore | None) -> int:
    """Images of this setting already in `store`, the same on every process."""
    done = sum(len(g.ids) - len(store.remaining(g.name, g.ids)) for g in self.groups) if self.is_main else 0
    return int(parallel.broadcast_from_main(done))

  def score(self, out_dir: str, mitigation: mitigations.Mitigation | None = None,
            augmentation: augment_lib.Augmentation | None = None, *, bar: tqdm | None = None,
            store: report.ResultStore | None = None, write_grid: bool = True,
            dori: dori_lib.DoriSpec | None = None) -> dict | None:
    """Outpaints every group under one setting, writes its report to `out_dir`, returns the summary.

    Args:
      out_dir: the setting's directory (results.jsonl, summary.json/.md, per_image.csv, plots, and
        duplication.{json,md} with `data.duplicates`).
      mitigation: inference-time mitigation (default: the config's `eval.mitigation`).
      augmentation: query augmentation (default: the config's `eval.augment`).
      bar: a tqdm bar to advance (a sweep's); default: a bar of this setting.
      store: the setting's store if already opened (`open_store`).
      write_grid: write outpaintings.png (`eval.num_grid` members).
      dori: DoRI's search before each query (docs/dori.md); its outcome per image in the store.

    Returns:
      The summary (summary.json; with "duplication" for duplicated data) on process 0, else None.
    """
    mitigation = self.mitigation if mitigation is None else mitigation
    augmentation = self.augmentation if augmentation is None else augmentation
    c = self.config.eval
    query = self.query(mitigation, augmentation, dori)
    # Opened before anything runs: results of other settings in out_dir fail fast, untouched.
    store = store if store is not None else self.open_store(out_dir, mitigation, augmentation, dori)
    own_bar = bar is None
    if own_bar:
      bar = self._bar(store)
    rng = jax.random.key(c.seed)
    for gi, g in enumerate(self.groups):
      todo = parallel.broadcast_ids(store.remaining(g.name, g.ids) if self.is_main else None)
      g_rng = jax.random.fold_in(rng, gi)  # the same noise for every setting: settings differ only by the setting
      for start in range(0, len(todo), c.batch_size):
        ids = todo[start:start + c.batch_size]
        out = query.run(self.params[g.name], g, ids, g_rng, c.repeats)
        if self.is_main:
          found = {k: np.repeat(np.asarray(v)[:, None], c.repeats, axis=1) for k, v in out.items()
                   if k.startswith("dori_")}  # one search per image, shared by its repeats
          store.append(g.name, ids, g.keys[np.searchsorted(g.ids, ids)], out["k_pred"], out.get("noise_magnitude"),
                       found or None)
        bar.update(len(ids))
    if own_bar:
      bar.close()

    summary = None
    if self.is_main:
      results = store.results()
      summary = report.write_report(out_dir, results, self.thresholds, statistic=c.score,
                                    metadata=self.meta(mitigation, augmentation, dori))
      if self.config.data.get("duplicates"):
        summary["duplication"] = write_duplication_report(self.exp, results, self.thresholds, out_dir)
    if write_grid and c.num_grid:
      self._write_grid(query, rng, out_dir)
    return summary

  def score_regions(self, out_dir: str, region: str, spec: regions_lib.RegionSpec) -> dict | None:
    """A region query of every group (docs/regions.md): the key region and `region` hidden, outpainted in
    one pass; the key scored as usual, the region's reconstruction against the truth and against another
    image's truth (the region null). Writes a full report to `out_dir`; returns its summary on process 0."""
    c = self.config.eval
    # the config's mitigation; no query augmentation: the hidden region is scored against the true image
    query = self.query(self.mitigation, augment_lib.Augmentation())
    pad, pattern = self.config.marks.pad, self.config.marks.pattern
    hide = lambda known, ids: regions_lib.query_regions(spec, region, known, ids, pad, pattern, query.mask)
    meta = {**self.meta(self.mitigation, query.augmentation), "region": region, "region_masks": spec.as_record()}
    store = report.ResultStore(os.path.join(out_dir, "results.jsonl"), meta=meta) if self.is_main else None
    bar = tqdm(total=self.images_per_setting, initial=self.done_count(store), desc=f"outpaint {region}", unit="img",
               dynamic_ncols=True, disable=not self.is_main)
    rng = jax.random.key(c.seed)
    for gi, g in enumerate(self.groups):
      partner = dict(zip(g.ids.tolist(), g.ids[metrics.chance.derangements(len(g.ids), 1, c.seed + gi)[0]].tolist())
                     if len(g.ids) > 1 else [])
      todo = parallel.broadcast_ids(store.remaining(g.name, g.ids) if self.is_main else None)
      g_rng = jax.random.fold_in(rng, gi)
      for start in range(0, len(todo), c.batch_size):
        ids = todo[start:start + c.batch_size]
        out = query.run(self.params[g.name], g, ids, g_rng, c.repeats, return_images=True, hide=hide)
        if self.is_main:
          truth = g.read(ids)
          hidden = hide(truth, ids)
          extras = _region_extras(out["images"], truth, hidden, g.read(np.array([partner.get(int(i), int(i))
                                                                                  for i in ids])))
          store.append(g.name, ids, g.keys[np.searchsorted(g.ids, ids)], out["k_pred"], out.get("noise_magnitude"),
                       extras)
        bar.update(len(ids))
    bar.close()
    if not self.is_main:
      return None
    return report.write_report(out_dir, store.results(), self.thresholds, statistic=c.score, metadata=meta)

  def _bar(self, store) -> tqdm:
    done, total = self.done_count(store), self.images_per_setting
    if self.is_main and done:
      log.info("%s: %d of %d images already scored; outpainting the other %d", store.path, done, total, total - done)
    return tqdm(total=total, initial=done, desc="outpaint", unit="img", dynamic_ncols=True, disable=not self.is_main)

  def _write_grid(self, query: Query, rng: jax.Array, out_dir: str) -> None:
    """outpaintings.png: the first eval.num_grid members, known region, outpainting and keys."""
    g = self.groups[0]
    n = min(self.config.eval.num_grid, len(g.ids), query.batch_size)
    ids = g.ids[:n]
    out = query.run(self.params[g.name], g, ids, jax.random.fold_in(rng, 0), 1, return_images=True)
    if self.is_main:
      report.write_image_grid(os.path.join(out_dir, "outpaintings.png"), query.known(g, ids), query.mask, out["images"],
                              keys=g.keys[:n], k_pred=out["k_pred"], row_labels=[f"member {i}" for i in ids])


def _region_extras(images: np.ndarray, truth: np.ndarray, hidden: np.ndarray, partner_truth: np.ndarray) -> dict:
  """A region query's per-image scores: the hidden region against its truth and against a partner's."""
  own = regions_lib.region_scores(images, truth, hidden)
  null = regions_lib.region_scores(images, partner_truth, hidden)
  return {"region_l2": own["l2"], "region_ssim": own["ssim"], "region_null_l2": null["l2"],
          "region_null_ssim": null["ssim"]}


def build_evaluator(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> Evaluator:
  """Builds the experiment, restores checkpoint `step`'s EMA parameters (default: the latest) and the
  frozen parts, picks the groups and builds the outpainter."""
  exp = build_experiment(config)
  mesh = parallel.mesh_for_config(config.mesh)
  thresholds, mitigation, augmentation = validate(config, mesh)
  c = config.eval
  groups = [member_group(exp, c.num_members, c.seed), nonmember_group(exp, config)]
  ema, step, _ = restore_ema(exp, workdir, mesh, step)
  exp, frozen = load_frozen(exp, workdir, train=False, mesh=mesh)
  frozen = jax.device_put(frozen, parallel.replicated(mesh))
  trained = outpaint_params(exp, ema, frozen)
  params = {"members": trained, "non_members": trained}
  if c.random_init_baseline:
    groups.append(member_group(exp, c.num_members, c.seed, name="random_init"))
    shardings = jax.tree.map(lambda x: x.sharding, ema)
    random = jax.jit(lambda r: init_params(exp.model, r, exp.model_size, exp.model_channels),
                     out_shardings=shardings)(jax.random.key(config.seed + 7))
    params["random_init"] = outpaint_params(exp, random, frozen)
  op = make_outpainter(exp, SamplerSpec.from_config(c), mesh=mesh)
  return Evaluator(config, exp, mesh, thresholds, mitigation, augmentation, tuple(groups), params, step, frozen, ema,
                   op, jax.process_index() == 0)


def write_duplication_report(exp: Experiment, results: report.Results, thresholds: Sequence[float],
                             out_dir: str) -> dict:
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


def evaluate(config: ml_collections.ConfigDict, workdir: str, step: int | None = None,
             out_dir: str | None = None) -> str | None:
  """Outpaints members and non-members and writes the report; returns the report's directory on
  process 0 (DIR/eval/ by default: summary.json, summary.md, per_image.csv, plots), None elsewhere.

  Raises `dirlock.DirectoryInUse` when another live process writes to the same output directory.
  """
  out_dir = out_dir or Workdir(workdir).eval
  spec = regions_lib.RegionSpec.from_config(config.eval.get("regions"))
  with dirlock.hold(out_dir, "evaluation"):
    evaluator = build_evaluator(config, workdir, step)
    evaluator.score(out_dir)
    for region in spec.names:  # region queries (FB-Mem's view), each a report of its own
      evaluator.score_regions(os.path.join(out_dir, "regions", region), region, spec)
  if not evaluator.is_main:
    return None
  log.info("report written to %s", out_dir)
  return out_dir


