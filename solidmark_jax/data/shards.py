"""LAION-style shards as sources: webdataset tars and parquet files of captioned images, read by record index.

`open_shards(data_cfg, split)` returns a `ShardSource` ("train": `data.shards`, any other split:
`data.eval_shards`; each a glob, a folder or a list of files). Records are in sorted shard order,
then in the order inside each shard. Opening indexes every shard (where each record lies, its
caption and label, kept in memory); `read` decodes only the images it is asked for.

Formats (by file extension):
- `.tar`, uncompressed webdataset: members `<key>.<ext>`, the key being the member path up to the
  first dot of its file name. A record is a key with an image member (`jpg`, `jpeg`, `png`, `webp`)
  and its caption: `<key>.txt` (UTF-8 text) or else `<key>.json` with a "caption" string (what
  img2dataset writes). An optional `<key>.cls` (an integer as text) is the label.
- `.parquet`: one row per record; the image column holds encoded bytes, or a struct with a "bytes"
  field (Hugging Face datasets' Image feature). Columns: `image_column` (default the first of
  "image", "jpg", "png", "webp"), `caption_column` (default "caption", then "text", "txt"),
  `label_column` (default "label" if present, else none).

Bad records (no image, no or an empty caption, a caption that is not text, a label that is not an
integer, an image whose first bytes are no JPEG/PNG/WebP/GIF/BMP signature) are found at open time:
with `on_bad_image="error"` the first is an error naming the shard and the member or row; with
"skip" they are left out, counted in `skipped` and logged. `verify_images`: "header" (default)
checks each image's first bytes, "full" decodes every image (slow), "none" checks no image. An image
broken past its header that is first found in `read` is always an error (skipping there would shift
the records under a running job).
"""

from __future__ import annotations

import concurrent.futures
import glob
import io
import json
import logging
import os
import posixpath
import tarfile
from typing import Any, Sequence

import ml_collections
import numpy as np

from solidmark_jax.data.images import VERIFY_IMAGES, check_channels, check_indices, decode_image

log = logging.getLogger(__name__)

TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
IMAGE_COLUMNS = ("image", "jpg", "png", "webp")
CAPTION_COLUMNS = ("caption", "text", "txt")
SHARD_EXTS = (".tar", ".parquet")
HEADER_BYTES = 16


def image_header_ok(head: bytes) -> bool:
  """True if `head` (the first bytes of a file) starts like a JPEG, PNG, WebP, GIF or BMP image."""
  return (head.startswith(b"\xff\xd8\xff") or head.startswith(b"\x89PNG\r\n\x1a\n")
          or (head[:4] == b"RIFF" and head[8:12] == b"WEBP") or head[:6] in (b"GIF87a", b"GIF89a")
          or head.startswith(b"BM"))


def _caption_of(value: Any) -> tuple[str | None, str]:
  """A caption value (str, UTF-8 bytes) -> (stripped caption, "") or (None, reason)."""
  if value is None:
    return None, "no caption"
  if isinstance(value, (bytes, bytearray)):
    try:
      value = bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
      return None, f"caption is not UTF-8 text ({e})"
  if not isinstance(value, str):
    return None, f"caption is not text (a {type(value).__name__})"
  if not value.strip():
    return None, "empty caption"
  return value.strip(), ""


def _label_of(value: Any) -> tuple[int | None, str]:
  if isinstance(value, (bytes, bytearray)):
    value = bytes(value).decode("utf-8", "replace").strip()
  try:
    label = int(value)
  except (TypeError, ValueError):
    return None, f"label {value!r} is not an integer"
  if label < 0:
    return None, f"label {label} is negative"
  return label, ""


def _tar_key(name: str) -> tuple[str, str]:
  """webdataset member name -> (key, extension): the key runs to the first dot of the file name."""
  folder, base = posixpath.split(name)
  stem, _, ext = base.partition(".")
  return posixpath.join(folder, stem), ext.lower()


