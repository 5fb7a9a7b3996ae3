"""PNG plots and image grids (matplotlib's Agg canvas, no pyplot state)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_COLOURS = {"members": "tab:red", "non_members": "tab:blue", "random_init": "tab:grey"}


def _save(fig: Figure, path: str) -> str:
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  return path


def plot_l_sm_histograms(path: str, scores: dict[str, np.ndarray], thresholds: Sequence[float],
                         statistic: str = "best") -> str:
  """Histograms of per-image l_SM per group (members vs non-members ...), thresholds marked."""
  fig = Figure(figsize=(6.4, 4.0))
  ax = fig.add_subplot()
  bins = np.linspace(0.0, 1.0, 51)
  for group, s in scores.items():
    if len(s):
      ax.hist(s, bins=bins, histtype="step", linewidth=1.5, density=True, color=_COLOURS.get(group),
              label=f"{group} (n={len(s)})")
  for d in thresholds:
    ax.axvline(d, color="k", linestyle=":", linewidth=0.8)
  ax.set_xlabel(f"l_SM = |k_pred - k| ({statistic} over repeats)")
  ax.set_ylabel("density")
  ax.set_title("SolidMark: l_SM per image (dotted: thresholds)")
  ax.legend()
  return _save(fig, path)


EIDETIC_PLOT_DELTAS = np.logspace(-3, np.log10(0.5), 60)  # the thresholds of the eidetic-rate curves


def plot_eidetic_rates(path: str, scores: dict[str, np.ndarray], summary_groups: dict[str, dict],
                       chance_rates: dict[str, np.ndarray], statistic: str = "best") -> str:
  """Eidetic rate P(l_SM <= delta) vs delta per group, each beside its exact chance curve.

  Args:
    path: PNG to write.
    scores: per-image scored l_SM per group.
    summary_groups: the summary's groups (the configured thresholds carry their intervals).
    chance_rates: per group, its exact chance rate at `EIDETIC_PLOT_DELTAS` (dashed, same colour).
    statistic: "best" or "mean", for the axis label.
  """
  fig = Figure(figsize=(6.4, 4.4))
  ax = fig.add_subplot()
  deltas = EIDETIC_PLOT_DELTAS
  for group, s in scores.items():
    if not len(s):
      continue
    colour = _COLOURS.get(group)
    ax.plot(deltas, [np.mean(s <= d) for d in deltas], color=colour, label=group)
    if group in chance_rates:
      ax.plot(deltas, chance_rates[group], color=colour, linestyle="--", linewidth=1.0,
              label=f"{group}: chance given its predictions")
    g = summary_groups[group]
    rates = np.array(g["rates"], np.float64)
    ci = np.array(g["ci"], np.float64)
    ax.errorbar(g["thresholds"], rates, yerr=[rates - ci[:, 0], ci[:, 1] - rates], fmt="o", color=colour,
                capsize=3, markersize=4)
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_ylim(bottom=max(1e-4, 0.5 / max(1, max((len(s) for s in scores.values()), default=1))))
  ax.set_xlabel("threshold delta")
  ax.set_ylabel(f"fraction with l_SM <= delta ({statistic} over repeats)")
  ax.set_title("Eidetic memorisation rate (bars: CI at the reported thresholds)")
  ax.legend(fontsize=7)
  return _save(fig, path)


def plot_roc(path: str, curves: dict[str, dict]) -> str:
  """ROC curves of l_SM as a membership test, log-scaled FPR (the membership-inference convention).

  Args:
    path: PNG to write.
    curves: {label: {"fpr", "tpr", "auc"}} (`metrics.memorisation.roc_curve` plus the AUC).
  """
  fig = Figure(figsize=(5.2, 4.4))
  ax = fig.add_subplot()
  floor = 1e-4
  for label, c in curves.items():
    fpr = np.maximum(np.asarray(c["fpr"], np.float64), floor)
    ax.step(fpr, c["tpr"], where="post", label=f"{label} (AUC {c['auc']:.3f})")
  diagonal = np.logspace(np.log10(floor), 0, 200)  # TPR = FPR, a curve on the log axis
  ax.plot(diagonal, diagonal, "k:", linewidth=0.8, label="chance")
  ax.set_xscale("log")
  ax.set_xlim(floor, 1)
  ax.set_ylim(0, 1.02)
  ax.set_xlabel("false positive rate (log)")
  ax.set_ylabel("true positive rate")
  ax.set_title("Membership inference by l_SM")
  ax.legend(fontsize=7, loc="lower right")
  return _save(fig, path)


def plot_magnitude(path: str, magnitude: dict[str, np.ndarray], scores: dict[str, np.ndarray],
                   statistic: str = "best") -> str:
  """Wen et al.'s noise magnitude against l_SM, one point per image and a colour per group."""
  fig = Figure(figsize=(5.2, 4.4))
  ax = fig.add_subplot()
  for g, m in magnitude.items():
    ax.scatter(scores[g], m, s=10, alpha=0.6, label=g)
  ax.set_xlabel(f"l_SM ({statistic} of the repeats)")
  ax.set_ylabel("noise magnitude ||eps_c - eps_u||")
  ax.set_title("Noise magnitude (Wen et al. 2024) vs l_SM")
  ax.legend(fontsize=7)
  return _save(fig, path)


