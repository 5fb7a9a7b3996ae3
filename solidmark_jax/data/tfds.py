"""TFDS datasets as sources: a split read by record index through array_record random access.

`open_tfds(data_cfg, split)` returns a `TfdsSource`. Splits are read through
`builder.as_data_source(split)` from array_record files: random access, no TensorFlow at read time,
and each process reads only the records it asks for. A dataset that is not prepared in `data_dir` is
prepared there once (under a file lock, so concurrent processes on one machine wait for the first).
Fashion-MNIST is prepared offline from the four original .gz IDX files in `data.manual_dir` (Debian's
`dataset-fashion-mnist` package by default); their checksums differ from upstream's (Debian
re-compressed them), so they are recorded in `<data_dir>/fashion_mnist/manual_dir_checksums.tsv`,
never in the installed TFDS package. TensorFlow Datasets is imported on first use only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
from typing import TYPE_CHECKING, Any, Iterator

import ml_collections
import numpy as np

from solidmark_jax.data.images import array_to_square, check_channels, check_indices

if TYPE_CHECKING:  # for annotations only: TensorFlow Datasets is imported on first use
  import tensorflow_datasets as tfds

log = logging.getLogger(__name__)

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                       "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
# sha256 of the .gz files of Debian's dataset-fashion-mnist (upstream's, re-compressed without the
# file name in the gzip header); upstream's own checksums come from TFDS.
DEBIAN_FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}


class TfdsSource:
  """A split of a prepared TFDS dataset (array_record), read by random access.

  Attributes:
    name: "<dataset>:<split>".
    num_classes: classes of the `label` ClassLabel feature, 0 if there is none (e.g. celeb_a).
    class_names: the class names ([] if unlabelled).
    image_size: side of the images read() returns.
    channels: 1 or 3.
  """

  def __init__(self, builder: tfds.core.DatasetBuilder, split: str, image_size: int | None = None,
               channels: int | None = None, image_key: str = "image", label_key: str = "label"):
    import tensorflow_datasets as tfds  # lazy: TensorFlow is heavy  # pylint: disable=g-import-not-at-top

    features = builder.info.features
    if image_key not in features:
      raise ValueError(f"TFDS dataset {builder.name!r} has no {image_key!r} feature (features: "
                       f"{sorted(features.keys())}); set data.image_key")
    h, w, c = features[image_key].shape
    if image_size is None:
      if h is None or w is None or h != w:
        raise ValueError(f"data.image_size is required for TFDS dataset {builder.name!r}: its images are "
                         f"{h}x{w}, not one square size (they are centre-cropped, then resized)")
      image_size = h
    self.name = f"{builder.name}:{split}"
    self.image_size = int(image_size)
    self.channels = check_channels(channels if channels is not None else (1 if c == 1 else 3))
    label = features[label_key] if label_key in features else None
    self._labelled = isinstance(label, tfds.features.ClassLabel)
    self.num_classes = int(label.num_classes) if self._labelled else 0
    self.class_names = list(label.names) if self._labelled else []
    self._builder, self._split = builder, split
    self._image_key, self._label_key = image_key, label_key
    try:
      self._ds = builder.as_data_source(split)
    except ValueError as e:  # e.g. an unknown split
      raise ValueError(f"TFDS dataset {builder.name!r}, split {split!r}: {e}") from e
    self._labels: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self._ds)

  def _get(self, ds, idx: np.ndarray) -> list[dict[str, Any]]:
    rows = [int(i) for i in idx]
    return ds.__getitems__(rows) if hasattr(ds, "__getitems__") else [ds[i] for i in rows]

  def read(self, indices: np.ndarray) -> dict[str, Any]:
    idx = check_indices(indices, len(self))
    images = np.zeros((len(idx), self.image_size, self.image_size, self.channels), np.uint8)
    labels = np.full(len(idx), -1, np.int32)
    for j, ex in enumerate(self._get(self._ds, idx)):
      images[j] = array_to_square(np.asarray(ex[self._image_key]), self.image_size, self.channels)
      if self._labelled:
        labels[j] = int(ex[self._label_key])
    return {"image": images, "label": labels}

  def labels(self) -> np.ndarray:
    """All labels, read without decoding images (about 2 s per 60k records); cached."""
    if self._labels is None:
      if not self._labelled:
        self._labels = np.full(len(self), -1, np.int32)
      else:
        import tensorflow_datasets as tfds  # lazy: TensorFlow is heavy  # pylint: disable=g-import-not-at-top
        ds = self._builder.as_data_source(self._split, decoders={self._image_key: tfds.decode.SkipDecoding()})
        out = np.empty(len(ds), np.int32)
        for start in range(0, len(ds), 8192):
          idx = np.arange(start, min(start + 8192, len(ds)))
          out[idx] = [int(ex[self._label_key]) for ex in self._get(ds, idx)]
        self._labels = out
    return self._labels


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
  """An exclusive fcntl lock on `path` (created if missing), held for the with block."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _tfds_builder(name: str, data_dir: str, file_format: str | None = None):
  """tfds.builder(); `file_format` only to prepare (a prepared dataset keeps the format it has)."""
  import tensorflow_datasets as tfds  # lazy: TensorFlow is heavy  # pylint: disable=g-import-not-at-top
  try:
    return tfds.builder(name, data_dir=data_dir, **({"file_format": file_format} if file_format else {}))
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"unknown dataset data.name={name!r}: use 'folder' (with data.folder), 'fashion_mnist', "
                     "or the name of a TFDS builder (e.g. 'cifar10', 'stl10', 'celeb_a'; the full list: "
                     "tfds.list_builders())") from e