class ShardSource:
  """Captioned images in webdataset tars and/or parquet files, decoded lazily by record index.

  Attributes:
    name: "shards:<path>" (one file) or "shards:<common folder> (<n> files)".
    num_classes: 0 without labels; else `num_classes` if given, or the largest label + 1.
    class_names: `class_names` if given, else [].
    image_size: side of the images read() returns.
    channels: 1 or 3.
    paths: the shard files, sorted.
    locations: where each record comes from, "<shard>:<member key>" or "<shard> row <i>".
    captions: the caption of each record (stripped), list[str].
    skipped: (where, reason) of each record skipped under on_bad_image="skip".
  """

  def __init__(self, paths: Sequence[str], image_size: int | None, channels: int = 3, on_bad_image: str = "error",
               verify_images: str = "header", image_column: str | None = None, caption_column: str | None = None,
               label_column: str | None = None, num_classes: int | None = None,
               class_names: Sequence[str] | None = None):
    """Indexes the shards: record locations, captions and labels; checks them (see the module docstring).

    Args:
      paths: shard files (.tar or .parquet); they are read in sorted order.
      image_size: the square side images are converted to (required).
      channels: 1 or 3.
      on_bad_image: "error" or "skip".
      verify_images: "header", "full" or "none".
      image_column: parquet image column (default: the first of IMAGE_COLUMNS present).
      caption_column: parquet caption column (default: the first of CAPTION_COLUMNS present).
      label_column: parquet label column (default: "label" if present).
      num_classes: the number of classes (default: the largest label + 1, 0 without labels).
      class_names: their names.
    """
    if on_bad_image not in ("error", "skip"):
      raise ValueError(f"data.on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    if verify_images not in VERIFY_IMAGES:
      raise ValueError(f"data.verify_images must be one of {VERIFY_IMAGES}, got {verify_images!r}")
    if image_size is None:
      raise ValueError("data.image_size is required for shards: images are centre-cropped to a square, then "
                       "resized to it")
    if not paths:
      raise ValueError("no shard files given")
    self.paths = sorted(os.fspath(p) for p in paths)
    for p in self.paths:
      if not os.path.isfile(p):
        raise FileNotFoundError(f"shard {p} does not exist or is not a file")
      if not p.endswith(SHARD_EXTS):
        raise ValueError(f"shard {p}: unknown format, expected a file ending in {' or '.join(SHARD_EXTS)}")
    self.image_size = int(image_size)
    self.channels = check_channels(channels)
    self.on_bad_image = on_bad_image
    self.verify_images = verify_images
    self.skipped: list[tuple[str, str]] = []
    self._columns = (image_column, caption_column, label_column)
    self.locations: list[str] = []
    self.captions: list[str] = []
    labels: list[int] = []
    shard: list[int] = []
    loc_a: list[int] = []  # tar: data offset; parquet: row group
    loc_b: list[int] = []  # tar: data size; parquet: row within its group
    self._image_column: dict[str, str] = {}  # parquet shard -> its image column
    for s, path in enumerate(self.paths):
      index = self._index_tar(path) if path.endswith(".tar") else self._index_parquet(path)
      for key, caption, label, a, b in index:
        self.locations.append(key)
        self.captions.append(caption)
        labels.append(label)
        shard.append(s)
        loc_a.append(a)
        loc_b.append(b)
    self._shard = np.asarray(shard, np.int32)
    self._loc_a = np.asarray(loc_a, np.int64)
    self._loc_b = np.asarray(loc_b, np.int64)
    self._labels = np.asarray(labels, np.int32)
    if verify_images == "full" and len(self.locations):
      self._verify_full()
    if self.skipped:
      log.warning("shards %s: skipped %d bad record(s), e.g. %s: %s", self.paths[0] if len(self.paths) == 1
                  else f"({len(self.paths)} files)", len(self.skipped), *self.skipped[0])
    if not self.locations:
      raise ValueError(f"shards {self.paths[:3]}{'...' if len(self.paths) > 3 else ''}: no records"
                       + (f" (all {len(self.skipped)} skipped)" if self.skipped else ""))
    labelled = self._labels >= 0
    if labelled.any() and not labelled.all():
      i = int(np.argmin(labelled))
      raise ValueError(f"{self.locations[i]}: has no label while other records have one: label every record or none")
    found = int(self._labels.max()) + 1 if labelled.any() else 0
    if num_classes is not None and found > num_classes:
      raise ValueError(f"shards have label {found - 1}, not below num_classes={num_classes}")
    self.num_classes = int(num_classes) if num_classes is not None and labelled.any() else found
    self.class_names = list(class_names) if class_names is not None and labelled.any() else []
    if len(self.paths) == 1:
      self.name = f"shards:{self.paths[0]}"
    else:
      self.name = f"shards:{os.path.commonpath(self.paths)} ({len(self.paths)} files)"

  # -------------------------------------------------------------------------------- indexing

  def _bad(self, where: str, reason: str) -> None:
    if self.on_bad_image == "error":
      raise ValueError(f"{where}: {reason}")
    self.skipped.append((where, reason))

  def _index_tar(self, path: str) -> list[tuple[str, str, int, int, int]]:
    try:
      with tarfile.open(path, "r:") as tf:
        members = [m for m in tf.getmembers() if m.isfile()]
    except tarfile.ReadError as e:
      raise ValueError(f"shard {path}: not an uncompressed tar file ({e}); webdataset shards are read by random "
                       "access, which needs plain .tar (decompress .tar.gz first)") from e
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    for m in members:
      if posixpath.basename(m.name).startswith("."):
        continue
      key, ext = _tar_key(m.name)
      groups.setdefault(key, {})[ext] = m  # insertion order: the key's first member
    out = []
    with open(path, "rb") as f:

      def member_bytes(m: tarfile.TarInfo, n: int | None = None) -> bytes:
        f.seek(m.offset_data)
        return f.read(m.size if n is None else min(n, m.size))

      for key, exts in groups.items():
        where = f"{path}:{key}"
        image = next((exts[e] for e in TAR_IMAGE_EXTS if e in exts), None)
        if image is None:
          self._bad(where, f"no image member ({', '.join('.' + e for e in TAR_IMAGE_EXTS)}); members: "
                           f"{sorted(exts)}")
          continue
        where = f"{path}:{image.name}"
        if "txt" in exts:
          caption, reason = _caption_of(member_bytes(exts["txt"]))
        elif "json" in exts:
          caption, reason = self._json_caption(member_bytes(exts["json"]))
        else:
          caption, reason = None, f"no caption: expected a {key}.txt or {key}.json member"
        if caption is None:
          self._bad(where, reason)
          continue
        label = -1
        if "cls" in exts:
          label, reason = _label_of(member_bytes(exts["cls"]))
          if label is None:
            self._bad(f"{path}:{exts['cls'].name}", reason)
            continue
        if self.verify_images == "header" and not image_header_ok(member_bytes(image, HEADER_BYTES)):
          self._bad(where, "not an image (its first bytes are no JPEG/PNG/WebP/GIF/BMP signature)")
          continue
        out.append((where, caption, label, image.offset_data, image.size))
    return out

  @staticmethod
  def _json_caption(raw: bytes) -> tuple[str | None, str]:
    try:
      entry = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      return None, f"the .json member is not UTF-8 JSON ({e})"
    if not isinstance(entry, dict) or "caption" not in entry:
      return None, 'no caption: the .json member has no "caption" field'
    return _caption_of(entry["caption"])

  def _index_parquet(self, path: str) -> list[tuple[str, str, int, int, int]]:
    import pyarrow as pa  # lazy: only parquet shards need pyarrow  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # lazy: see above  # pylint: disable=g-import-not-at-top

    try:
      pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
      raise ValueError(f"shard {path}: not a parquet file ({e})") from e
    names = pf.schema_arrow.names
    image_col, caption_col, label_col = self._columns

    def pick(given: str | None, defaults: Sequence[str], field: str) -> str:
      if given:
        if given not in names:
          raise ValueError(f"shard {path}: no column {given!r} (data.{field}); columns: {names}")
        return given
      found = next((c for c in defaults if c in names), None)
      if found is None:
        raise ValueError(f"shard {path}: no {field.split('_')[0]} column among {list(defaults)}; columns: {names}. "
                         f"Set data.{field}")
      return found

    image_col = pick(image_col, IMAGE_COLUMNS, "image_column")
    caption_col = pick(caption_col, CAPTION_COLUMNS, "caption_column")
    if label_col and label_col not in names:
      raise ValueError(f"shard {path}: no column {label_col!r} (data.label_column); columns: {names}")
    label_col = label_col or ("label" if "label" in names else None)
    self._image_column[path] = image_col
    captions = pf.read(columns=[caption_col]).column(0).to_pylist()
    labels = pf.read(columns=[label_col]).column(0).to_pylist() if label_col else [-1] * len(captions)
    heads: list[bytes | None] | None = None
    if self.verify_images == "header":
      heads = []
      for batch in pf.iter_batches(batch_size=1024, columns=[image_col]):
        heads.extend(None if v is None else v[:HEADER_BYTES] for v in map(_image_bytes, batch.column(0).to_pylist()))
    group_of = np.repeat(np.arange(pf.metadata.num_row_groups),
                         [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)])
    starts = np.concatenate([[0], np.cumsum(np.bincount(group_of, minlength=pf.metadata.num_row_groups))])
    out = []
    for i, raw in enumerate(captions):
      where = f"{path} row {i}"
      caption, reason = _caption_of(raw) if raw is not None else (None, f"no caption (null in column {caption_col!r})")
      if caption is None:
        self._bad(where, reason)
        continue
      label = -1
      if label_col:
        label, reason = _label_of(labels[i])
        if label is None:
          self._bad(where, reason)
          continue
      if heads is not None:
        if heads[i] is None:
          self._bad(where, f"no image (null in column {image_col!r})")
          continue
        if not image_header_ok(heads[i]):
          self._bad(where, "not an image (its first bytes are no JPEG/PNG/WebP/GIF/BMP signature)")
          continue
      g = int(group_of[i])
      out.append((where, caption, label, g, i - int(starts[g])))
    return out

  def _verify_full(self) -> None:
    """Decodes every image once; bad ones are errors or skipped (and dropped from the index)."""
    good = np.ones(len(self.locations), bool)
    for start in range(0, len(self.locations), 1024):
      idx = np.arange(start, min(start + 1024, len(self.locations)))
      for i, (_, reason) in zip(idx, self._decode_many(idx)):
        if reason:
          self._bad(self.locations[i], reason)
          good[i] = False
    if not good.all():
      keep = np.flatnonzero(good)
      self.locations = [self.locations[i] for i in keep]
      self.captions = [self.captions[i] for i in keep]
      self._shard, self._loc_a, self._loc_b = self._shard[keep], self._loc_a[keep], self._loc_b[keep]
      self._labels = self._labels[keep]

  # -------------------------------------------------------------------------------- reading

  def _raw_bytes(self, idx: np.ndarray) -> list[bytes | None]:
    """Encoded image bytes of records `idx`, read shard by shard (parquet: row group by row group)."""
    out: list[bytes | None] = [None] * len(idx)
    for s in np.unique(self._shard[idx]):
      rows = np.flatnonzero(self._shard[idx] == s)
      path = self.paths[s]
      if path.endswith(".tar"):
        with open(path, "rb") as f:
          for j in rows:
            f.seek(int(self._loc_a[idx[j]]))
            out[j] = f.read(int(self._loc_b[idx[j]]))
      else:
        import pyarrow as pa  # lazy: only parquet shards need pyarrow  # pylint: disable=g-import-not-at-top
        import pyarrow.parquet as pq  # lazy: see above  # pylint: disable=g-import-not-at-top
        pf = pq.ParquetFile(path)
        column = self._image_column[path]
        groups = self._loc_a[idx[rows]]
        for g in np.unique(groups):
          sel = rows[groups == g]
          table = pf.read_row_group(int(g), columns=[column])
          values = table.column(0).take(pa.array(self._loc_b[idx[sel]])).to_pylist()
          for j, v in zip(sel, values):
            out[j] = _image_bytes(v)
    return out

  def _decode_many(self, idx: np.ndarray) -> list[tuple[np.ndarray | None, str]]:
    raw = self._raw_bytes(idx)

    def decode(b: bytes | None) -> tuple[np.ndarray | None, str]:
      if not b:
        return None, "no image bytes"
      return decode_image(io.BytesIO(b), self.image_size, self.channels)

    if len(raw) <= 2:
      return [decode(b) for b in raw]
    with concurrent.futures.ThreadPoolExecutor(max(1, min(8, len(raw), os.cpu_count() or 1))) as pool:
      return list(pool.map(decode, raw))

  def __len__(self) -> int:
    return len(self.locations)

  def read(self, indices: np.ndarray) -> dict[str, Any]:
    """Records at `indices` [n]: "image" uint8 [n, S, S, C], "label" int32 [n], "caption" list[str].

    Raises:
      ValueError: an image that cannot be decoded, naming its shard and member or row.
    """
    idx = check_indices(indices, len(self))
    images = np.zeros((len(idx), self.image_size, self.image_size, self.channels), np.uint8)
    for j, (image, reason) in enumerate(self._decode_many(idx)):
      if image is None:
        raise ValueError(f"{self.locations[idx[j]]}: {reason}. Found when reading it: data.verify_images='full' "
                         "decodes every image when the shards are opened, where data.on_bad_image='skip' "
                         "can leave broken ones out")
      images[j] = image
    return {"image": images, "label": self._labels[idx], "caption": [self.captions[i] for i in idx]}

  def labels(self) -> np.ndarray:
    return self._labels