def plot_region_l2(path: str, l2: dict[str, np.ndarray], null: dict[str, np.ndarray], region: str | None) -> str:
  """Histograms of the hidden region's l2 per group, each beside its region null (another image's truth)."""
  fig = Figure(figsize=(6.0, 4.0))
  ax = fig.add_subplot()
  values = np.concatenate([v[np.isfinite(v)] for v in [*l2.values(), *null.values()]] or [np.zeros(1)])
  bins = np.linspace(0.0, max(float(values.max()), 1e-3), 30)
  for i, (g, v) in enumerate(l2.items()):
    colour = f"C{i}"
    ax.hist(v[np.isfinite(v)], bins=bins, alpha=0.5, color=colour, label=g)
    ax.hist(null[g][np.isfinite(null[g])], bins=bins, histtype="step", color=colour, linestyle="--",
            label=f"{g}: null")
  ax.set_xlabel(f"l2 of the hidden {region or 'region'} (units of the value range)")
  ax.set_ylabel("images")
  ax.set_title(f"Region query: {region or 'region'}")
  ax.legend(fontsize=7)
  return _save(fig, path)


def _to_display(x: np.ndarray) -> np.ndarray:
  """Model space [-1, 1] -> [0, 1] for imshow, [H, W] for one channel."""
  x = np.clip((np.asarray(x, np.float32) + 1.0) / 2.0, 0.0, 1.0)
  return x[..., 0] if x.shape[-1] == 1 else x


def hatch(image: np.ndarray, mask: np.ndarray, period: int = 4) -> np.ndarray:
  """A model-space image with the masked (unknown) region shown grey with dark diagonal hatching."""
  h, w = mask.shape[:2]
  ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  fill = np.where(((ii + jj) % period) == 0, -0.6, 0.0)[..., None]  # grey 0.5, stripes 0.2 in [0, 1]
  return np.where(mask > 0, fill, image).astype(np.float32)


def _keys_label(k) -> str:
  """One key as 0.1234; m keys as .123/.456/... (shorter, to fit a panel)."""
  k = np.asarray(k, np.float64)
  return f"{float(k):.4f}" if k.ndim == 0 else "/".join(f"{v:.3f}".lstrip("0") for v in k)


