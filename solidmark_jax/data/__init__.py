"""Data: image sources (TFDS splits, image folders) and deterministic per-host batches."""

from solidmark_jax.data.pipeline import BatchPlan, Instances, make_instances, marked_batch, select_records
from solidmark_jax.data.sources import FolderSource, Source, TfdsSource, open_source, to_square

__all__ = ["BatchPlan", "FolderSource", "Instances", "Source", "TfdsSource", "make_instances", "marked_batch",
           "open_source", "select_records", "to_square"]
