"""Memorisation scores: l_SM, eidetic counts, chance level, significance, baseline distances."""

from solidmark_jax.metrics.baselines import carlini_l2, normalized_l2, pairwise_l2, percentile_score
from solidmark_jax.metrics.baselines import (
    carlini_score,
    count_memorised,
    embedding_similarity,
    nearest_neighbors,
    pooled_pixels_encoder,
    score_summary,
)
from solidmark_jax.metrics.duplication import duplication_markdown, summarize_duplication, union_measure
from solidmark_jax.metrics.memorisation import (
    DEFAULT_THRESHOLDS,
    STATISTICS,
    binomial_ci,
    chance_probability,
    compare,
    eidetic_counts,
    fisher_exact,
    l_sm,
    mann_whitney,
    reduce_repeats,
    snap_to_key_grid,
    summarize,
    validate_thresholds,
)
