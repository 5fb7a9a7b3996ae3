"""Memorisation scores: l_SM, eidetic counts, exact chance, nulls, significance, membership inference, baselines."""

from solidmark_jax.metrics.baselines import carlini_l2, normalized_l2, pairwise_l2, percentile_score
from solidmark_jax.metrics.baselines import (
    carlini_score,
    count_memorised,
    embedding_similarity,
    nearest_neighbors,
    pooled_pixels_encoder,
    score_summary,
)
from solidmark_jax.metrics.duplication import summarize_duplication, trend_test
from solidmark_jax.metrics.memorisation import (
    DEFAULT_THRESHOLDS,
    STATISTICS,
    binomial_ci,
    compare,
    eidetic_counts,
    fisher_exact,
    l_sm,
    mann_whitney,
    membership_inference,
    paired_effect,
    per_image_scores,
    permutation_null,
    reduce_repeats,
    roc_curve,
    snap_to_key_grid,
    summarize,
    validate_thresholds,
)
from solidmark_jax.metrics.chance import hit_probabilities, hit_probability, poisson_binomial_pmf
