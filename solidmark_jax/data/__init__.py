"""Data: image sources (TFDS splits, image folders) and deterministic per-host batches."""

from solidmark_jax.data.sources import FolderSource
from solidmark_jax.data.sources import Source
from solidmark_jax.data.sources import TfdsSource
from solidmark_jax.data.sources import open_source
from solidmark_jax.data.sources import to_square

__all__ = ["FolderSource", "Source", "TfdsSource", "open_source", "to_square"]
