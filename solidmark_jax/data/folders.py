"""Image folders as sources: images found recursively, checked at open time, decoded per batch.

`open_folder(data_cfg, split)` returns a `FolderSource` ("train": `data.folder`, any other split:
`data.eval_folder`). Subfolders are classes; captions come from `captions.jsonl` or `<stem>.txt`
sidecars; images are converted by `images.to_square`. See `FolderSource` for the rules.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import posixpath
from typing import Any, Callable

import ml_collections
import numpy as np
from PIL import Image

from solidmark_jax.data.images import VERIFY_IMAGES, check_channels, check_indices, decode_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
CHECK_CHUNK = 256  # images checked per round at open time
CAPTIONS_FILE = "captions.jsonl"


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
  is asked for (on a thread pool), so memory does not grow with the folder. An image that passed
  the open-time check but cannot be decoded in `read` is an error naming the file (skipping there
  would shift the records under a running job).

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
    self.channels = check_channels(channels)
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
        check = lambda rel: decode_image(os.path.join(folder, rel), self.image_size, self.channels)[1]
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

  def _class_labels(self, folder: str, files: list[str],
                    class_names: list[str] | None) -> Callable[[str], int]:
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
    idx = check_indices(indices, len(self))
    paths = [os.path.join(self.folder, self.files[i]) for i in idx]
    decode = lambda p: decode_image(p, self.image_size, self.channels)
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


def open_folder(data_cfg: ml_collections.ConfigDict, split: str, class_names: list[str] | None = None) -> FolderSource:
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
