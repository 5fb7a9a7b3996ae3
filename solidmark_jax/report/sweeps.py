"""The sweep pages: table.md (a row per setting beside its exact chance, each setting's paired effect) and
comparison.md (two runs of the same members).

The numbers come from `evaluation.sweeps.sweep_table` (sweep.json) and `evaluation.sweeps.compare_runs`
(comparison.json); this module only lays them out. The sweep's plot is `report.plots.plot_sweep`.
"""

from __future__ import annotations

from solidmark_jax.report.format import p_value, percent


def sweep_markdown(table: dict) -> str:
  """The sweep as Markdown: members' hits beside exact chance per setting, then each setting's effect."""
  th = table["thresholds"]
  rows = table["rows"]
  r0 = rows[0]
  base = table["baseline"]
  lines = [f"# Sweep {table['name']} ({table['kind']})", "",
           f"Members: n = {r0['n']}, r = {r0['repeats']} evaluations each, scored: {table['statistic']} over r. "
           "Chance: the expected hits if the keys were independent of the model, exact given each setting's own "
           "predictions; p: P(chance count >= hits).", ""]
  head = ["setting"] + [f"(l_SM, {d:g}): hits / n, chance, p" for d in th] + ["mean l_SM"]
  has_nm = "non_members" in r0
  if has_nm:
    head += [f"non-members (l_SM, {d:g}), chance" for d in th]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    c = r["chance"]
    cells = [r["setting"]]
    cells += [f"{k} / {r['n']} ({percent(rate)}), {e:.2f}, {p_value(p)}"
              for k, rate, e, p in zip(r["counts"], r["rates"], c["expected"], c["p_value"])]
    cells.append("-" if r["l_sm_mean"] is None else f"{r['l_sm_mean']:.4f}")
    if has_nm:
      nm = r["non_members"]
      cells += [f"{k} / {nm['n']}, {e:.2f}" for k, e in zip(nm["counts"], nm["chance_expected"])]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", f"Effect against `{base}` on the same images: reduction of the excess over chance "
            "(excess = hits - chance expected; 1 = all excess removed) [95% paired bootstrap interval]; "
            "McNemar's exact two-sided p on the images hit under one setting only (baseline only / this only).", ""]
  head = ["setting"] + [f"(l_SM, {d:g}): reduction of excess, McNemar p (discordant)" for d in th]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows[1:]:
    e = r["effect"]
    cells = [r["setting"]]
    for t in range(len(th)):
      ci = e["reduction_ci"][t]
      ci_txt = "" if ci is None else f" [{percent(ci[0])}, {percent(ci[1])}]"
      cells.append(f"{percent(e['reduction'][t])}{ci_txt}, {p_value(e['mcnemar_p'][t])} "
                   f"({e['discordant'][t][0]} / {e['discordant'][t][1]})")
    lines.append("| " + " | ".join(cells) + " |")
  if any("+" in r["setting"] for r in rows):
    lines += ["", _matrix_markdown(rows, th)]
  if any("subsets" in r for r in rows):
    lines += ["", _subsets_markdown(rows, th)]
  if any("pruning" in r for r in rows):
    lines += ["", _pruning_markdown(rows)]
  if any("dori" in r for r in rows):
    lines += ["", _dori_markdown(rows)]
  return "\n".join(lines) + "\n"


def _attack_label(attack: str) -> str:
  labels = {"": "plain caption", "dori": "DoRI search", "dori_blind": "DoRI search, key hidden",
            "keysearch": "key-targeted search"}
  return labels.get(attack, attack.replace("gni_", "GNI sigma "))


