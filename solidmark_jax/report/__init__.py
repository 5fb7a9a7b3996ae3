"""The memorisation report: a resumable per-image results store, summary files, plots, image grids."""

from solidmark_jax.report.plots import (
    hatch,
    plot_eidetic_rates,
    plot_l_sm_histograms,
    plot_roc,
    write_image_grid,
    write_sample_grid,
)
from solidmark_jax.report.store import GROUPS, Results, ResultStore, group_order
from solidmark_jax.report.writer import (
    SUMMARY_FORMAT,
    summarize_results,
    summary_markdown,
    write_per_image_csv,
    write_report,
)
