"""Image sources: a TFDS split or an image folder, read by record index as square uint8 images.

`open_source(data_cfg, split)` returns a `Source`: `read(indices)` gives
`{"image": uint8 [n, S, S, C], "label": int32 [n] (-1 if none), "caption": list[str] (folders with
captions only)}`; `labels()` gives every record's label cheaply.

Every image is converted the same way (`to_square`):
- mode: grayscale is repeated to RGB when `channels == 3`; RGB becomes luminance when `channels == 1`
  (PIL's ITU-R 601-2 luma, L = 0.299 R + 0.587 G + 0.114 B); anything with transparency (RGBA, LA,
  palette with a transparent colour) is composited over white first; 16-bit grayscale is scaled to
  8 bits; other modes (palette, CMYK, YCbCr, 1-bit) are converted by PIL. JPEG EXIF orientation is
  applied (folders).
- size: a non-square image is centre-cropped to its shorter side, then resized to
  `image_size` x `image_size` with PIL bicubic (antialiased when shrinking). `image_size=None` keeps the
  native size of a square TFDS dataset; it is required for non-square data and for folders.

TFDS datasets are read through `builder.as_data_source(split)` from array_record files: random access,
no TensorFlow at read time, and each process reads only the records it asks for. A dataset that is
not prepared in `data_dir` is prepared there once (under a file lock, so concurrent processes on one
machine wait for the first). Fashion-MNIST is prepared offline from the four original .gz IDX files
in `data.manual_dir` (Debian's `dataset-fashion-mnist` package by default); their checksums differ
from upstream's (Debian re-compressed them), so they are recorded in
`<data_dir>/fashion_mnist/manual_dir_checksums.tsv`, never in the installed TFDS package.

An image folder (`data.name = "folder"`) is listed and checked when it is opened (file list,
captions, each image's header) and decoded batch by batch in `read`, so its size is bounded by the
disk, not by memory; see `FolderSource`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import tempfile
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
VERIFY_IMAGES = ("header", "full", "none")  # data.verify_images: what is checked of each image at open time
CHECK_CHUNK = 256  # images checked per round at open time
CAPTIONS_FILE = "captions.jsonl"
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


# ----------------------------------------------------------------------------------------------
# Image conversion


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
  """`img` as mode "L" (channels 1) or "RGB" (channels 3), see the module docstring."""
  if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit grayscale
    a = np.asarray(img).astype(np.float64)
    img = Image.fromarray(np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8))
  elif img.mode == "F":
    img = Image.fromarray(np.clip(np.round(np.asarray(img)), 0, 255).astype(np.uint8))
  if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
    rgba = img.convert("RGBA")
    img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
  want = "L" if channels == 1 else "RGB"
  if img.mode == want:
    return img
  if want == "L" and img.mode not in ("1", "RGB"):
    img = img.convert("RGB")  # palette, CMYK, YCbCr, ...: to RGB first, then luma
  return img.convert(want)


def to_square(img: Image.Image, image_size: int | None, channels: int) -> np.ndarray:
  """Converts a PIL image to uint8 [S, S, channels]: mode, centre crop, bicubic resize.

  Args:
    img: any PIL image.
    image_size: the output side S; None keeps the native side (the image must then be square).
    channels: 1 or 3.

  Returns:
    uint8 array [S, S, channels].
  """
  img = _to_mode(img, channels)
  w, h = img.size
  if w != h:
    if image_size is None:
      raise ValueError(f"image is {w}x{h} (not square): set data.image_size")
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
  size = image_size or w
  if img.size != (size, size):
    img = img.resize((size, size), Image.Resampling.BICUBIC)
  a = np.asarray(img, dtype=np.uint8)
  return a[:, :, None] if a.ndim == 2 else a


def _array_to_square(a: np.ndarray, image_size: int, channels: int) -> np.ndarray:
  """uint8 [H, W, C] (C in 1, 3, 4) or [H, W] -> uint8 [S, S, channels]."""
  if a.ndim == 3 and a.shape[0] == a.shape[1] == image_size and a.shape[2] == channels:
    return a.astype(np.uint8, copy=False)
  if a.ndim == 3 and a.shape[2] == 1:
    a = a[:, :, 0]
  return to_square(Image.fromarray(np.ascontiguousarray(a)), image_size, channels)


def _check_channels(channels: int) -> int:
  if channels not in (1, 3):
    raise ValueError(f"data.channels must be 1 or 3, got {channels!r}")
  return int(channels)


def _indices(indices: np.ndarray, n: int) -> np.ndarray:
  idx = np.asarray(indices, dtype=np.int64).reshape(-1)
  if idx.size and (idx.min() < 0 or idx.max() >= n):
    raise IndexError(f"record indices must lie in [0, {n}), got min {idx.min()} max {idx.max()}")
  return idx


# ----------------------------------------------------------------------------------------------
# TFDS


class TfdsSource:
  """A split of a prepared TFDS dataset (array_record), read by random access.

  Attributes:
    name: "<dataset>:<split>".
    num_classes: classes of the `label` ClassLabel feature, 0 if there is none (e.g. celeb_a).
    class_names: the class names ([] if unlabelled).
    image_size: side of the images read() returns.
    channels: 1 or 3.
  """

  def __init__(self, builder, split: str, image_size: int | None = None, channels: int | None = None,
               image_key: str = "image", label_key: str = "label"):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

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
    self.channels = _check_channels(channels if channels is not None else (1 if c == 1 else 3))
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
    idx = _indices(indices, len(self))
    images = np.zeros((len(idx), self.image_size, self.image_size, self.channels), np.uint8)
    labels = np.full(len(idx), -1, np.int32)
    for j, ex in enumerate(self._get(self._ds, idx)):
      images[j] = _array_to_square(np.asarray(ex[self._image_key]), self.image_size, self.channels)
      if self._labelled:
        labels[j] = int(ex[self._label_key])
    return {"image": images, "label": labels}

  def labels(self) -> np.ndarray:
    """All labels, read without decoding images (about 2 s per 60k records); cached."""
    if self._labels is None:
      if not self._labelled:
        self._labels = np.full(len(self), -1, np.int32)
      else:
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
        ds = self._builder.as_data_source(self._split, decoders={self._image_key: tfds.decode.SkipDecoding()})
        out = np.empty(len(ds), np.int32)
        for start in range(0, len(ds), 8192):
          idx = np.arange(start, min(start + 8192, len(ds)))
          out[idx] = [int(ex[self._label_key]) for ex in self._get(ds, idx)]
        self._labels = out
    return self._labels


@contextlib.contextmanager
def _file_lock(path: str):
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
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
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
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

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


def _prepare(builder, data_cfg, data_dir: str) -> None:
  """Downloads and prepares a TFDS dataset into `data_dir` (array_record)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

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


