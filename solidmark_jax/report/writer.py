"""The memorisation report: summary.json, per_image.csv, summary.md and PNG plots.

Everything is computed from `Results` (sorted by group and instance id), never from the order in
which batches finished, and nothing time-dependent is written (the permutation null is seeded), so
a resumed evaluation gives byte-identical files to an uninterrupted one. Every count stands beside
its exact chance given the group's predictions (metrics/chance.py) and the key-permutation null.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Sequence

import numpy as np

from solidmark_jax import atomic, marks
from solidmark_jax.metrics import chance, magnitude, memorisation
from solidmark_jax.metrics import regions as region_stats
from solidmark_jax.report import plots
from solidmark_jax.report.format import p_value, percent
from solidmark_jax.report.store import EXTRA_FIELDS, Results

SUMMARY_FORMAT = "solidmark-summary/2"
MEMBERS = "members"


def summarize_results(results: Results, thresholds: Sequence[float] = memorisation.DEFAULT_THRESHOLDS, *,
                      statistic: str = "best", level: float = 0.95, ci_method: str = "wilson",
                      key_bits: int | None = marks.KEY_BITS, metadata: dict | None = None,
                      num_permutations: int = 1000, seed: int = 0) -> dict:
  """The summary dict written to summary.json.

  Args:
    results: per-image results (from `ResultStore.results()`).
    thresholds: deltas (validated).
    statistic: "best" (min over r) or "mean" over r: which per-image score is counted.
    level: confidence level of the intervals and null bands.
    ci_method: "wilson" or "clopper-pearson".
    key_bits: k_pred read on the key grid (`metrics.l_sm`); None for raw.
    metadata: e.g. {"keymap_hash": ..., "checkpoint_step": ..., "sampler": ...}; stored as is.
    num_permutations: draws of each group's key-permutation null.
    seed: their seed.

  Returns:
    {format, thresholds, statistic, keymap_hash, checkpoint_step, metadata,
     groups: {group: `metrics.summarize` dict}, comparisons: {"members_vs_<g>": `metrics.compare`}}.
  """
  thresholds = memorisation.validate_thresholds(thresholds)
  metadata = json.loads(json.dumps(metadata or {}))
  groups, scored = {}, {}
  for g in results.groups:
    sel = results.select(g)
    groups[g] = memorisation.summarize(sel.k_pred, sel.key, thresholds, statistic=statistic, level=level,
                                       ci_method=ci_method, key_bits=key_bits, num_permutations=num_permutations,
                                       seed=seed)
    scored[g] = {"scores": memorisation.per_image_scores(sel.k_pred, sel.key, statistic, key_bits),
                 "counts": groups[g]["counts"]}
  comparisons = {}
  if MEMBERS in scored:
    for g in scored:
      if g != MEMBERS and len(scored[g]["scores"]) and len(scored[MEMBERS]["scores"]):
        comparisons[f"members_vs_{g}"] = memorisation.compare(scored[MEMBERS], scored[g], thresholds)
  summary = {
      "format": SUMMARY_FORMAT,
      "thresholds": list(thresholds),
      "statistic": statistic,
      "statistic_doc": ("per image, the best (minimum) l_SM over its r evaluations" if statistic == "best"
                        else "per image, the mean l_SM over its r evaluations"),
      "key_bits": key_bits,
      "keymap_hash": metadata.get("keymap_hash"),
      "checkpoint_step": metadata.get("checkpoint_step"),
      "metadata": metadata,
      "groups": groups,
      "comparisons": comparisons,
  }
  if results.noise_magnitude is not None:
    steps = (metadata.get("eval") or {}).get("magnitude_steps")
    summary["noise_magnitude"] = magnitude.summarize_magnitude(
        per_group_magnitude(results), {g: scored[g]["scores"] for g in scored}, members=MEMBERS, steps=steps)
  if "region_l2" in results.extras:
    extras = {g: results.select(g).extras for g in results.groups}
    summary["region"] = {"region": metadata.get("region"), "masks": metadata.get("region_masks"),
                         **region_stats.summarize_regions(extras, statistic=statistic, members=MEMBERS)}
  return summary


def per_group_magnitude(results: Results) -> dict[str, np.ndarray]:
  """{group: [n] per-image noise magnitude} of results that hold one (guided sampling)."""
  return {g: magnitude.per_image(results.select(g).noise_magnitude) for g in results.groups}


def write_per_image_csv(path: str, results: Results, key_bits: int | None = marks.KEY_BITS,
                        thresholds: Sequence[float] = memorisation.DEFAULT_THRESHOLDS, statistic: str = "best") -> str:
  """One row per image: instance_id, group, member, key(s), k_pred per repeat (and key), l_sm_best, l_sm_mean,
  chance_<delta>: the image's exact chance of a hit given its predictions (`metrics.chance`), with
  guidance noise_magnitude (the mean over the repeats, `metrics.magnitude`), and for a region query
  region_l2 / region_ssim and their nulls (the statistic of the repeats, `metrics.regions`)."""
  thresholds = memorisation.validate_thresholds(thresholds)
  n = len(results)
  k_pred = results.k_pred
  multi = results.key.ndim == 2
  r = k_pred.shape[1] if n else 0
  m = results.key.shape[1] if multi else 1
  key_cols = [f"key_{s}" for s in range(m)] if multi else ["key"]
  pred_cols = ([f"k_pred_{j}_{s}" for j in range(r) for s in range(m)] if multi else [f"k_pred_{j}" for j in range(r)])
  best = memorisation.per_image_scores(k_pred, results.key, "best", key_bits) if n else np.zeros(0)
  mean = memorisation.per_image_scores(k_pred, results.key, "mean", key_bits) if n else np.zeros(0)
  probs = (chance.hit_probabilities(k_pred, thresholds, statistic=statistic, key_bits=key_bits)
           if n else np.zeros((0, len(thresholds))))
  guided = results.noise_magnitude is not None
  noise = magnitude.per_image(results.noise_magnitude) if guided and n else np.zeros(n)
  extra_cols = [name for name in EXTRA_FIELDS if name in results.extras]
  extra = {name: region_stats.reduce(results.extras[name], statistic, higher_is_closer=name.endswith("ssim"))
           for name in extra_cols} if n else {name: np.zeros(0) for name in extra_cols}
  num = lambda v: "" if math.isnan(v) else repr(float(v))
  with atomic.replace(path, newline="") as f:
    w = csv.writer(f)
    w.writerow(["instance_id", "group", "member", *key_cols, *pred_cols, "l_sm_best", "l_sm_mean",
                *[f"chance_{d:g}" for d in thresholds], *(["noise_magnitude"] if guided else []), *extra_cols])
    for i in range(n):
      w.writerow([int(results.instance_id[i]), results.group[i], int(results.group[i] == MEMBERS),
                  *[num(v) for v in np.atleast_1d(results.key[i])], *[num(v) for v in k_pred[i].reshape(-1)],
                  num(best[i]), num(mean[i]), *[num(v) for v in probs[i]], *([num(noise[i])] if guided else []),
                  *[num(extra[name][i]) for name in extra_cols]])
  return path


def summary_markdown(summary: dict) -> str:
  """The summary as a Markdown page: per threshold and group, hits beside exact chance and the nulls."""
  groups = summary["groups"]
  names = list(groups)
  first = groups[names[0]] if names else None
  level = int(round(100 * first["ci_level"])) if first else 95
  lines = ["# SolidMark memorisation report", ""]
  meta = summary["metadata"]
  for k in ("keymap_hash", "checkpoint_step"):
    if summary.get(k) is not None:
      lines.append(f"- {k.replace('_', ' ')}: `{summary[k]}`")
  for k, v in meta.items():
    if k not in ("keymap_hash", "checkpoint_step"):
      lines.append(f"- {k.replace('_', ' ')}: `{v}`")
  repeats = {g: groups[g]["repeats"] for g in names}
  lines.append(f"- scored statistic: {summary['statistic_doc']} (r = "
               + ", ".join(f"{g}: {r}" for g, r in repeats.items()) + ")")
  if first is not None:
    if first.get("num_keys", 1) > 1:
      lines.append(f"- {first['num_keys']} keys per image: a hit needs every key within d")
    lines.append(f"- chance: {first['chance']['doc']}")
    lines.append("- memorised beyond chance: (rate - chance) / (1 - chance), exact interval by test inversion")
    perm = next((groups[g]["permutation"] for g in names if groups[g]["permutation"]), None)
    if perm:
      lines.append(f"- permutation null: the group's predictions scored against other images' keys "
                   f"({perm['num_permutations']} seeded derangements): median [{level}% band], p")
    lines.append(f"- reference: {first['reference_chance']['doc']}")
  head = ["threshold", "group", f"hits / n (%) [{level}% CI]", "chance expected (rate)", f"null {level}% band",
          "p (exact)", "permutation null", f"memorised beyond chance [{level}% CI]", "reference chance"]
  lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for t, d in enumerate(summary["thresholds"]):
    for g in names:
      s = groups[g]
      lo, hi = s["ci"][t]
      c = s["chance"]
      perm = s["permutation"]
      perm_txt = (f"{perm['median'][t]:g} [{perm['band'][t][0]}, {perm['band'][t][1]}], p = "
                  f"{p_value(perm['p_value'][t])}" if perm else "-")
      corrected = c["corrected"][t]
      clo, chi = c["corrected_ci"][t]
      corr_txt = "-" if corrected is None else f"{percent(corrected)} [{percent(clo)}, {percent(chi)}]"
      lines.append("| " + " | ".join([
          f"(l_SM, {d:g})", g,
          f"{s['counts'][t]} / {s['n']} ({percent(s['rates'][t], 2)}) [{percent(lo, 2)}, {percent(hi, 2)}]",
          f"{c['expected'][t]:.2f} ({percent(c['rate'][t], 2)})", f"[{c['band'][t][0]}, {c['band'][t][1]}]",
          p_value(c["p_value"][t]), perm_txt, corr_txt,
          f"{s['reference_chance']['expected'][t]:.1f} ({percent(s['reference_chance']['rate'][t], 2)})"]) + " |")
  lines += ["", "| group | n | mean l_SM | median l_SM |", "|---|---|---|---|"]
  for g in names:
    s = groups[g]["l_sm"]
    fmt = lambda v: "-" if v is None else f"{v:.4f}"
    lines.append(f"| {g} | {groups[g]['n']} | {fmt(s['mean'])} | {fmt(s['median'])} |")
  comps = summary["comparisons"]
  if comps:
    names_c = list(comps)
    lines += ["", "## Members against the other groups", "",
              "| " + " | ".join(["threshold"] + [f"p ({c.replace('_', ' ')}, Fisher)" for c in names_c]) + " |",
              "|" + "---|" * (len(names_c) + 1)]
    for t, d in enumerate(summary["thresholds"]):
      lines.append("| " + " | ".join([f"(l_SM, {d:g})"] + [p_value(comps[c]["fisher_p"][t]) for c in names_c]) + " |")
    lines += ["", "Fisher: one-sided, members' eidetic rate higher. Membership inference by l_SM (smaller = member):",
              "", "| comparison | AUC | TPR at 1% FPR | TPR at 0.1% FPR | Mann-Whitney p |", "|---|---|---|---|---|"]
    for name in names_c:
      mi = comps[name]["membership_inference"]
      tpr = mi["tpr_at_fpr"]
      note = "" if mi.get("fpr_resolution", 0) <= 0.001 else " (FPR resolution 1/%d)" % mi["n_other"]
      lines.append(f"| {name.replace('_', ' ')}{note} | {mi['auc']:.3f} | {percent(tpr.get('0.01'), 2)} | "
                   f"{percent(tpr.get('0.001'), 2)} | {p_value(comps[name]['mann_whitney']['p_value'])} |")
  if "noise_magnitude" in summary:
    lines += magnitude_markdown(summary["noise_magnitude"])
  if "region" in summary:
    lines += region_markdown(summary["region"])
  return "\n".join(lines) + "\n"


def region_markdown(section: dict) -> list[str]:
  """The region-query section of summary.md (`metrics.regions.summarize_regions`)."""
  fmt = lambda s: "-" if s["mean"] is None else f"{s['mean']:.4f} / {s['median']:.4f}"
  lines = ["", f"## Region query: the {section['region']} hidden with the key (FB-Mem's view)", "",
           f"Masks: `{section['masks']}`. Per image the {section['statistic']} of its repeats; l2 in units of the "
           "value range. The null: the same reconstruction against another image's truth in the same region.", "",
           "| group | l2 mean / median | SSIM mean / median | null l2 mean / median | null SSIM | closer than null | "
           "p (Wilcoxon) |", "|---|---|---|---|---|---|---|"]
  for g, s in section["groups"].items():
    vs = s["vs_null"]
    lines.append(f"| {g} | {fmt(s['l2'])} | {fmt(s['ssim'])} | {fmt(s['null_l2'])} | {fmt(s['null_ssim'])} | "
                 f"{percent(vs['closer'])} | {p_value(vs['p_value'])} |")
  if section["comparisons"]:
    lines += ["", "| comparison | region l2 AUC (smaller = member) | Mann-Whitney p |", "|---|---|---|"]
    for name, c in section["comparisons"].items():
      auc = c["membership_inference"]["auc"]
      lines.append(f"| {name.replace('_', ' ')} | {'-' if auc is None else f'{auc:.3f}'} | "
                   f"{p_value(c['mann_whitney']['p_value'])} |")
  return lines


def magnitude_markdown(section: dict) -> list[str]:
  """The noise-magnitude section of summary.md (`metrics.magnitude.summarize_magnitude`)."""
  fmt = lambda v, spec=".3f": "-" if v is None else format(v, spec)
  rho = lambda c: "-" if c["rho"] is None else f"{c['rho']:+.3f} (p = {p_value(c['p_value'])})"
  steps = section.get("steps")
  lines = ["", "## Noise magnitude (Wen et al. 2024)", "",
           f"{section['doc']}" + (f"; k = {steps}" if steps is not None else "") + ". Spearman's rho against the "
           "scored l_SM: negative when the two detectors agree.", "",
           "| group | n | mean | sd | median | rho with l_SM |", "|---|---|---|---|---|---|"]
  for g, s in section["groups"].items():
    lines.append(f"| {g} | {s['n']} | {fmt(s['mean'])} | {fmt(s['sd'])} | {fmt(s['median'])} | "
                 f"{rho(s['rank_correlation'])} |")
  lines.append(f"| all images | {section['pooled_rank_correlation']['n']} | | | | "
               f"{rho(section['pooled_rank_correlation'])} |")
  if section["comparisons"]:
    lines += ["", "Membership inference by the magnitude (larger = member):", "",
              "| comparison | AUC | TPR at 1% FPR | TPR at 0.1% FPR |", "|---|---|---|---|"]
    for name, mi in section["comparisons"].items():
      tpr = mi["tpr_at_fpr"]
      lines.append(f"| {name.replace('_', ' ')} | {fmt(mi['auc'])} | {percent(tpr.get('0.01'), 2)} | "
                   f"{percent(tpr.get('0.001'), 2)} |")
  return lines


def write_report(out_dir: str, results: Results, thresholds: Sequence[float] = memorisation.DEFAULT_THRESHOLDS, *,
                 statistic: str = "best", level: float = 0.95, ci_method: str = "wilson",
                 key_bits: int | None = marks.KEY_BITS, metadata: dict | None = None,
                 plots_enabled: bool = True, num_permutations: int = 1000, seed: int = 0) -> dict:
  """Writes summary.json, per_image.csv, summary.md (and l_sm_hist.png, eidetic_rates.png, roc.png; with
  guidance noise_magnitude.png).

  Every file is written to a temporary name and moved into place, so a crash never leaves a
  half-written summary.

  Returns:
    The summary dict (as in summary.json).
  """
  os.makedirs(out_dir, exist_ok=True)
  summary = summarize_results(results, thresholds, statistic=statistic, level=level, ci_method=ci_method,
                              key_bits=key_bits, metadata=metadata, num_permutations=num_permutations, seed=seed)
  atomic.write_json(os.path.join(out_dir, "summary.json"), summary, indent=2)
  write_per_image_csv(os.path.join(out_dir, "per_image.csv"), results, key_bits, summary["thresholds"], statistic)
  atomic.write_text(os.path.join(out_dir, "summary.md"), summary_markdown(summary))
  if plots_enabled and len(results):
    scores, chance_rates = {}, {}
    for g in results.groups:
      sel = results.select(g)
      scores[g] = memorisation.per_image_scores(sel.k_pred, sel.key, statistic, key_bits)
      chance_rates[g] = chance.hit_probabilities(sel.k_pred, plots.EIDETIC_PLOT_DELTAS, statistic=statistic,
                                                 key_bits=key_bits).mean(axis=0)
    plots.plot_l_sm_histograms(os.path.join(out_dir, "l_sm_hist.png"), scores, summary["thresholds"], statistic)
    plots.plot_eidetic_rates(os.path.join(out_dir, "eidetic_rates.png"), scores, summary["groups"], chance_rates,
                             statistic)
    noise = per_group_magnitude(results) if results.noise_magnitude is not None else None
    if MEMBERS in scores:
      curves = {}
      for name, comp in summary["comparisons"].items():
        other = name[len("members_vs_"):]
        roc = memorisation.roc_curve(scores[MEMBERS], scores[other])
        curves[f"members vs {other}"] = {**roc, "auc": comp["membership_inference"]["auc"]}
        if noise is not None:
          roc = magnitude.magnitude_roc(noise[MEMBERS], noise[other])
          auc = summary["noise_magnitude"]["comparisons"][name]["auc"]
          curves[f"members vs {other}, noise magnitude"] = {**roc, "auc": auc}
      if curves:
        plots.plot_roc(os.path.join(out_dir, "roc.png"), curves)
    if noise is not None:
      plots.plot_magnitude(os.path.join(out_dir, "noise_magnitude.png"), noise, scores, statistic)
    if "region_l2" in results.extras:
      l2 = {g: region_stats.reduce(results.select(g).extras["region_l2"], statistic) for g in results.groups}
      null = {g: region_stats.reduce(results.select(g).extras["region_null_l2"], statistic) for g in results.groups}
      plots.plot_region_l2(os.path.join(out_dir, "region_l2_hist.png"), l2, null, summary["region"]["region"])
  return summary
