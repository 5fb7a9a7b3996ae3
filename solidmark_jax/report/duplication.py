"""The duplication page (duplication.md): hits per duplication level beside their exact chance, the trend test.

The numbers come from `metrics.summarize_duplication` (duplication.json); this module only lays them out.
"""

from __future__ import annotations

from solidmark_jax.report.format import p_value, percent


def duplication_markdown(summary: dict) -> str:
  """The duplication summary as Markdown: per threshold and level, hits beside exact chance; the trend test."""
  levels = summary["levels"]
  names = list(levels)
  level = int(round(100 * levels[names[0]]["ci_level"])) if names else 95
  lines = ["# Memorisation by duplication level", "",
           "An image counts when any of its evaluations is within delta of any of its keys; every image is "
           "evaluated the same number of times whatever its copies.",
           f"- chance: {summary['chance_doc']}", f"- trend: {summary['trend_doc']}", "",
           "| level | images | evaluations per image | mean l_dup |", "|---|---|---|---|"]
  for name in names:
    s = levels[name]
    mean = s["l_dup"]["mean"]
    lines.append(f"| {name} | {s['n']} | {', '.join(map(str, s['evaluations']))} | "
                 f"{'-' if mean is None else f'{mean:.4f}'} |")
  head = ["threshold", "level", f"hits / n [{level}% CI]", "chance expected (rate)", f"null {level}% band",
          "p (exact)", f"memorised beyond chance [{level}% CI]"]
  lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for t, d in enumerate(summary["thresholds"]):
    for name in names:
      s = levels[name]
      c = s["chance"]
      lo, hi = s["ci"][t]
      clo, chi = c["corrected_ci"][t]
      lines.append("| " + " | ".join([
          f"(l_SM, {d:g})", name,
          f"{s['counts'][t]} / {s['n']} ({percent(s['rates'][t])}) [{percent(lo)}, {percent(hi)}]",
          f"{c['expected'][t]:.2f} ({percent(c['rate'][t])})", f"[{c['band'][t][0]}, {c['band'][t][1]}]",
          p_value(c["p_value"][t]), f"{percent(c['corrected'][t])} [{percent(clo)}, {percent(chi)}]"]) + " |")
  lines += ["", "| threshold | trend of the excess with copies: z | p (one-sided) |", "|---|---|---|"]
  for t, d in enumerate(summary["thresholds"]):
    z, p = summary["trend"][t]["z"], summary["trend"][t]["p_value"]
    lines.append(f"| (l_SM, {d:g}) | {'-' if z is None else f'{z:.2f}'} | {p_value(p)} |")
  return "\n".join(lines) + "\n"
