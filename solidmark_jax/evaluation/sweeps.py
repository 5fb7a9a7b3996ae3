"""Sweeps: one checkpoint scored under several settings (mitigation strengths, augmentation levels) in one process.

A sweep is a config plus a list of settings (`config.sweep`, see config.py):

  sweep.kind = "mitigation"; sweep.name = "gni"; sweep.values = (0.0, 0.1, 0.5)
  sweep.kind = "augment"; sweep.settings = ("none", "crop:1", "blur:2")
  sweep.kind = "pruning"; sweep.settings = ("none", "wanda:0.05", "nemo:3")  # a pruned UNet per setting
  sweep.kind = "pruning"; sweep.settings = ("none", "adversarial:100", "wanda:0.2+dori", "nemo:2+keysearch")

A pruning setting prunes the UNet's cross-attention for the members' captions (`pruned_evaluator`,
docs/pruning.md), or fine-tunes it against DoRI's triggers for the first `eval.adversarial.targets`
members ("adversarial:<steps>", `finetuned_evaluator`, evaluation/adversarial.py; the table then
splits the members into the targeted and the rest), and adds the denoising loss of members and
non-members (`denoising_losses`). Any setting can end in one query-side addition: "+dori" (DoRI's
search, `eval.dori`), "+dori:blind" (the same search blind to the key: a random grey in the key region,
left out of the loss), "+keysearch" (the key-targeted search, `eval.key_search`) or "+gni:<sigma>"
(Gaussian noise on the caption embeddings, a random perturbation beside the searched ones).

`run_sweep` builds the experiment, checkpoint, groups and outpainter once (`evaluation.Evaluator`),
then scores every setting into its own store under DIR/sweeps/settings/<setting>/ (results.jsonl,
summary.json/.md, ...). A mitigation only changes the conditions on the host and an augmentation
level is one compile of the augmentation, so the outpainter compiles once per shape for the whole
sweep. One tqdm bar runs over settings x images; a re-run skips finished settings and, within an
interrupted one, the images already scored. Settings are shared between sweeps of one workdir with
the same eval section (the Table 3 and GNI sweeps share their "gni_0.1" row); a store made with
other eval settings is an error.

The sweep's table (DIR/sweeps/<name>/table.md and sweep.json; a row per setting, the members'
eidetic counts at every threshold beside their exact chance, and each setting's effect against the
baseline (identity) row on the same images: the reduction of the excess over chance with a paired
bootstrap interval and McNemar's test, not the raw reduction of counts) is printed; a one-parameter
numeric sweep also gets sweep.png (rate against strength, the GNI figure). The pages and the plot
are laid out by report/sweeps.py and report/plots.py. If the workdir has no checkpoint at train.num_steps, training runs first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Sequence

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from solidmark_jax import atomic, dirlock, metrics, parallel, report
from solidmark_jax.evaluation import adversarial
from solidmark_jax.evaluation import augment as augment_lib
from solidmark_jax.evaluation import dori, mitigations
from solidmark_jax.evaluation import pruning as pruning_lib
from solidmark_jax.evaluation.evaluator import DUPLICATION_FILES, Evaluator, build_evaluator, local_rows
from solidmark_jax.experiment import outpaint_params
from solidmark_jax.training.loop import train
from solidmark_jax.workdir import Workdir

log = logging.getLogger(__name__)

KINDS = ("mitigation", "augment", "pruning")
PRUNING_FILE = "pruning.json"  # a pruning setting's record and denoising losses, in its directory
FINETUNE_DIR = "finetune"  # DIR/sweeps/finetune/<setting>/: an adversarial fine-tuning's Orbax checkpoints
ATTACKS = ("dori", "keysearch", "gni")  # what may follow "+" in a setting
LOSS_DRAWS = 8  # (t, eps) draws per image of the denoising loss

SWEEP_FORMAT = "solidmark-sweep/1"


@dataclasses.dataclass(frozen=True)
class Setting:
  """One evaluation setting: an inference-time mitigation, a query augmentation or a pruned model.

  Attributes:
    name: directory name, e.g. "none", "gni_0.1", "crop_2", "wanda_0.1".
    mitigation: `mitigations.Mitigation`.
    augmentation: `augment.Augmentation`.
    value: the swept strength / level / angle / sparsity / threshold (0 for the identity).
    pruning: `pruning.Pruning` of the UNet's cross-attention (the identity but in a pruning sweep).
    dori: a search before each query (a setting written "<setting>+dori" or "<setting>+keysearch"), or None.
    finetune: adversarial fine-tuning of the UNet ("adversarial:<steps>"), or None.
  """

  name: str
  mitigation: mitigations.Mitigation
  augmentation: augment_lib.Augmentation
  value: float = 0.0
  pruning: pruning_lib.Pruning = pruning_lib.Pruning()
  dori: dori.DoriSpec | None = None
  finetune: adversarial.AdversarialSpec | None = None

  @property
  def is_identity(self) -> bool:
    return (self.mitigation.is_identity and self.augmentation.is_identity and self.pruning.is_identity
            and self.dori is None and self.finetune is None)

  @property
  def method(self) -> str:
    """The model's mitigation and the query's, e.g. "none", "gni", "wanda", "wanda+dori", "adversarial+keysearch"."""
    model = [n for n in (self.pruning.name, "adversarial" if self.finetune else "none") if n != "none"]
    query = [n for n in (self.augmentation.name, self.mitigation.name) if n != "none"]
    if self.dori is not None:
      query.append(("dori_blind" if self.dori.key_blind else "dori") if self.dori.objective == "loss" else "keysearch")
    return "+".join(model + query) or "none"

  @property
  def is_model_identity(self) -> bool:
    """The unmodified model (its query may still be mitigated or searched)."""
    return self.pruning.is_identity and self.finetune is None


def _number(text: str, field: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise ValueError(f"{field}: {text!r} is not a number") from None
  if not math.isfinite(value):
    raise ValueError(f"{field}: {text!r} is not a finite number")
  return value


def make_setting(kind: str, name: str, value: float, *, seed: int = 0, field: str = "sweep",
                 rt_probability: float = mitigations.RT_PROBABILITY,
                 finetune: adversarial.AdversarialSpec | None = None) -> Setting:
  """The setting `name` at `value` of a sweep of `kind`; a clear error naming `field` for bad input.

  Args:
    kind: "mitigation" (value: GNI sigma, or RT / CWR / RNA / random_words iterations), "augment"
      (value: crop / blur level 1-4, or rotate angle in degrees) or "pruning" (value: Wanda's sparsity
      in [0, 1), NeMo's z-score threshold > 0 (docs/pruning.md), or the steps of adversarial fine-tuning).
    name: e.g. "gni", "crop", "wanda"; "none" for the plain query (value 0).
    value: strength, level or angle.
    seed: the config's mitigation / augmentation seed.
    field: named in errors, e.g. "sweep.settings[2]".
    rt_probability: RT's per-token replacement probability (the config's eval.mitigation.probability).
    finetune: the adversarial fine-tuning settings (the config's eval.adversarial) of "adversarial:<steps>".
  """
  if kind not in KINDS:
    raise ValueError(f"sweep.kind must be one of {KINDS}, got {kind!r}")
  none_m, none_a = mitigations.Mitigation(seed=seed), augment_lib.Augmentation(seed=seed)
  try:
    if name == "none":
      if value != 0:
        raise ValueError(f"'none' takes no value, got {value:g}")
      return Setting("none", none_m, none_a, 0.0)
    if kind == "mitigation":
      if name not in mitigations.MITIGATIONS:
        raise ValueError(f"unknown mitigation {name!r}; one of {mitigations.MITIGATIONS}")
      strength = value if name == "gni" else (int(value) if value == int(value) else value)
      extra = {"probability": rt_probability} if name == "rt" else {}
      m, a = mitigations.Mitigation(name, strength, seed, **extra), none_a
    elif kind == "pruning":
      if name == "adversarial":
        if value != int(value) or value < 1:
          raise ValueError(f"adversarial fine-tuning takes its number of steps (an integer >= 1), got {value:g}")
        spec = (finetune or adversarial.AdversarialSpec()).replace(steps=int(value))
        return Setting(f"{name}_{value:g}", none_m, none_a, float(value), finetune=spec)
      if name not in pruning_lib.METHODS:
        raise ValueError(f"unknown pruning method {name!r}; one of {(*pruning_lib.METHODS[1:], 'adversarial')}")
      return Setting(f"{name}_{value:g}", none_m, none_a, float(value), pruning_lib.Pruning(name, float(value)))
    else:
      if name not in augment_lib.AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; one of {augment_lib.AUGMENTATIONS}")
      if name == "rotate":
        a = augment_lib.Augmentation(name, angle=float(value), seed=seed)
      else:
        if value != int(value):
          raise ValueError(f"{name} levels are integers 1-4, got {value:g}")
        a = augment_lib.Augmentation(name, level=int(value), seed=seed)
      m = none_m
  except ValueError as e:
    raise ValueError(f"{field} ({name}:{value:g}): {e}") from None
  return Setting(f"{name}_{value:g}", m, a, float(value))


def _with_attack(setting: Setting, attack: str, field: str, searches: dict[str, dori.DoriSpec], seed: int) -> Setting:
  """`setting` queried with "+dori", "+dori:blind" (DoRI's search blind to the key), "+keysearch" or
  "+gni:<sigma>" (GNI on the caption embeddings)."""
  name, sep, value = attack.partition(":")
  value = value.strip()
  if (name not in ATTACKS or (name == "gni" and not sep) or (name == "keysearch" and sep)
      or (name == "dori" and sep and value != "blind")):
    raise ValueError(f"{field}: a setting may end in \"+dori\" (DoRI's search), \"+dori:blind\" (the search blind "
                     f"to the key), \"+keysearch\" (the key-targeted search) or \"+gni:<sigma>\" (noise on the "
                     f"caption embeddings), got \"+{attack}\"")
  if name == "dori" and sep:
    return dataclasses.replace(setting, name=f"{setting.name}+dori_blind",
                               dori=searches["dori"].replace(key_blind=True))
  if name != "gni":
    return dataclasses.replace(setting, name=f"{setting.name}+{name}", dori=searches[name])
  if not setting.mitigation.is_identity or not setting.augmentation.is_identity:
    raise ValueError(f"{field}: \"+gni\" adds a query mitigation to a model setting (pruning, fine-tuning or "
                     f"none); {setting.name!r} already changes the query")
  sigma = _number(value, field)
  try:
    gni = mitigations.Mitigation("gni", sigma, seed)
  except ValueError as e:
    raise ValueError(f"{field} (+gni:{value}): {e}") from None
  return dataclasses.replace(setting, name=f"{setting.name}+gni_{sigma:g}", mitigation=gni)


def settings_from_config(config: ml_collections.ConfigDict) -> list[Setting]:
  """The sweep's settings from `config.sweep`, the baseline (identity) row first.

  Either `sweep.settings` ("name:value" strings, "none") or `sweep.name` with `sweep.values`. The
  first identity setting is the baseline; "none" is added in front when the list has none.
  """
  s = config.sweep
  kind = s.get("kind", "mitigation")
  if kind not in KINDS:
    raise ValueError(f"sweep.kind must be one of {KINDS}, got {kind!r}")
  seed = int((config.eval.augment if kind == "augment" else config.eval.mitigation).get("seed", 0) or 0)
  probability = config.eval.mitigation.get("probability", mitigations.RT_PROBABILITY)
  probability = mitigations.RT_PROBABILITY if probability is None else float(probability)
  listed, name, values = tuple(s.get("settings") or ()), s.get("name") or "", tuple(s.get("values") or ())
  searches = {"dori": dori.DoriSpec.from_config(config.eval.get("dori")),
              "keysearch": dori.DoriSpec.from_config(config.eval.get("key_search"), "eval.key_search", "key")}
  finetune = adversarial.AdversarialSpec.from_config(config.eval.get("adversarial"))
  if listed and (name or values):
    raise ValueError("sweep: set either sweep.settings (\"name:value\" strings) or sweep.name with sweep.values, "
                     f"not both (settings={listed}, name={name!r}, values={values})")
  out = []
  if listed:
    for i, item in enumerate(listed):
      field = f"sweep.settings[{i}]"
      if not isinstance(item, str):
        raise ValueError(f"{field}: expected a \"name:value\" string such as \"gni:0.1\", got {item!r}")
      item, plus, attack = item.partition("+")
      head, sep, tail = item.partition(":")
      if not sep and head.strip() != "none":
        raise ValueError(f"{field}: expected \"name:value\" (e.g. \"gni:0.1\", \"crop:2\") or \"none\", got {item!r}")
      setting = make_setting(kind, head.strip(), _number(tail.strip(), field) if sep else 0.0, seed=seed,
                             field=field, rt_probability=probability, finetune=finetune)
      out.append(_with_attack(setting, attack.strip(), field, searches, seed) if plus else setting)
  elif name:
    if not values:
      raise ValueError(f"sweep.values: give the strengths / levels of sweep.name={name!r}, e.g. (0.0, 0.1, 0.5)")
    for i, v in enumerate(values):
      out.append(make_setting(kind, name, _number(str(v), f"sweep.values[{i}]"), seed=seed,
                              field=f"sweep.values[{i}]", rt_probability=probability))
  else:
    raise ValueError("sweep: no settings; set sweep.settings (e.g. (\"none\", \"gni:0.1\")) or sweep.name and "
                     "sweep.values")
  names = [x.name for x in out]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ValueError(f"sweep: settings listed twice: {dup}")
  base = next((i for i, x in enumerate(out) if x.is_identity), None)
  if base is None:
    out.insert(0, make_setting(kind, "none", 0.0, seed=seed, rt_probability=probability))
  else:
    out.insert(0, out.pop(base))
  return out


# ---------------------------------------------------------------------------------------------
# The table.


def _members(results) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  m = results.select("members")
  return m.instance_id, m.k_pred, m.key


def _dori_outcome(results) -> dict:
  """Per group the mean of DoRI's outcome per image: ||delta||, the denoising loss before and after."""
  out = {}
  for g in results.groups:
    ex = results.select(g).extras
    out[g] = {k: float(np.nanmean(ex[f"dori_{k}"][:, 0])) for k in ("delta_norm", "loss_initial", "loss_final")
              if f"dori_{k}" in ex}
  return out


def _subsets(results, targets: Sequence[int], thresholds, statistic: str) -> dict:
  """The members' hits beside exact chance for the targeted ones and for the rest."""
  ids, pred, keys = _members(results)
  hit = np.isin(ids, np.asarray(targets))
  out = {}
  for label, rows in (("targeted", hit), ("rest", ~hit)):
    s = metrics.summarize(pred[rows], keys[rows], thresholds, statistic=statistic, num_permutations=0)
    out[label] = {"n": s["n"], "counts": s["counts"], "chance_expected": s["chance"]["expected"],
                  "p_value": s["chance"]["p_value"]}
  return out


def sweep_table(settings: Sequence[Setting], summaries: Sequence[dict], results: Sequence, *, name: str = "",
                kind: str = "", targets: Sequence[int] | None = None) -> dict:
  """Rows of a sweep (the baseline first) from each setting's summary and results (same members).

  Each row has the members' counts beside their exact chance, and the setting's effect against the
  baseline row on the same images (`metrics.paired_effect`: reduction of the excess over chance with
  a paired bootstrap interval, McNemar's exact test). With `targets` (member ids an adversarial
  fine-tuning targets), every row also scores the targeted members and the rest apart ("subsets").
  """
  if not len(settings) == len(summaries) == len(results):
    raise ValueError(f"sweep_table: {len(settings)} settings, {len(summaries)} summaries, {len(results)} results")
  thresholds = summaries[0]["thresholds"]
  statistic = summaries[0]["statistic"]
  base_ids, base_pred, base_keys = _members(results[0])
  rows = []
  for setting, summary, res in zip(settings, summaries, results):
    m = summary["groups"]["members"]
    ids, pred, _ = _members(res)
    if not np.array_equal(ids, base_ids):
      raise ValueError(f"sweep: setting {setting.name!r} scored other members than the baseline "
                       f"{settings[0].name!r}; a paired comparison needs the same images")
    effect = metrics.paired_effect(base_pred, pred, base_keys, thresholds, statistic=statistic)
    row = {
        "setting": setting.name, "method": setting.method, "value": setting.value,
        "mitigation": setting.mitigation.as_record(), "augment": setting.augmentation.as_record(),
        "n": m["n"], "repeats": m["repeats"], "counts": m["counts"], "rates": m["rates"],
        "chance": m["chance"], "effect": effect, "l_sm_mean": m["l_sm"]["mean"],
    }
    nm = summary["groups"].get("non_members")
    if nm is not None:
      row["non_members"] = {"n": nm["n"], "counts": nm["counts"], "rates": nm["rates"], "l_sm_mean": nm["l_sm"]["mean"],
                            "chance_expected": nm["chance"]["expected"], "p_value": nm["chance"]["p_value"]}
    for field in ("pruning", "denoising_loss"):
      if field in summary:
        row[field] = summary[field]
    if setting.dori is not None:
      row["dori"] = {"spec": setting.dori.as_record(), **_dori_outcome(res)}
    if targets is not None:
      row["subsets"] = _subsets(res, targets, thresholds, statistic)
    if "duplication" in summary:
      row["duplication"] = {k: {"counts": v["counts"], "n": v["n"], "chance_expected": v["chance"]["expected"]}
                            for k, v in summary["duplication"]["levels"].items()}
    rows.append(row)
  return {"format": SWEEP_FORMAT, "name": name, "kind": kind, "thresholds": thresholds,
          "statistic": statistic, "baseline": settings[0].name,
          "checkpoint_step": summaries[0].get("checkpoint_step"), "rows": rows}


# ---------------------------------------------------------------------------------------------
# Pruned models (sweep.kind = "pruning").


def pruned_evaluator(ev: Evaluator, spec: pruning_lib.Pruning) -> Evaluator:
  """`ev` with its UNet pruned by `spec` (docs/pruning.md): the memorised prompts are the members' own
  captions, NeMo's ordinary prompts the non-members'. The random-init model is left as it is; the
  record (method, value, how much was pruned) goes into every store's metadata. The identity: `ev`."""
  if spec.is_identity:
    return ev  # the plain model: its store is shared with the other sweeps' baseline
  if not ev.exp.is_text:
    raise ValueError("sweep.kind 'pruning' prunes the cross-attention over text embeddings: it needs a "
                     f"text-conditioned model (model.condition = 'text'), got {ev.config.model.condition!r}")
  plain = ev.conditioner(mitigations.Mitigation())
  by_name = {g.name: g for g in ev.groups}
  emb = lambda g: np.asarray(plain(g.conditions, g.ids, g.captions))
  unet, record = pruning_lib.prune(ev.unet_params, spec, emb(by_name["members"]), emb(by_name["non_members"]))
  # pruned leaves back onto the parameters' own shardings (every other leaf is the same object)
  unet = jax.tree.map(lambda new, old: new if new is old else jax.device_put(new, old.sharding), unet, ev.unet_params)
  params = {name: p if name == "random_init" else outpaint_params(ev.exp, unet, ev.frozen)
            for name, p in ev.params.items()}
  return dataclasses.replace(ev, params=params, unet_params=unet, pruning=record)


def targeted_ids(ev: Evaluator, spec: adversarial.AdversarialSpec) -> np.ndarray:
  """The members an adversarial fine-tuning targets: the first `spec.targets` by instance id (the rest
  of the members are its retain set)."""
  members = next(g for g in ev.groups if g.name == "members")
  if not 1 <= spec.targets < len(members.ids):
    raise ValueError(f"eval.adversarial.targets={spec.targets}: the targeted members must be at least 1 and fewer "
                     f"than the {len(members.ids)} members (the rest are the retain set)")
  return np.sort(members.ids)[:spec.targets]


def finetuned_evaluator(ev: Evaluator, spec: adversarial.AdversarialSpec, directory: str) -> Evaluator:
  """`ev` with its UNet fine-tuned against DoRI's triggers for the targeted members (`targeted_ids`),
  the other members as the retain set (evaluation/adversarial.py). Checkpoints in `directory`: a re-run
  resumes the fine-tuning (or loads its end). The cap is `spec.cap` or, if None, the held-out
  non-members' mean denoising loss on the plain model. The record goes into every store's metadata."""
  if not ev.exp.is_text or ev.exp.is_latent:
    raise ValueError("adversarial fine-tuning searches triggers in text-embedding space through the pixel denoiser: "
                     "it needs a pixel model with model.condition = 'text' (got space "
                     f"{ev.config.model.get('space', 'pixel')!r}, condition {ev.config.model.condition!r})")
  if jax.process_count() > 1:
    raise ValueError("adversarial fine-tuning runs in one process (its sets are small and held whole); "
                     f"this run has {jax.process_count()}")
  members = next(g for g in ev.groups if g.name == "members")
  targets = targeted_ids(ev, spec)
  plain = ev.conditioner(mitigations.Mitigation())

  def images(ids):
    pos = np.searchsorted(members.ids, ids)
    captions = [members.captions[p] for p in pos] if members.captions is not None else None
    return members.read(ids), np.asarray(plain(members.conditions[pos], ids, captions)), ids.astype(np.int32)

  cap = spec.cap
  if cap is None:
    cap = denoising_losses(ev)["non_members"]["mean"]
  rest = np.setdiff1d(members.ids, targets)
  unet, record = adversarial.finetune(ev.op.denoiser, ev.unet_params, ev.exp.sched, images(targets), images(rest),
                                      spec, cap=cap, directory=directory, progress=ev.is_main)
  unet = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), unet, ev.unet_params)
  params = {name: p if name == "random_init" else outpaint_params(ev.exp, unet, ev.frozen)
            for name, p in ev.params.items()}
  info = {"name": "adversarial", "value": float(spec.steps), "targets": [int(i) for i in targets],
          **adversarial.finetune_record(record)}
  return dataclasses.replace(ev, params=params, unet_params=unet, pruning=info)