def _matrix_markdown(rows: list[dict], thresholds: list[float]) -> str:
  """Model mitigation x query (plain, GNI, DoRI, key-targeted): members' hits beside exact chance, and
  the non-members' (the control), one table per threshold."""
  models = list(dict.fromkeys(r["setting"].partition("+")[0] for r in rows))
  attacks = list(dict.fromkeys(r["setting"].partition("+")[2] for r in rows))
  by = {r["setting"].partition("+")[::2]: r for r in rows}
  lines = ["Mitigation x query: members' hits / n (exact chance expected); below each, the held-out "
           "non-members' hits (chance), the control a search must leave at chance."]
  for t, d in enumerate(thresholds):
    lines += ["", f"At (l_SM, {d:g}):", "", "| model | " + " | ".join(_attack_label(a) for a in attacks) + " |",
              "|" + "---|" * (len(attacks) + 1)]
    for m in models:
      cells = [m]
      for a in attacks:
        r = by.get((m, a))
        if r is None:
          cells.append("-")
          continue
        cell = f"{r['counts'][t]} / {r['n']} ({r['chance']['expected'][t]:.1f})"
        nm = r.get("non_members")
        if nm is not None:
          cell += f"; non-members {nm['counts'][t]} / {nm['n']} ({nm['chance_expected'][t]:.1f})"
        cells.append(cell)
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _subsets_markdown(rows: list[dict], thresholds: list[float]) -> str:
  """The members an adversarial fine-tuning targets, and the rest, apart in every row."""
  r0 = rows[0]["subsets"]
  lines = [f"Targeted members (the {r0['targeted']['n']} an adversarial fine-tuning unlearns) and the other "
           f"{r0['rest']['n']} members (its retain set), in every row: hits beside exact chance, p.", "",
           "| setting | " + " | ".join(f"targeted (l_SM, {d:g})" for d in thresholds) + " | "
           + " | ".join(f"rest (l_SM, {d:g})" for d in thresholds) + " |",
           "|" + "---|" * (2 * len(thresholds) + 1)]
  for r in rows:
    sub = r["subsets"]
    cells = [r["setting"]]
    for label in ("targeted", "rest"):
      g = sub[label]
      cells += [f"{k} / {g['n']}, {e:.2f}, {p_value(p)}"
                for k, e, p in zip(g["counts"], g["chance_expected"], g["p_value"])]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _pruning_markdown(rows: list[dict]) -> str:
  """What each pruned model removed and how its ordinary denoising moved: the training loss of the
  members and of the held-out non-members under their plain captions (the same draws in every row)."""
  groups = ["members", "non_members"]
  if any("targeted" in (r.get("denoising_loss") or {}) for r in rows):
    groups = ["targeted", "rest", "non_members"]
  lines = ["Mitigated models (docs/pruning.md, docs/dori.md): what was pruned of the cross-attention or how the "
           "UNet was fine-tuned, and the denoising loss (mean eps-MSE over fixed draws) of members and of held-out "
           "non-members under their own captions.", "",
           "| setting | model change | " + " | ".join(f"loss, {g.replace('_', '-')}" for g in groups) + " |",
           "|" + "---|" * (len(groups) + 2)]
  for r in rows:
    p = r.get("pruning") or {}
    if p.get("name") == "adversarial":
      last = p.get("last") or {}
      change = (f"fine-tuned {p['steps_done']} steps against DoRI's triggers, cap {p['cap']:.4f}; last step: "
                f"retain {last.get('retain_loss', float('nan')):.4f}, targeted {last.get('forget_loss', float('nan')):.4f}"
                f" (triggered {last.get('trigger_loss', float('nan')):.4f})")
    else:
      change = f"{p['pruned']} of {p['of']} {p['unit']} pruned" if "of" in p else "-"
    loss = r.get("denoising_loss") or {}
    cells = [r["setting"], change] + [f"{loss[g]['mean']:.4f}" if g in loss else "-" for g in groups]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _dori_markdown(rows: list[dict]) -> str:
  """The searches of "+dori" / "+keysearch" settings: the perturbation's size and the objective it reached."""
  lines = ["Searches (docs/dori.md): per image, Adam on a perturbation delta of its condition embedding, then the "
           "query with the perturbed condition. DoRI's objective is the denoising loss of the bordered image "
           "(on the same fixed draws under c0 and c0 + delta; key-blind: of its content, a random grey in the key "
           "region); the key-targeted one the squared error of the key a short DDIM outpainting reads (on one "
           "fixed noise draw). Means per group.", "",
           "| setting | search | group | mean norm of delta | objective under c0 | under c0 + delta |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    found = r.get("dori") or {}
    if not found:
      continue
    spec = found["spec"]
    kind = ("key-targeted" if spec.get("objective") == "key"
            else "DoRI, key-blind" if spec.get("key_blind") else "DoRI")
    what = (f"{kind}, {spec['steps']} steps x {spec.get('draws', 1)} draws, "
            f"lr {spec['learning_rate']:g}, max norm {spec['max_norm']}"
            + (f", {spec['inner_steps']} DDIM steps" if spec.get("objective") == "key" else ""))
    for group, o in found.items():
      if group == "spec":
        continue
      lines.append(f"| {r['setting']} | {what} | {group} | {o['delta_norm']:.3f} | {o['loss_initial']:.4f} | "
                   f"{o['loss_final']:.4f} |")
  return "\n".join(lines)


def comparison_markdown(comparison: dict) -> str:
  """Two runs of the same members (comparison.json) as Markdown: hits beside chance, the paired effect."""
  labels, thresholds = comparison["labels"], comparison["thresholds"]
  summaries = [comparison["summaries"][l] for l in labels]
  effect = comparison["effect"]
  n = summaries[0]["n"]
  lines = [f"# {labels[1]} against {labels[0]} on the same {n} members", "",
           "| threshold | " + " | ".join(f"{l}: hits, chance, p" for l in labels)
           + f" | reduction of excess ({labels[1]} vs {labels[0]}) [95% CI] | McNemar p (discordant) |",
           "|---|---|---|---|---|"]
  for t, d in enumerate(thresholds):
    cells = [f"(l_SM, {d:g})"]
    for s in summaries:
      c = s["chance"]
      cells.append(f"{s['counts'][t]} / {s['n']}, {c['expected'][t]:.2f}, {p_value(c['p_value'][t])}")
    ci = effect["reduction_ci"][t]
    cells.append(percent(effect["reduction"][t]) + ("" if ci is None else f" [{percent(ci[0])}, {percent(ci[1])}]"))
    cells.append(f"{p_value(effect['mcnemar_p'][t])} ({effect['discordant'][t][0]} / {effect['discordant'][t][1]})")
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", f"A negative reduction: {labels[1]} recovers more keys beyond chance than {labels[0]}."]
  return "\n".join(lines) + "\n"