def open_tfds(data_cfg, split: str) -> TfdsSource:
  """Opens a split of a TFDS dataset, preparing it into `data.data_dir` first if needed."""
  name = data_cfg.get("name")
  data_dir = os.path.expanduser(data_cfg.get("data_dir") or os.environ.get("TFDS_DATA_DIR")
                                or "~/tensorflow_datasets")
  builder = _tfds_builder(name, data_dir)
  if not _is_prepared(builder):
    lock = os.path.join(data_dir, f".{builder.info.full_name.replace('/', '_')}.prepare.lock")
    with _file_lock(lock):  # a concurrent process may be preparing it: wait, then look again
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


# ----------------------------------------------------------------------------------------------
# Image folders


def _list_images(folder: str) -> list[str]:
  """Relative posix paths of the images under `folder`, recursively, sorted; hidden entries skipped."""
  found = []
  for root, dirs, files in os.walk(folder, followlinks=True):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    rel_root = os.path.relpath(root, folder)
    for f in files:
      if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
        rel = f if rel_root == "." else os.path.join(rel_root, f)
        found.append(rel.replace(os.sep, "/"))
  return sorted(found)


def _read_captions(folder: str, files: list[str]) -> dict[str, str] | None:
  """rel path -> caption from captions.jsonl and <stem>.txt sidecars; None if the folder has neither."""
  captions: dict[str, str] = {}
  known = set(files)
  jsonl = os.path.join(folder, CAPTIONS_FILE)
  has_jsonl = os.path.isfile(jsonl)
  if has_jsonl:
    with open(jsonl, encoding="utf-8") as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        where = f"{jsonl} line {lineno}"
        try:
          entry = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{where}: not JSON ({e})") from e
        if not (isinstance(entry, dict) and isinstance(entry.get("file"), str)
                and isinstance(entry.get("caption"), str)):
          raise ValueError(f'{where}: expected {{"file": <relative path>, "caption": <str>}}, got {line.strip()[:200]}')
        rel = posixpath.normpath(entry["file"].replace(os.sep, "/"))
        if rel not in known:
          raise ValueError(f"{where}: no image {rel!r} in {folder}")
        if rel in captions:
          raise ValueError(f"{where}: a second caption for {rel!r}")
        captions[rel] = entry["caption"]
  has_sidecar = False
  for rel in files:
    txt = os.path.join(folder, os.path.splitext(rel)[0] + ".txt")
    if os.path.isfile(txt):
      has_sidecar = True
      with open(txt, encoding="utf-8") as f:
        text = f.read()
      if rel in captions and captions[rel].strip() != text.strip():
        raise ValueError(f"{os.path.join(folder, rel)}: its caption in {CAPTIONS_FILE} and in {txt} differ")
      captions[rel] = text
  return captions if has_jsonl or has_sidecar else None