def _image_bytes(value: Any) -> bytes | None:
  """A parquet image cell: bytes, or a struct {"bytes": ..., "path": ...} (HF datasets' Image)."""
  if isinstance(value, dict):
    value = value.get("bytes")
  return bytes(value) if isinstance(value, (bytes, bytearray)) else None


def expand_shards(spec: str | Sequence[str], field: str = "data.shards") -> list[str]:
  """Shard files of a glob, a folder (its .tar and .parquet files) or a list of these; sorted, unique."""
  entries = [spec] if isinstance(spec, str) else list(spec)
  if not entries:
    raise ValueError(f"{field} is empty: give a glob, a folder or a list of .tar / .parquet files")
  found: set[str] = set()
  for entry in entries:
    if not isinstance(entry, str):
      raise ValueError(f"{field}: expected paths or globs (str), got {entry!r}")
    entry = os.path.expanduser(entry)
    if os.path.isdir(entry):
      matches = [os.path.join(entry, f) for f in os.listdir(entry) if f.endswith(SHARD_EXTS)]
    else:
      matches = glob.glob(entry)
    matches = [m for m in matches if os.path.isfile(m)]
    if not matches:
      raise FileNotFoundError(f"{field}: {entry!r} matches no shard file (expected .tar or .parquet files, a "
                              "folder of them, or a glob)")
    found.update(os.path.abspath(m) for m in matches)
  return sorted(found)


