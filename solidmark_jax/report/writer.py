"""The memorisation report: summary.json, per_image.csv, summary.md and PNG plots.

Everything is computed from `Results` (sorted by group and instance id), never from the order in
which batches finished, and nothing time-dependent is written, so a resumed evaluation gives
byte-identical files to an uninterrupted one.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Sequence

import numpy as np

from solidmark_jax import marks
from solidmark_jax.metrics import memorisation
from solidmark_jax.report import plots
from solidmark_jax.report.store import Results

SUMMARY_FORMAT = "solidmark-summary/1"
MEMBERS = "members"


def _group_l_sm(results: Results, group: str, key_bits: int | None) -> np.ndarray:
  g = results.select(group)
  return memorisation.l_sm(g.k_pred, g.key, key_bits)  # [n, r]


def summarize_results(results: Results, thresholds: Sequence[float] = memorisation.DEFAULT_THRESHOLDS, *,
                      statistic: str = "best", level: float = 0.95, ci_method: str = "wilson",
                      key_bits: int | None = marks.KEY_BITS, metadata: dict | None = None) -> dict:
  """The summary dict written to summary.json.

  Args:
    results: per-image results (from `ResultStore.results()`).
    thresholds: deltas (validated).
    statistic: "best" (min over r) or "mean" over r: which per-image score is counted.
    level: confidence level of the binomial intervals.
    ci_method: "wilson" or "clopper-pearson".
    key_bits: k_pred read on the key grid (`metrics.l_sm`); None for raw.
    metadata: e.g. {"keymap_hash": ..., "checkpoint_step": ..., "sampler": ...}; stored as is.

  Returns:
    {format, thresholds, statistic, keymap_hash, checkpoint_step, metadata,
     groups: {group: `metrics.summarize` dict}, comparisons: {"members_vs_<g>": `metrics.compare`}}.
  """
  thresholds = memorisation.validate_thresholds(thresholds)
  metadata = json.loads(json.dumps(metadata or {}))
  groups, l_by_group = {}, {}
  for g in results.groups:
    l_by_group[g] = _group_l_sm(results, g, key_bits)
    groups[g] = memorisation.summarize(l_by_group[g], thresholds, statistic=statistic, level=level,
                                       ci_method=ci_method)
  comparisons = {}
  if MEMBERS in l_by_group:
    for g in l_by_group:
      if g != MEMBERS and len(l_by_group[g]) and len(l_by_group[MEMBERS]):
        comparisons[f"members_vs_{g}"] = memorisation.compare(l_by_group[MEMBERS], l_by_group[g], thresholds,
                                                              statistic=statistic)
  return {
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


def write_per_image_csv(path: str, results: Results, key_bits: int | None = marks.KEY_BITS) -> str:
  """instance_id, group, member, key, k_pred_0..k_pred_{r-1}, l_sm_best, l_sm_mean (one row per image)."""
  r = results.k_pred.shape[1] if len(results) else 0
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["instance_id", "group", "member", "key", *[f"k_pred_{j}" for j in range(r)], "l_sm_best",
                "l_sm_mean"])
    for i in range(len(results)):
      kp = results.k_pred[i]
      valid = kp[~np.isnan(kp)]
      l = memorisation.l_sm(valid[None], results.key[i:i + 1], key_bits)[0]
      w.writerow([int(results.instance_id[i]), results.group[i], int(results.group[i] == MEMBERS),
                  repr(float(results.key[i])), *["" if math.isnan(v) else repr(float(v)) for v in kp],
                  repr(float(l.min())), repr(float(l.mean()))])
  return path


def _pct(x: float | None) -> str:
  return "-" if x is None else f"{100 * x:.2f}%"


def _fmt_p(p: float) -> str:
  return "-" if p is None or math.isnan(p) else (f"{p:.2e}" if p < 1e-3 else f"{p:.3f}")


def summary_markdown(summary: dict) -> str:
  """The summary as a Markdown page: one row per threshold, a column per group, the p-values."""
  groups = summary["groups"]
  names = list(groups)
  first = groups[names[0]] if names else None
  level = int(round(100 * first["ci_level"])) if first else 95
  head = ["threshold"]
  for g in names:
    head += [f"{g} count (%) [{level}% CI]", f"{g} chance expected"]
  comps = summary["comparisons"]
  head += [f"p ({c.replace('_', ' ')}, Fisher)" for c in comps]
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
  lines.append("- chance (k_pred independent of k and uniform): P(l_SM <= d) = p = 2d - d^2 per evaluation; "
               "best of r independent evaluations: 1 - (1 - p)^r; chance expected = n x that")
  lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for t, d in enumerate(summary["thresholds"]):
    row = [f"(l_SM, {d:g})"]
    for g in names:
      s = groups[g]
      lo, hi = s["ci"][t]
      row.append(f"{s['counts'][t]} / {s['n']} ({_pct(s['rates'][t])}) [{_pct(lo)}, {_pct(hi)}]")
      row.append(f"{s['chance_expected'][t]:.1f} ({_pct(s['chance_probability'][t])})")
    row += [_fmt_p(c["fisher_p"][t]) for c in comps.values()]
    lines.append("| " + " | ".join(row) + " |")
  lines += ["", "| group | n | mean l_SM | median l_SM |", "|---|---|---|---|"]
  for g in names:
    s = groups[g]["l_sm"]
    fmt = lambda v: "-" if v is None else f"{v:.4f}"
    lines.append(f"| {g} | {groups[g]['n']} | {fmt(s['mean'])} | {fmt(s['median'])} |")
  if comps:
    lines.append("")
    for name, c in comps.items():
      mw = c["mann_whitney"]
      lines.append(f"- {name.replace('_', ' ')}: Mann-Whitney U one-sided p = {_fmt_p(mw['p_value'])} "
                   f"(members' l_SM smaller; P(member < other) = {mw['effect']:.3f}); Fisher p per row: "
                   "one-sided, members' eidetic rate higher")
  return "\n".join(lines) + "\n"


def write_report(out_dir: str, results: Results, thresholds: Sequence[float] = memorisation.DEFAULT_THRESHOLDS, *,
                 statistic: str = "best", level: float = 0.95, ci_method: str = "wilson",
                 key_bits: int | None = marks.KEY_BITS, metadata: dict | None = None,
                 plots_enabled: bool = True) -> dict:
  """Writes summary.json, per_image.csv, summary.md (and l_sm_hist.png, eidetic_rates.png).

  Returns:
    The summary dict (as in summary.json).
  """
  os.makedirs(out_dir, exist_ok=True)
  summary = summarize_results(results, thresholds, statistic=statistic, level=level, ci_method=ci_method,
                              key_bits=key_bits, metadata=metadata)
  tmp = os.path.join(out_dir, "summary.json.tmp")
  with open(tmp, "w") as f:
    json.dump(summary, f, indent=2)
    f.write("\n")
  os.replace(tmp, os.path.join(out_dir, "summary.json"))
  write_per_image_csv(os.path.join(out_dir, "per_image.csv"), results, key_bits)
  with open(os.path.join(out_dir, "summary.md"), "w") as f:
    f.write(summary_markdown(summary))
  if plots_enabled and len(results):
    scores = {g: memorisation.reduce_repeats(_group_l_sm(results, g, key_bits))[statistic] for g in results.groups}
    plots.plot_l_sm_histograms(os.path.join(out_dir, "l_sm_hist.png"), scores, summary["thresholds"], statistic)
    repeats = max(summary["groups"][g]["repeats"] for g in scores)
    plots.plot_eidetic_rates(os.path.join(out_dir, "eidetic_rates.png"), scores, summary["groups"], repeats,
                             statistic)
  return summary
