"""A captioned image set made offline from Fashion-MNIST, to train text-conditioned models without LAION.

Each image gets a caption from its class and from details drawn deterministically from its record:
one of several sentence templates, a photo-kind word, a shade word (from the image's brightness), a
size word (from how much of the frame the item fills) and an item number unique to the record (so
every caption differs, as LAION's mostly do). For example:

  "a catalogue photo of a large dark pullover, item no. 52913"

`build_captioned_fashion_mnist` writes the set once into `<data_dir>/captioned_fashion_mnist/`
(under a file lock: concurrent processes build it once) in one of three formats that the data layer
reads: an image folder with `captions.jsonl` ("folder"), webdataset tars ("tar") or parquet shards
("parquet"). Images are stored as 28x28 grayscale PNGs; records keep the TFDS order of the split.
The output is byte-for-byte deterministic (for one Pillow/pyarrow version).

Config: `data.name = "captioned_fashion_mnist"`, `data.captioned_format` ("tar" by default),
`data.train_split` / `data.eval_split` = "train" or "test", optionally the first n records:
"train[:512]".
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import tempfile

import ml_collections
import numpy as np
from PIL import Image

from solidmark_jax.data.folders import CAPTIONS_FILE, FolderSource
from solidmark_jax.data.shards import ShardSource, expand_shards, open_shards
from solidmark_jax.data.tfds import file_lock, open_tfds

NAME = "captioned_fashion_mnist"
VERSION = "v1"  # bump when captions or the file layout change
FORMATS = ("folder", "tar", "parquet")
SPLIT_OFFSET = {"train": 0, "test": 60000}  # item numbers are unique across both splits
CLASS_WORDS = ("t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
               "ankle boot")
KINDS = ("photo", "picture", "catalogue photo", "product shot", "scan", "snapshot")
# {a_x}: the word x with its indefinite article ("a dark", "an ankle boot")
TEMPLATES = (
    "a {kind} of {a_size} {shade} {cls}, item no. {item}",
    "{a_shade} {cls} in a {size} cut, item {item}",
    "item {item}: {a_size} {cls}, {shade}",
    "{kind} of {a_cls} ({shade}, {size}), catalogue number {item}",
    "{a_shade} {cls} on a black background, {size}, no. {item}",
    "our {size} {cls} in {shade} tones, article {item}",
    "{a_cls}, {shade} and {size}; product {item}",
    "black and white {kind}: {size} {shade} {cls} #{item}",
)


def _with_article(word: str) -> str:
  return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def shade_word(image: np.ndarray) -> str:
  """Brightness of the item (mean of its non-black pixels, uint8 [H, W, C]) as a word."""
  item = image[image > 16]
  mean = float(item.mean()) if item.size else 0.0
  return "dark" if mean < 90 else "grey" if mean < 140 else "light" if mean < 190 else "bright white"


def size_word(image: np.ndarray) -> str:
  """How much of the frame the item fills (uint8 [H, W, C]) as a word."""
  fill = float((image > 16).mean())
  return "small" if fill < 0.3 else "medium-sized" if fill < 0.5 else "large"


def item_number(index: int) -> int:
  """A 5-digit number unique to each index in [0, 100000): an affine bijection modulo 100000."""
  return (index * 7919 + 31337) % 100000


def caption_for(index: int, image: np.ndarray, label: int) -> str:
  """The caption of record `index` (global: split offset included), its image uint8 [H, W, C] and label."""
  rng = np.random.default_rng([0xCA9, index])
  template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
  kind = KINDS[int(rng.integers(len(KINDS)))]
  cls, shade, size = CLASS_WORDS[int(label)], shade_word(image), size_word(image)
  return template.format(kind=kind, size=size, shade=shade, cls=cls, item=f"{item_number(index):05d}",
                         a_size=_with_article(size), a_shade=_with_article(shade), a_cls=_with_article(cls))


def parse_split(split: str) -> tuple[str, int | None]:
  """"train" / "test", optionally "[:n]" -> (base split, n or None)."""
  m = re.fullmatch(r"(train|test)(?:\[:(\d+)\])?", split)
  if not m:
    raise ValueError(f"split {split!r} of {NAME}: expected 'train' or 'test', optionally the first n records "
                     "as 'train[:n]'")
  return m.group(1), int(m.group(2)) if m.group(2) else None


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image[:, :, 0]).save(buf, format="PNG", optimize=False)
  return buf.getvalue()


def _tar_add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size, info.mtime, info.mode = len(data), 0, 0o644
  tf.addfile(info, io.BytesIO(data))


def _write(folder: str, fmt: str, keys: list[str], images: np.ndarray, captions: list[str], labels: np.ndarray,
           records_per_shard: int) -> None:
  """Writes records to `folder` in `fmt`."""
  if fmt == "folder":
    with open(os.path.join(folder, CAPTIONS_FILE), "w", encoding="utf-8") as f:
      for key, image, caption in zip(keys, images, captions):
        with open(os.path.join(folder, f"{key}.png"), "wb") as g:
          g.write(_png(image))
        f.write(json.dumps({"file": f"{key}.png", "caption": caption}) + "\n")
    return
  for s, start in enumerate(range(0, len(keys), records_per_shard)):
    sl = slice(start, start + records_per_shard)
    if fmt == "tar":
      with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, image, caption, label in zip(keys[sl], images[sl], captions[sl], labels[sl]):
          _tar_add(tf, f"{key}.png", _png(image))
          _tar_add(tf, f"{key}.txt", caption.encode("utf-8"))
          _tar_add(tf, f"{key}.cls", str(int(label)).encode())
    else:
      import pyarrow as pa  # lazy: only the parquet format needs pyarrow  # pylint: disable=g-import-not-at-top
      import pyarrow.parquet as pq  # lazy: see above  # pylint: disable=g-import-not-at-top
      table = pa.table({
          "key": pa.array(keys[sl], pa.string()),
          "image": pa.array([_png(im) for im in images[sl]], pa.binary()),
          "caption": pa.array(captions[sl], pa.string()),
          "label": pa.array(labels[sl], pa.int32()),
      })
      pq.write_table(table, os.path.join(folder, f"{s:05d}.parquet"), row_group_size=256)


def build_captioned_fashion_mnist(data_dir: str, split: str = "train", fmt: str = "tar",
                                  manual_dir: str | None = None, records_per_shard: int = 10000,
                                  out_dir: str | None = None) -> str:
  """Builds the captioned set of `split` in format `fmt` once; returns its folder.

  Args:
    data_dir: the TFDS data dir (Fashion-MNIST is prepared there first if needed); the set goes to
      `<out_dir>/v1/<split>/<fmt>/`.
    split: "train" or "test", or the first n records: "train[:n]".
    fmt: "folder", "tar" or "parquet".
    manual_dir: Fashion-MNIST's .gz files (default: Debian's dataset-fashion-mnist).
    records_per_shard: records per tar / parquet file.
    out_dir: where sets are built (default `<data_dir>/captioned_fashion_mnist`).

  Returns:
    The folder holding the set (and `manifest.json`, written last).
  """
  if fmt not in FORMATS:
    raise ValueError(f"data.captioned_format must be one of {FORMATS}, got {fmt!r}")
  if records_per_shard < 1:
    raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
  base, n = parse_split(split)
  data_dir = os.path.expanduser(data_dir)
  name = base if n is None else f"{base}_first{n}"
  out_dir = os.path.expanduser(out_dir) if out_dir else os.path.join(data_dir, NAME)
  final = os.path.join(out_dir, VERSION, name, fmt)
  manifest = os.path.join(final, "manifest.json")
  if os.path.isfile(manifest):
    return final
  with file_lock(os.path.join(out_dir, f".{VERSION}.{name}.{fmt}.lock")):
    if os.path.isfile(manifest):  # built by a concurrent process while we waited
      return final
    source = open_tfds(ml_collections.ConfigDict({"name": "fashion_mnist", "data_dir": data_dir,
                                                  "manual_dir": manual_dir, "channels": 1}), base)
    total = len(source) if n is None else n
    if total > len(source):
      raise ValueError(f"split {split!r}: Fashion-MNIST's {base} split has only {len(source)} records")
    rows = source.read(np.arange(total))
    images, labels = rows["image"], rows["label"]  # [n, 28, 28, 1], [n]
    offset = SPLIT_OFFSET[base]
    keys = [f"{i:06d}" for i in range(total)]
    captions = [caption_for(offset + i, images[i], int(labels[i])) for i in range(total)]
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{fmt}.", dir=os.path.dirname(final))
    try:
      _write(tmp, fmt, keys, images, captions, labels, records_per_shard)
      with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump({"name": NAME, "version": VERSION, "split": split, "format": fmt, "records": total,
                   "class_words": list(CLASS_WORDS), "records_per_shard": records_per_shard}, f, indent=1)
      if os.path.isdir(final):  # a half-written folder of a killed build (no manifest)
        shutil.rmtree(final)
      os.rename(tmp, final)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
  return final


def open_captioned(data_cfg: ml_collections.ConfigDict, split: str) -> FolderSource | ShardSource:
  """Builds (first use) and opens split `split` of the captioned Fashion-MNIST set.

  Reads `data.data_dir`, `data.manual_dir`, `data.captioned_format` ("tar"), `data.image_size`
  (default 28, the native size), `data.channels` (default 1), `data.on_bad_image`,
  `data.verify_images`. Labels (the classes) are kept in the tar and parquet formats; the folder
  format is unlabelled.
  """
  data_dir = os.path.expanduser(data_cfg.get("data_dir") or os.environ.get("TFDS_DATA_DIR")
                                or "~/tensorflow_datasets")
  fmt = data_cfg.get("captioned_format") or "tar"
  folder = build_captioned_fashion_mnist(data_dir, split, fmt, data_cfg.get("manual_dir"))
  image_size = data_cfg.get("image_size") or 28
  channels = data_cfg.get("channels") or 1
  if fmt == "folder":
    source = FolderSource(folder, image_size, channels, data_cfg.get("on_bad_image", "error"),
                          verify_images=data_cfg.get("verify_images", "header"))
  else:
    source = open_shards(ml_collections.ConfigDict({
        "shards": expand_shards(folder), "image_size": image_size, "channels": channels,
        "on_bad_image": data_cfg.get("on_bad_image", "error"), "verify_images": data_cfg.get("verify_images", "header"),
    }), "train", num_classes=len(CLASS_WORDS), class_names=list(CLASS_WORDS))
  source.name = f"{NAME}:{split}"
  return source