def write_image_grid(path: str, known: np.ndarray, mask: np.ndarray, outpaintings: np.ndarray,
                     keys: np.ndarray | None = None, k_pred: np.ndarray | None = None,
                     row_labels: Sequence[str] | None = None, max_rows: int = 16) -> str:
  """Queries (hatched unknown region) and their outpaintings, labelled with k and k_pred.

  Args:
    path: PNG to write.
    known: [n, H, W, C] model-space images (only the known region is shown).
    mask: [H, W, 1], 1 on the unknown region.
    outpaintings: [n, r, H, W, C] model space.
    keys: [n] true keys (labels), optional; [n, m] with m keys per image.
    k_pred: [n, r] predicted keys (labels), optional; [n, r, m] with m keys per image (l_SM: the
      largest of the m distances).
    row_labels: [n] e.g. "member 17", optional.
    max_rows: images shown at most.
  """
  n = min(len(known), max_rows)
  r = outpaintings.shape[1]
  size = 1.3
  fontsize = 7 if keys is None or np.ndim(keys) < 2 else 6  # m keys per image: longer labels
  fig = Figure(figsize=(size * (r + 1), size * 1.25 * n + 0.2))
  cmap = "gray" if known.shape[-1] == 1 else None
  for i in range(n):
    ax = fig.add_subplot(n, r + 1, i * (r + 1) + 1)
    ax.imshow(_to_display(hatch(known[i], mask)), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    label = row_labels[i] if row_labels is not None else "query"
    if keys is not None:
      label += f"\nk={_keys_label(keys[i])}"
    ax.set_title(label, fontsize=fontsize)
    ax.axis("off")
    for j in range(r):
      ax = fig.add_subplot(n, r + 1, i * (r + 1) + 2 + j)
      ax.imshow(_to_display(outpaintings[i, j]), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
      if k_pred is not None:
        sep = "" if fontsize == 7 else "\n"  # m keys: the values on a line of their own
        text = f"k_pred={sep}{_keys_label(k_pred[i, j])}"
        if keys is not None:
          text += f"\nl_SM={np.max(np.abs(np.asarray(k_pred[i, j]) - keys[i])):.4f}"
        ax.set_title(text, fontsize=fontsize)
      ax.axis("off")
  return _save(fig, path)


def write_sample_grid(path: str, images: np.ndarray, row_labels: Sequence[str] | None = None,
                      max_rows: int = 16) -> str:
  """Plain samples [n, r, H, W, C] (model space), one row per condition."""
  n = min(len(images), max_rows)
  r = images.shape[1]
  fig = Figure(figsize=(1.2 * r + 0.4, 1.3 * n + 0.2))
  cmap = "gray" if images.shape[-1] == 1 else None
  for i in range(n):
    for j in range(r):
      ax = fig.add_subplot(n, r, i * r + 1 + j)
      ax.imshow(_to_display(images[i, j]), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
      if j == 0 and row_labels is not None:
        ax.set_title(row_labels[i], fontsize=7)
      ax.axis("off")
  return _save(fig, path)


def plot_sweep(path: str, table: dict) -> str | None:
  """Members' eidetic rate against the swept value, a line per threshold, chance dashed (the GNI figure).

  Only for sweeps of one method over numeric values (the baseline at 0); returns None otherwise.
  """
  rows = table["rows"]
  methods = {r["method"] for r in rows if r["method"] != "none"}
  if len(methods) != 1 or len(rows) < 2:
    return None
  x = np.array([r["value"] for r in rows])
  order = np.argsort(x, kind="stable")
  fig = Figure(figsize=(6.4, 4.0))
  ax = fig.add_subplot()
  for t, d in enumerate(table["thresholds"]):
    y = np.array([r["rates"][t] for r in rows])
    line, = ax.plot(x[order], 100 * y[order], marker="o", label=f"(l_SM, {d:g})")
    chance_rate = np.array([r["chance"]["rate"][t] for r in rows])
    ax.plot(x[order], 100 * chance_rate[order], color=line.get_color(), linestyle="--", linewidth=0.8)
  method = methods.pop()
  ax.set_xlabel({"gni": "GNI sigma", "crop": "crop level", "blur": "blur level",
                 "rotate": "angle (degrees)", "wanda": "Wanda sparsity",
                 "nemo": "NeMo z-score threshold"}.get(method, f"{method} strength"))
  ax.set_ylabel("members eidetically memorised (%)")
  ax.set_ylim(-2, 102)
  ax.set_title(f"{table['name']}: members' rate (dashed: exact chance per setting)")
  ax.legend(fontsize=8)
  return _save(fig, path)
