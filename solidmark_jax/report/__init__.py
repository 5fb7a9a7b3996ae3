"""The memorisation report: a resumable per-image results store, every page (Markdown) and plot, image grids.

  writer.py       summary.json, per_image.csv, summary.md of one evaluation
  duplication.py  duplication.md (hits per duplication level)
  sweeps.py       a sweep's table.md, comparison.md of two runs
  generations.py  the generations page (summary.md, nearest.png, regions.png)
  plots.py        PNG plots and image grids
  format.py       how percentages and p-values read on every page
  store.py        the per-image results store (results.jsonl)
"""

from solidmark_jax.report.duplication import duplication_markdown
from solidmark_jax.report.format import p_value, percent
from solidmark_jax.report.generations import (
    caption_cell,
    closest_generations,
    generations_markdown,
    region_examples,
    write_nearest_grid,
)
from solidmark_jax.report.plots import (
    hatch,
    plot_eidetic_rates,
    plot_l_sm_histograms,
    plot_roc,
    plot_sweep,
    write_image_grid,
    write_sample_grid,
)
from solidmark_jax.report.store import GROUPS, Results, ResultStore, group_order
from solidmark_jax.report.sweeps import comparison_markdown, sweep_markdown
from solidmark_jax.report.writer import (
    SUMMARY_FORMAT,
    summarize_results,
    summary_markdown,
    write_per_image_csv,
    write_report,
)