def model_evaluator(ev: Evaluator, setting: Setting, layout: Workdir) -> Evaluator:
  """The evaluator of a setting's model: `ev` itself, pruned, or adversarially fine-tuned."""
  if setting.finetune is not None:
    return finetuned_evaluator(ev, setting.finetune, os.path.join(layout.sweeps, FINETUNE_DIR,
                                                                  setting.name.partition("+")[0]))
  return pruned_evaluator(ev, setting.pruning)


def denoising_losses(ev: Evaluator, draws: int = LOSS_DRAWS) -> dict | None:
  """Each group's training loss under its plain condition (members and held-out non-members; the
  same (t, eps) draws for every setting, seeded by eval.seed and instance id): how much a pruned
  model's ordinary denoising moves. {group: {"mean", "per_image"}}; None for latent models (their loss
  is on latents, not computed here)."""
  if ev.exp.is_latent:
    return None
  plain = ev.conditioner(mitigations.Mitigation())
  rng = jax.random.key(ev.config.eval.seed)
  size = ev.config.eval.batch_size
  out = {}
  for g in ev.groups:
    if g.name == "random_init":
      continue
    losses = []
    for start in range(0, len(g.ids), size):
      ids = g.ids[start:start + size]
      mine, condition = local_rows(g, ids, size, plain)
      batch = parallel.global_batch(ev.mesh, {"x0": g.read(mine), "c": condition, "ids": mine.astype(np.int32)})
      loss = dori.denoising_loss(ev.op.denoiser, ev.params[g.name], ev.exp.sched, batch["x0"], batch["c"], rng,
                                 draws=draws, ids=batch["ids"], prediction_type=ev.exp.prediction_type)
      losses.append(np.asarray(parallel.to_host(loss))[:len(ids)])
    per = np.concatenate(losses)
    out[g.name] = {"mean": float(per.mean()), "per_image": [float(v) for v in per]}
  return out


