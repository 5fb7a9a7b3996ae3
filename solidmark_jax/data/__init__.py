"""Data: image sources (TFDS splits, image folders, shards) and deterministic per-host batches."""

from solidmark_jax.data.folders import FolderSource
from solidmark_jax.data.images import to_square
from solidmark_jax.data.instances import BatchPlan, Instances, make_instances, marked_batch, select_records
from solidmark_jax.data.sources import Source, open_source
from solidmark_jax.data.tfds import TfdsSource

__all__ = ["BatchPlan", "FolderSource", "Instances", "Source", "TfdsSource", "make_instances", "marked_batch",
           "open_source", "select_records", "to_square"]