def _decode(path, image_size: int, channels: int) -> tuple[np.ndarray | None, str]:
  """Decodes one file (a path or a binary file object) -> (uint8 [S, S, C], "") or (None, reason)."""
  try:
    with Image.open(path) as img:
      img.load()  # GIF: the first frame
      img = ImageOps.exif_transpose(img)
  except Exception as e:  # pylint: disable=broad-except
    return None, f"cannot decode image (truncated or not an image): {type(e).__name__}: {e}"
  try:
    return to_square(img, image_size, channels), ""
  except Exception as e:  # pylint: disable=broad-except
    return None, f"cannot convert image of mode {img.mode} and size {img.size} to {channels} channels: {e}"


def _check_header(path: str) -> str:
  """"" if PIL recognises `path` as an image from its header (no pixel data decoded), else the reason."""
  try:
    with Image.open(path) as img:
      w, h = img.size
  except Exception as e:  # pylint: disable=broad-except
    return f"cannot decode image (truncated or not an image): {type(e).__name__}: {e}"
  if w <= 0 or h <= 0:
    return f"cannot decode image (truncated or not an image): its header gives the size {w}x{h}"
  return ""


def _workers() -> int:
  return max(1, min(16, os.cpu_count() or 1))


class FolderSource:
  """The images of a folder, listed and checked at open time, decoded per batch in `read`.

  Images (png, jpg, jpeg, bmp, webp, gif: first frame) are found recursively, hidden files and
  folders skipped, and sorted by relative path. Images in subfolders are labelled by their top-level
  subfolder (classes = the sorted subfolder names); images at the root are unlabelled (-1); a folder
  cannot mix both. Captions (optional) come from `captions.jsonl` at the root (one
  {"file": relative path, "caption": str} per line) or a `<image stem>.txt` beside the image; if the
  folder has any caption, every image needs a non-empty one.

  What is checked of each image when the folder is opened (`verify_images`): "header" (default)
  opens it with PIL, which reads the format and size from its first bytes without decoding the
  pixels; "full" decodes it (and drops the pixels: slow for big folders, but a truncated file is
  then found up front, where on_bad_image="skip" can leave it out); "none" only lists the files.
  Memory holds the file list, labels and captions, never the images: `read` decodes the images it
  is asked for (on a thread pool; the training loop prefetches the next batches on a worker
  thread), so peak memory does not grow with the folder (benchmarks/bench_folder.py). An image
  that passed the open-time check but cannot be decoded in `read` is an error naming the file
  (skipping there would shift the records under a running job).

  Attributes:
    name: "folder:<path>".
    num_classes: the number of class subfolders (0 if unlabelled).
    class_names: the class names ([] if unlabelled).
    image_size: side of the images.
    channels: 1 or 3.
    folder: the folder.
    files: relative paths of the images kept, in record order.
    captions: the caption of each kept image, or None if the folder has no captions.
    skipped: (path, reason) of each image skipped under on_bad_image="skip".
  """

  def __init__(self, folder: str, image_size: int | None, channels: int = 3, on_bad_image: str = "error",
               class_names: list[str] | None = None, *, verify_images: str = "header"):
    """Lists and checks the folder.

    Args:
      folder: the image folder.
      image_size: the square side to convert images to (required).
      channels: 1 or 3.
      on_bad_image: "error" (raise on the first bad file) or "skip" (skip, count, warn).
      class_names: the classes to label subfolders with (an eval folder uses its training
        folder's classes); default: this folder's own subfolders.
      verify_images: "header", "full" or "none" (see the class docstring).
    """
    if on_bad_image not in ("error", "skip"):
      raise ValueError(f"data.on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    if verify_images not in VERIFY_IMAGES:
      raise ValueError(f"data.verify_images must be one of {VERIFY_IMAGES}, got {verify_images!r}")
    if image_size is None:
      raise ValueError(f"data.image_size is required for an image folder ({folder}): images are centre-cropped "
                       "to a square, then resized to it")
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"image folder {folder} does not exist or is not a folder")
    self.name = f"folder:{folder}"
    self.folder = folder
    self.image_size = int(image_size)
    self.channels = _check_channels(channels)
    files = _list_images(folder)
    if not files:
      raise ValueError(f"image folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    label_of = self._class_labels(folder, files, class_names)
    captions = _read_captions(folder, files)
    self.skipped: list[tuple[str, str]] = []

    def bad(rel: str, reason: str) -> None:
      path = os.path.join(folder, rel)
      if on_bad_image == "error":
        raise ValueError(f"{path}: {reason}")
      self.skipped.append((path, reason))

    if captions is not None:  # checked before any image is opened: fail fast
      for rel in files:
        if rel not in captions:
          bad(rel, f"no caption (the folder has captions: add one to {CAPTIONS_FILE} or a "
                   f"{posixpath.basename(os.path.splitext(rel)[0])}.txt beside the image)")
        elif not captions[rel].strip():
          bad(rel, "empty caption")
      files = [f for f in files if f in captions and captions[f].strip()]
    if verify_images == "none":
      kept = files
    else:
      if verify_images == "full":
        check = lambda rel: _decode(os.path.join(folder, rel), self.image_size, self.channels)[1]
      else:
        check = lambda rel: _check_header(os.path.join(folder, rel))
      kept = []
      with concurrent.futures.ThreadPoolExecutor(_workers()) as pool:
        for start in range(0, len(files), CHECK_CHUNK):  # chunks: no future per file of a big folder at once
          chunk = files[start:start + CHECK_CHUNK]
          for rel, reason in zip(chunk, pool.map(check, chunk)):  # in order: the first bad file is the error
            if reason:
              bad(rel, reason)
            else:
              kept.append(rel)
    if self.skipped:
      log.warning("image folder %s: skipped %d bad image(s), e.g. %s: %s", folder, len(self.skipped),
                  *self.skipped[0])
    if not kept:
      raise ValueError(f"image folder {folder}: every image was skipped ({len(self.skipped)})")
    self.files = kept
    self._labels = np.array([label_of(f) for f in kept], np.int32)
    self.captions = None if captions is None else [captions[f].strip() for f in kept]
    self._pool = concurrent.futures.ThreadPoolExecutor(_workers(), thread_name_prefix="folder-decode")

  def _class_labels(self, folder: str, files: list[str], class_names: list[str] | None):
    """Sets num_classes/class_names and returns rel path -> label."""
    nested = [f for f in files if "/" in f]
    if nested and len(nested) != len(files):
      root = next(f for f in files if "/" not in f)
      raise ValueError(f"image folder {folder} mixes images at its root (e.g. {root}) and in class subfolders "
                       f"(e.g. {nested[0]}): put every image in a class subfolder, or none")
    found = sorted({f.split("/", 1)[0] for f in nested})
    names = list(class_names) if class_names is not None else found
    unknown = sorted(set(found) - set(names))
    if unknown:
      raise ValueError(f"image folder {folder}: class subfolders {unknown} are not among the training classes {names}")
    self.class_names = names if nested or class_names is not None else []
    self.num_classes = len(self.class_names)
    index = {n: i for i, n in enumerate(names)}
    return lambda f: index[f.split("/", 1)[0]] if "/" in f else -1

  def __len__(self) -> int:
    return len(self.files)

  def read(self, indices: np.ndarray) -> dict[str, Any]:
    """Records at `indices` [n], decoded now: "image" uint8 [n, S, S, C], "label" int32 [n], maybe "caption".

    Raises:
      ValueError: an image that cannot be decoded, naming its file.
    """
    idx = _indices(indices, len(self))
    paths = [os.path.join(self.folder, self.files[i]) for i in idx]
    decode = lambda p: _decode(p, self.image_size, self.channels)
    decoded = list(self._pool.map(decode, paths)) if len(paths) > 2 else [decode(p) for p in paths]
    images = np.zeros((len(idx), self.image_size, self.image_size, self.channels), np.uint8)
    for j, (image, reason) in enumerate(decoded):
      if image is None:
        raise ValueError(f"{paths[j]}: {reason}. Found when reading it: data.verify_images='full' decodes every "
                         "image when the folder is opened, where data.on_bad_image='skip' can leave broken ones out")
      images[j] = image
    out = {"image": images, "label": self._labels[idx]}
    if self.captions is not None:
      out["caption"] = [self.captions[i] for i in idx]
    return out

  def labels(self) -> np.ndarray:
    return self._labels


def open_folder(data_cfg, split: str, class_names: list[str] | None = None) -> FolderSource:
  """The folder source of `split`: "train" is `data.folder`, any other split `data.eval_folder`."""
  if "[" in split:
    raise ValueError(f"split {split!r}: image folders have no split slicing (use data.subset_size)")
  if split == "train":
    folder = data_cfg.get("folder")
    if not folder:
      raise ValueError("data.name='folder' needs data.folder (the image folder)")
  else:
    folder = data_cfg.get("eval_folder")
    if not folder:
      raise ValueError(f"split {split!r} of an image folder source reads data.eval_folder, which is not set "
                       "(data.folder is the 'train' split)")
    train_folder = os.path.expanduser(data_cfg.get("folder") or "")
    if class_names is None and train_folder and os.path.isdir(train_folder):
      train_files = _list_images(train_folder)  # label eval images with train's classes
      class_names = sorted({f.split("/", 1)[0] for f in train_files if "/" in f}) or None
  return FolderSource(os.path.expanduser(folder), data_cfg.get("image_size"), data_cfg.get("channels") or 3,
                      data_cfg.get("on_bad_image", "error"), class_names,
                      verify_images=data_cfg.get("verify_images", "header"))


def open_source(data_cfg, split: str) -> Source:
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
  if name == "shards":  # webdataset tars / parquet files with captions (data/shards.py)
    from solidmark_jax.data.shards import open_shards  # pylint: disable=g-import-not-at-top
    return open_shards(data_cfg, split)
  if name == "captioned_fashion_mnist":  # built offline on first use (data/captioned.py)
    from solidmark_jax.data.captioned import open_captioned  # pylint: disable=g-import-not-at-top
    return open_captioned(data_cfg, split)
  return open_tfds(data_cfg, split)