def _is_prepared(builder) -> bool:
  # TFDS writes a variant into a temporary folder and renames it when complete: dataset_info.json
  # there means a whole dataset (builder.is_prepared() says the same, with a warning when not).
  return os.path.isfile(os.path.join(builder.data_dir, "dataset_info.json"))


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _prepare_fashion_mnist(builder, manual_dir: str) -> None:
  """Prepares Fashion-MNIST offline from the .gz IDX files in `manual_dir`.

  The files' checksums are checked against upstream's (registered in TFDS) and Debian's, then
  recorded (TFDS `register_checksums`) in `<data_dir>/fashion_mnist/manual_dir_checksums.tsv`
  rather than in the installed TFDS package, where TFDS would write them by default.
  """
  import tensorflow_datasets as tfds  # lazy: TensorFlow is heavy  # pylint: disable=g-import-not-at-top

  for fname in FASHION_MNIST_FILES:
    path = os.path.join(manual_dir, fname)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"Fashion-MNIST file {path} is missing: install it with "
                              "`apt-get install dataset-fashion-mnist`, or set data.manual_dir to a folder "
                              f"holding the four original files ({', '.join(FASHION_MNIST_FILES)})")
  upstream = {info.filename: info.checksum for info in (builder.url_infos or {}).values()}
  for fname in FASHION_MNIST_FILES:
    digest = _sha256(os.path.join(manual_dir, fname))
    if digest not in (upstream.get(fname), DEBIAN_FASHION_MNIST_SHA256[fname]):
      log.warning("%s: sha256 %s matches neither the upstream nor the Debian release of Fashion-MNIST",
                  os.path.join(manual_dir, fname), digest)
  root = os.fspath(builder.data_dir_root)
  checksums_path = os.path.join(root, builder.name, "manual_dir_checksums.tsv")
  os.makedirs(os.path.dirname(checksums_path), exist_ok=True)
  with tempfile.TemporaryDirectory(prefix=".fashion_mnist_extract.", dir=root) as tmp:

    def make_download_manager(download_dir=None, download_config=None):  # pylint: disable=unused-argument
      return tfds.download.DownloadManager(
          download_dir=tmp, manual_dir=manual_dir, url_infos=builder.url_infos, dataset_name=builder.name,
          register_checksums=True, register_checksums_path=checksums_path)

    # TFDS 4.9.10 would register the checksums beside the builder's code (in site-packages): this
    # per-instance hook is the one place that decides where they go.
    builder._make_download_manager = make_download_manager  # pylint: disable=protected-access
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir, try_download_gcs=False))


def _prepare(builder, data_cfg: ml_collections.ConfigDict, data_dir: str) -> None:
  """Downloads and prepares a TFDS dataset into `data_dir` (array_record)."""
  import tensorflow_datasets as tfds  # lazy: TensorFlow is heavy  # pylint: disable=g-import-not-at-top

  name = builder.name
  if name == "fashion_mnist":
    _prepare_fashion_mnist(builder, os.path.expanduser(data_cfg.get("manual_dir") or DEFAULT_FASHION_MNIST_DIR))
    return
  how = (f"Prepare it there on a machine with internet access: `tfds build {data_cfg.get('name')} "
         f"--data_dir={data_dir} --file_format=array_record` (or point data.data_dir at where it is prepared)")
  if not data_cfg.get("download", True):
    raise FileNotFoundError(f"TFDS dataset {builder.info.full_name!r} is not prepared in data.data_dir={data_dir} "
                            f"and data.download is False. {how}")
  manual_dir = data_cfg.get("manual_dir")
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=os.path.expanduser(manual_dir) if manual_dir else None, try_download_gcs=False))
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(f"TFDS dataset {builder.info.full_name!r} is not prepared in data.data_dir={data_dir} and "
                       f"downloading/preparing it failed ({type(e).__name__}: {e}). {how}") from e


def open_tfds(data_cfg: ml_collections.ConfigDict, split: str) -> TfdsSource:
  """Opens a split of a TFDS dataset, preparing it into `data.data_dir` first if needed."""
  name = data_cfg.get("name")
  data_dir = os.path.expanduser(data_cfg.get("data_dir") or os.environ.get("TFDS_DATA_DIR")
                                or "~/tensorflow_datasets")
  builder = _tfds_builder(name, data_dir)
  if not _is_prepared(builder):
    lock = os.path.join(data_dir, f".{builder.info.full_name.replace('/', '_')}.prepare.lock")
    with file_lock(lock):  # a concurrent process may be preparing it: wait, then look again
      builder = _tfds_builder(name, data_dir, file_format="array_record")
      if not _is_prepared(builder):
        _prepare(builder, data_cfg, data_dir)
      builder = _tfds_builder(name, data_dir)
  try:
    return TfdsSource(builder, split, data_cfg.get("image_size"), data_cfg.get("channels"),
                      image_key=data_cfg.get("image_key", "image"), label_key=data_cfg.get("label_key", "label"))
  except NotImplementedError as e:  # prepared as TFRecord: no random access
    raise RuntimeError(f"TFDS dataset {name!r} in {builder.data_dir} is prepared as {builder.info.file_format}, "
                       "which has no random access; convert it: `tfds convert_format "
                       f"--dataset_version_dir={builder.data_dir} --out_file_format=array_record`") from e
