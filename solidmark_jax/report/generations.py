"""The generations page (DIR/generations/summary.md, nearest.png): baseline metrics of plain generations.

The numbers come from `evaluation.generations.score` (scores.json); this module only lays them out.
"""

from __future__ import annotations

import numpy as np

from solidmark_jax.report.format import p_value, percent
from solidmark_jax.report.plots import write_sample_grid


def closest_generations(result: dict, num: int) -> list[dict]:
  """The `num` generations of scores.json closest to a training image (lowest Carlini score, then id)."""
  return sorted(result["generations"], key=lambda r: (r["carlini"], r["id"]))[:num]


METRIC_DOCS = {
    "l2": "normalised l2 (whole image)",
    "carlini": "Carlini's modified l2 (whole image)",
    "patched_l2": "patched l2 (max over patches)",
    "patched_carlini": "Carlini's modified l2 (patched)",
    "similarity": "embedding cosine similarity",
}


def generations_markdown(result: dict) -> str:
  """scores.json as a readable page: one row per metric, the closest generations and their neighbours."""
  meta, summary = result["meta"], result["summary"]
  lines = ["# Baseline memorisation metrics from generations", ""]
  for k in ("checkpoint_step", "keymap_hash", "num_samples", "compared"):
    lines.append(f"- {k.replace('_', ' ')}: `{meta[k] if k in meta else result.get(k)}`")
  lines.append(f"- compared with {meta['num_train_images']} distinct training images")
  lines.append(f"- Carlini: n = {meta['carlini_n']}, alpha = {meta['settings']['alpha']}; patched: "
               + (f"grid {meta['settings']['patch_grid']}" if meta["settings"]["patch_grid"]
                  else f"{meta['settings']['patch_size']} px patches"))
  lines.append(f"- nearest training image is the prompt's own image: "
               f"{percent(result['nearest_is_prompt_rate'])} of generations")
  lines += ["", "| metric | direction | 95th pct (memorised tail) | extreme | median | counts at thresholds |",
            "|---|---|---|---|---|---|"]
  for name, s in summary.items():
    op = "<=" if s["direction"] == "lower" else ">="
    counts = ", ".join(f"{op} {t:g}: {c} ({percent(r)})" for t, c, r in zip(s["thresholds"], s["counts"], s["rates"]))
    tail = "p5" if s["direction"] == "lower" else "p95"
    ext = "min" if s["direction"] == "lower" else "max"
    lines.append(f"| {METRIC_DOCS.get(name, name)} | {'lower' if op == '<=' else 'higher'} = memorised | "
                 f"{s['tail_95']:.4f} ({tail}) | {s['extreme']:.4f} ({ext}) | {s['median']:.4f} | {counts} |")
  noise = result.get("noise_magnitude")
  if noise is not None:
    rho = lambda c: "-" if c["rho"] is None else f"{c['rho']:+.3f} (p = {p_value(c['p_value'])})"
    lines += ["", f"Noise magnitude (Wen et al. 2024; first {noise['steps']} step(s), larger = memorised): mean "
              f"{noise['mean']:.3f}; Spearman's rho with l_SM to the prompt's key {rho(noise['rank_correlation_l_sm_prompt'])}, "
              f"with the l2 to the nearest training image {rho(noise['rank_correlation_l2'])} (negative: the detectors "
              "agree)."]
  if "regions" in result:
    lines += regions_markdown(result["regions"])
  gens = closest_generations(result, 10)
  lines += ["", "Closest generations (lowest Carlini score):", "",
            "| generation | prompt | prompt image | nearest image (copies: instances) | l2 | Carlini | "
            "patched Carlini | k_pred | l_SM to nearest's keys |", "|---|---|---|---|---|---|---|---|---|"]
  for r in gens:
    patched = f"{r['patched_carlini']:.4f}" if "patched_carlini" in r else "-"
    prompt = caption_cell(r["caption"]) if "caption" in r else f"condition {r['condition']}"
    lines.append(f"| {r['id']} | {prompt} | {r['prompt_image']} | {r['nearest_image']} ({r['nearest_instances']}) | "
                 f"{r['l2']:.4f} | {r['carlini']:.4f} | {patched} | {r['k_pred']:.4f} | {r['l_sm_nearest']:.4f} |")
  return "\n".join(lines) + "\n"


def regions_markdown(section: dict) -> list[str]:
  """FB-Mem's view of the generations: counts per category against the training images and the null."""
  n, fg_t, bg_t = section["n"], *section["thresholds"]
  null = section.get("null")
  lines = ["", "## Regions (FB-Mem's view)", "",
           f"Per generation the nearest training image found separately for the foreground (l2 over the union of "
           f"the two foregrounds) and the background (l2 over the pixels background in both); memorised at l2 <= "
           f"{fg_t:g} (foreground) / {bg_t:g} (background). Masks: `{section['masks']}`."
           + (f" Null: the same against {null['source']}." if null else ""), "",
           "| category | generations (%) | null: against held-out images |", "|---|---|---|"]
  names = {"both": "both (verbatim)", "foreground": "foreground only", "background": "background only",
           "neither": "neither"}
  for k, label in names.items():
    c = section["counts"][k]
    lines.append(f"| {label} | {c} ({percent(c / n if n else None)}) | "
                 + (f"{null['counts'][k]} ({percent(null['counts'][k] / n if n else None)})" if null else "-") + " |")
  cl = section["cluster"]
  lines += ["", f"Cluster view: a generation is within the threshold of {cl['foreground']['mean']:.2f} training images "
                f"on average in the foreground (at most {cl['foreground']['max']}; {cl['foreground']['more_than_one']} "
                f"generations close to more than one) and {cl['background']['mean']:.2f} in the background (at most "
                f"{cl['background']['max']}; {cl['background']['more_than_one']} close to more than one). The "
                f"foreground's nearest image is the prompt's own for {percent(section['foreground_nearest_is_prompt_rate'])}"
                " of generations."]
  return lines


def region_examples(result: dict, per_category: int = 3) -> list[dict]:
  """Up to `per_category` generations of each FB-Mem category (the closest in the foreground first)."""
  rows = []
  for k in ("both", "foreground", "background", "neither"):
    mine = [r for r in result["generations"] if r.get("fb_category") == k]
    rows += sorted(mine, key=lambda r: (r["foreground_l2"], r["id"]))[:per_category]
  return rows


def caption_cell(text: str, width: int = 60) -> str:
  """A caption as one markdown table cell: no pipes or newlines, at most `width` characters."""
  text = " ".join(str(text).replace("|", "/").split())
  return text if len(text) <= width else text[:width - 3] + "..."


def write_nearest_grid(path: str, rows: list[dict], pairs: np.ndarray) -> str:
  """nearest.png: per generation of `rows` (`closest_generations`), it beside its nearest training image.

  Args:
    path: the PNG to write.
    rows: the generations' records from scores.json.
    pairs: [n, 2, h, w, C] model space: the generation's compared part, then the training image's.
  """
  labels = [f"gen {r['id']} ~ img {r['nearest_image']} (C={r['carlini']:.2f})" for r in rows]
  return write_sample_grid(path, pairs, row_labels=labels, max_rows=len(rows))