def open_shards(data_cfg: ml_collections.ConfigDict, split: str, num_classes: int | None = None,
                class_names: Sequence[str] | None = None) -> ShardSource:
  """The shard source of `split`: "train" is `data.shards`, any other split `data.eval_shards`.

  Reads `data.image_size` (required), `data.channels` (default 3), `data.on_bad_image`,
  `data.verify_images` ("header"), `data.image_column` / `caption_column` / `label_column`,
  `data.num_classes`.
  """
  if "[" in split:
    raise ValueError(f"split {split!r}: shards have no split slicing (use data.subset_size)")
  field = "data.shards" if split == "train" else "data.eval_shards"
  spec = data_cfg.get("shards") if split == "train" else data_cfg.get("eval_shards")
  if not spec:
    raise ValueError(f"split {split!r} of a shard source reads {field}, which is not set "
                     "(data.shards is the 'train' split, data.eval_shards any other)")
  return ShardSource(
      expand_shards(spec, field), data_cfg.get("image_size"), data_cfg.get("channels") or 3,
      data_cfg.get("on_bad_image", "error"), data_cfg.get("verify_images", "header"), data_cfg.get("image_column"),
      data_cfg.get("caption_column"), data_cfg.get("label_column"),
      num_classes if num_classes is not None else data_cfg.get("num_classes"), class_names)