def _split_losses(losses: dict | None, ev: Evaluator, targets: np.ndarray | None) -> dict | None:
  """`denoising_losses` with the members' mean split into the targeted ones and the rest (a sweep with
  adversarial fine-tuning)."""
  if losses is None or targets is None or "members" not in losses:
    return losses
  ids = next(g for g in ev.groups if g.name == "members").ids
  per = np.asarray(losses["members"]["per_image"])
  hit = np.isin(ids, targets)
  return {**losses, "targeted": {"mean": float(per[hit].mean())}, "rest": {"mean": float(per[~hit].mean())}}


# ---------------------------------------------------------------------------------------------
# Running a sweep.


def _latest_step(workdir: str) -> int | None:
  directory = Workdir(workdir).checkpoints
  if not os.path.isdir(directory):
    return None
  steps = [int(d) for d in os.listdir(directory) if d.isdigit()]
  return max(steps) if steps else None


def ensure_trained(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Trains (or resumes training) when the workdir has no checkpoint at train.num_steps."""
  latest = _latest_step(workdir)
  if latest is not None and latest >= config.train.num_steps:
    return
  log.info("%s: %s; training to step %d first", workdir,
           "no checkpoint" if latest is None else f"latest checkpoint {latest}", config.train.num_steps)
  train(config, workdir)


def _finished(out_dir: str, has_duplicates: bool, pruned: bool = False) -> dict | None:
  path = os.path.join(out_dir, "summary.json")
  if not os.path.exists(path):
    return None
  if has_duplicates and not os.path.exists(os.path.join(out_dir, DUPLICATION_FILES[0])):
    return None
  with open(path) as f:
    summary = json.load(f)
  if has_duplicates:
    with open(os.path.join(out_dir, DUPLICATION_FILES[0])) as f:
      summary["duplication"] = json.load(f)
  if pruned:
    if not os.path.exists(os.path.join(out_dir, PRUNING_FILE)):
      return None
    with open(os.path.join(out_dir, PRUNING_FILE)) as f:
      summary.update(json.load(f))
  return summary


def run_sweep(config: ml_collections.ConfigDict, workdir: str, *, name: str | None = None, step: int | None = None,
              train: bool = True, evaluator: Evaluator | None = None) -> str | None:
  """Scores every setting of `config.sweep` on one checkpoint; writes the sweep table, returns its directory.

  Args:
    config: the experiment config with its `sweep` section.
    workdir: the training workdir; trained first (`train=True`) if it has no final checkpoint.
    name: the sweep's name (its folder DIR/sweeps/<name>/); default "<kind>_<method>".
    step: checkpoint step (default: the latest).
    train: train first when needed (`ensure_trained`); step must then be None.
    evaluator: an `Evaluator` of this config and workdir to reuse (tests); built otherwise.

  Returns:
    On process 0 the sweep's directory DIR/sweeps/<name>/ (sweep.json, table.md, sweep.png), None elsewhere.

  Raises:
    dirlock.DirectoryInUse: another live process runs a sweep of this workdir (DIR/sweeps/ is locked).
  """
  workdir = os.path.abspath(workdir)
  with dirlock.hold(Workdir(workdir).sweeps, "sweep"):
    return _run_sweep(config, workdir, name=name, step=step, train=train, evaluator=evaluator)


def _run_sweep(config, workdir: str, *, name: str | None, step: int | None, train: bool,
               evaluator: Evaluator | None) -> str | None:
  settings = settings_from_config(config)  # bad settings fail before anything is trained or loaded
  kind = config.sweep.kind
  name = name or f"{kind}_{config.sweep.get('name') or 'settings'}"
  if train and step is None and evaluator is None:
    ensure_trained(config, workdir)
  ev = evaluator or build_evaluator(config, workdir, step)
  layout = Workdir(workdir)
  dirs = [layout.setting(s.name) for s in settings]
  has_dup = bool(config.data.get("duplicates"))
  pruned = kind == "pruning"
  # a pruning sweep: each setting its own pruned or fine-tuned model (the baseline the plain one), built
  # once for the settings that share it ("wanda_0.2" and "wanda_0.2+dori")
  models: dict = {}
  evs = []
  for s in settings:
    if not pruned:
      evs.append(ev)
      continue
    key = (s.pruning, s.finetune)
    if key not in models:
      models[key] = model_evaluator(ev, s, layout)
    evs.append(models[key])
  finetunes = [s.finetune for s in settings if s.finetune is not None]
  targets = targeted_ids(ev, finetunes[0]) if finetunes else None
  for s in settings:  # a DoRI setting on a model it cannot search fails before anything runs
    if s.dori is not None:
      ev.query(s.mitigation, s.augmentation, s.dori)
  # Every store opened (and checked against its stored settings) before anything is compiled.
  stores = [e.open_store(d, s.mitigation, s.augmentation, s.dori) for e, d, s in zip(evs, dirs, settings)]
  per = ev.images_per_setting
  done = [ev.done_count(st) for st in stores]
  finished = [_finished(d, has_dup, pruned) if n == per and ev.is_main else None for d, n in zip(dirs, done)]
  if ev.is_main and sum(done):
    log.info("sweep %s: %d of %d settings finished, %d of %d images already scored", name,
             sum(f is not None for f in finished), len(settings), sum(done), per * len(settings))
  bar = tqdm(total=per * len(settings), initial=sum(done), desc=f"sweep {name}", unit="img", dynamic_ncols=True,
             disable=not ev.is_main)
  summaries, results = [], []
  for e, setting, d, store, summary in zip(evs, settings, dirs, stores, finished):
    if summary is None or jax.process_count() > 1:
      bar.set_postfix_str(setting.name)
      summary = e.score(d, setting.mitigation, setting.augmentation, bar=bar, store=store,
                        write_grid=bool(config.eval.num_grid), dori=setting.dori)
      if pruned:
        extra = {"pruning": e.pruning or {**setting.pruning.as_record(), "pruned": 0},
                 "denoising_loss": _split_losses(denoising_losses(e), e, targets)}
        if e.is_main:
          atomic.write_json(os.path.join(d, PRUNING_FILE), extra, indent=2)
          summary.update(extra)
    summaries.append(summary)
    results.append(store.results() if ev.is_main else None)
  bar.close()
  if not ev.is_main:
    return None
  table = sweep_table(settings, summaries, results, name=name, kind=kind, targets=targets)
  table["outpainter_traces"] = ev.trace_count  # compilations of the outpainter in this process (one per shape)
  out = layout.sweep(name)
  os.makedirs(out, exist_ok=True)
  atomic.write_json(os.path.join(out, "sweep.json"), table, indent=2)
  text = report.sweep_markdown(table)
  if has_dup:
    text += "\n" + "\n".join(f"## {s.name}\n\n" + open(os.path.join(d, DUPLICATION_FILES[1])).read()
                             for s, d in zip(settings, dirs))
  atomic.write_text(os.path.join(out, "table.md"), text)
  report.plot_sweep(os.path.join(out, "sweep.png"), table)
  log.info("sweep %s written to %s", name, out)
  return out


def compare_runs(base_dir: str, other_dir: str, out_dir: str, *, labels: tuple[str, str] = ("base", "other"),
                 thresholds: Sequence[float] | None = None, statistic: str | None = None) -> dict:
  """Two evaluations of the same members (e.g. border vs centre models), compared per image against chance.

  Reads each directory's results.jsonl (an eval directory or a sweep setting), pairs the members by
  instance id and writes `metrics.paired_effect` of `other` against `base` to out_dir/comparison.{json,md}.
  Thresholds and statistic default to the base run's summary.json.
  """
  runs = []
  for d in (base_dir, other_dir):
    meta, res = report.store.read_results(os.path.join(d, "results.jsonl"))
    runs.append(res.select("members"))
  if not np.array_equal(runs[0].instance_id, runs[1].instance_id):
    raise ValueError(f"{base_dir} and {other_dir} scored different members; a paired comparison needs the same "
                     "images (same data subset and eval.seed)")
  if not np.array_equal(runs[0].key, runs[1].key):
    raise ValueError(f"{base_dir} and {other_dir}: the members' keys differ (another keymap)")
  if thresholds is None or statistic is None:
    with open(os.path.join(base_dir, "summary.json")) as f:
      base_summary = json.load(f)
    thresholds = thresholds or base_summary["thresholds"]
    statistic = statistic or base_summary["statistic"]
  summaries = [metrics.summarize(r.k_pred, r.key, thresholds, statistic=statistic) for r in runs]
  effect = metrics.paired_effect(runs[0].k_pred, runs[1].k_pred, runs[0].key, thresholds, statistic=statistic)
  out = {"format": SWEEP_FORMAT, "labels": list(labels), "dirs": [base_dir, other_dir], "thresholds": list(thresholds),
         "statistic": statistic, "summaries": dict(zip(labels, summaries)), "effect": effect}
  os.makedirs(out_dir, exist_ok=True)
  atomic.write_json(os.path.join(out_dir, "comparison.json"), out, indent=2)
  atomic.write_text(os.path.join(out_dir, "comparison.md"), report.comparison_markdown(out))
  return out
