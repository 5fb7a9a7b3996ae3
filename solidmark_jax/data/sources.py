"""The `Source` interface and `open_source`, which opens the source a config's `data` section names.

`open_source(data_cfg, split)` returns a `Source`: `read(indices)` gives
`{"image": uint8 [n, S, S, C], "label": int32 [n] (-1 if none), "caption": list[str] (captioned
sources only)}`; `labels()` gives every record's label cheaply. By `data.name`:
- "folder": an image folder (data/folders.py);
- "shards": webdataset tars / parquet files with captions (data/shards.py);
- "captioned_fashion_mnist": the captioned set built offline from Fashion-MNIST (data/captioned.py);
- anything else: a TFDS builder name, e.g. "fashion_mnist", "cifar10" (data/tfds.py).
Every image is converted the same way (data/images.py).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import ml_collections
import numpy as np

from solidmark_jax.data.captioned import open_captioned
from solidmark_jax.data.folders import open_folder
from solidmark_jax.data.shards import open_shards
from solidmark_jax.data.tfds import open_tfds


@runtime_checkable
class Source(Protocol):
  """Records of one split, read by index as square uint8 images."""

  name: str  # e.g. "fashion_mnist:train" or "folder:/path"
  num_classes: int  # 0 if unlabelled
  image_size: int  # side of the images read() returns
  channels: int  # 1 or 3

  def __len__(self) -> int:
    ...

  def read(self, indices: np.ndarray) -> dict[str, Any]:
    """Records at `indices` [n]: "image" uint8 [n, S, S, C], "label" int32 [n], maybe "caption"."""
    ...

  def labels(self) -> np.ndarray:
    """int32 [len] labels of all records (-1 if unlabelled)."""
    ...


def open_source(data_cfg: ml_collections.ConfigDict, split: str) -> Source:
  """Opens split `split` of the source `data_cfg` describes.

  Args:
    data_cfg: the `data` ConfigDict: `name` ("folder", "shards", "captioned_fashion_mnist",
      "fashion_mnist" or a TFDS builder name), `data_dir`, `manual_dir`, `download` (default True),
      `folder`, `eval_folder`, `image_size`, `channels`, `on_bad_image`, `verify_images`, `image_key`/`label_key`
      (TFDS features, default image/label); for shards see `shards.open_shards`, for the captioned
      Fashion-MNIST set `captioned.open_captioned`.
    split: a TFDS split string ("train", "test", "train[:1000]"); for folders and shards "train" or
      any other name for `data.eval_folder` / `data.eval_shards`.

  Returns:
    A `Source`.
  """
  name = data_cfg.get("name")
  if not name:
    raise ValueError("data.name is required: 'folder', 'shards', 'captioned_fashion_mnist', 'fashion_mnist' or a "
                     "TFDS builder name")
  if name == "folder":
    return open_folder(data_cfg, split)
  if name == "shards":
    return open_shards(data_cfg, split)
  if name == "captioned_fashion_mnist":  # built offline on first use
    return open_captioned(data_cfg, split)
  return open_tfds(data_cfg, split)
