"""Training instances and deterministic, per-host batches of marked images.

A *record* is an image of a source (a TFDS split, a folder, shards). An *instance* is one training
copy of a record: a record duplicated c times gives c instances, each with its own instance id and
key. Instance ids are 0 .. M-1 in a fixed order derived from the config alone.

Batch b of the run is rows [b*B, (b+1)*B) of the epoch's permutation of instances (epoch = b //
batches_per_epoch, permutation seeded by (seed, epoch)); each process reads only its own rows, so
the order is the same on any number of hosts and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from solidmark_jax import marks


@dataclasses.dataclass(frozen=True)
class Instances:
  """The training set after subset and duplication.

  Attributes:
    record_index: int64 [M], the source record behind each instance.
    image_id: int64 [M], the distinct-image id of each instance (0 .. n_images-1; duplicates share
      it): the condition id of "image"-conditioned models, like a caption shared by copies.
    num_images: number of distinct images.
  """

  record_index: np.ndarray
  image_id: np.ndarray
  num_images: int

  def __len__(self) -> int:
    return len(self.record_index)

  @property
  def instance_ids(self) -> np.ndarray:
    return np.arange(len(self), dtype=np.int64)


def select_records(num_records: int, subset_size: int | None, subset_mode: str, seed: int,
                   field: str = "data.subset_size") -> np.ndarray:
  """Record indices of a subset: the first n, or n chosen at random by `seed` (sorted)."""
  if subset_size is None or subset_size <= 0:
    return np.arange(num_records, dtype=np.int64)
  if subset_size > num_records:
    raise ValueError(f"{field}={subset_size} is larger than the {num_records} records available")
  if subset_mode == "first":
    return np.arange(subset_size, dtype=np.int64)
  if subset_mode == "random":
    rng = np.random.default_rng([seed, 0x5E7])
    return np.sort(rng.choice(num_records, subset_size, replace=False)).astype(np.int64)
  raise ValueError(f"data.subset_mode must be 'first' or 'random', got {subset_mode!r}")


def make_instances(num_records: int, data_cfg: ml_collections.ConfigDict, seed: int) -> Instances:
  """Applies `data.subset_size`/`subset_mode` and `data.duplicates` to a source of `num_records`.

  `data.duplicates` maps copies -> number of images: e.g. {2: 50, 3: 50, 4: 50} duplicates three
  disjoint groups of 50 subset images (chosen by seed) 2, 3 and 4 times.
  """
  records = select_records(num_records, data_cfg.get("subset_size"), data_cfg.get("subset_mode", "first"),
                           seed)
  copies = np.ones(len(records), np.int64)
  dup = dict(data_cfg.get("duplicates") or {})
  wanted = sum(int(v) for v in dup.values())
  if wanted > len(records):
    raise ValueError(f"data.duplicates asks for {wanted} images to duplicate, the subset has {len(records)}")
  if dup:
    rng = np.random.default_rng([seed, 0xD0B])
    chosen = rng.permutation(len(records))
    start = 0
    for c, count in sorted((int(k), int(v)) for k, v in dup.items()):
      if c < 1:
        raise ValueError(f"data.duplicates: copies must be >= 1, got {c}")
      copies[chosen[start:start + count]] = c
      start += count
  image_id = np.repeat(np.arange(len(records), dtype=np.int64), copies)
  return Instances(record_index=records[image_id], image_id=image_id, num_images=len(records))


def class_labels(labels: np.ndarray, field: str, split: str) -> np.ndarray:
  """The class ids of a class-conditional model's records; a record without a label is an error.

  A label of -1 (no label, e.g. every record of STL-10's "unlabelled" split) would index the
  condition table's last row, the null condition: the model would be queried unconditionally
  without anyone noticing. So it is refused, naming the config field and the split.

  Args:
    labels: int [n] labels of the records used (-1: none).
    field: the config field of the split, e.g. "data.eval_split".
    split: its value, e.g. "unlabelled[:10000]".

  Returns:
    int64 [n] labels, all >= 0.
  """
  labels = np.asarray(labels, np.int64)
  missing = np.flatnonzero(labels < 0)
  if missing.size:
    raise ValueError(
        f"{field}={split!r}: {missing.size} of the {labels.size} records used have no label (-1), and "
        "model.condition='class' would silently condition them on the null class; use a labelled split (e.g. "
        "STL-10's 'test', not 'unlabelled'), or model.condition='none'")
  return labels


def condition_ids(instances: Instances, labels: np.ndarray, condition: str, null_id: int) -> np.ndarray:
  """Per-instance condition ids for a model's condition kind."""
  if condition == "class":
    return np.asarray(labels, np.int64)
  if condition == "image":
    return instances.image_id
  return np.full(len(instances), null_id, np.int64)


@dataclasses.dataclass
class BatchPlan:
  """Which instances form global batch b, and which of its rows this process reads."""

  num_instances: int
  global_batch: int
  seed: int
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    if self.global_batch > self.num_instances:
      raise ValueError(f"train.batch_size={self.global_batch} is larger than the {self.num_instances} "
                       "training instances")
    if self.global_batch % self.process_count:
      raise ValueError(f"train.batch_size={self.global_batch} must divide over {self.process_count} processes")

  @property
  def batches_per_epoch(self) -> int:
    return self.num_instances // self.global_batch  # the ragged tail of an epoch is dropped

  def global_rows(self, b: int) -> np.ndarray:
    """Instance ids of global batch b [B]."""
    epoch, i = divmod(b, self.batches_per_epoch)
    perm = np.random.default_rng([self.seed, 0xE90C, epoch]).permutation(self.num_instances)
    return perm[i * self.global_batch:(i + 1) * self.global_batch]

  def local_rows(self, b: int) -> np.ndarray:
    per = self.global_batch // self.process_count
    return self.global_rows(b)[self.process_index * per:(self.process_index + 1) * per]


def marked_batch(images_u8: np.ndarray, keys: np.ndarray, pad: int, pattern: str,
                 key_layout: str = "sides") -> np.ndarray:
  """uint8 images [n, H, W, C] + keys [n] (or [n, m], placed by `key_layout`) -> marked model-space
  float32 [n, H', W', C]."""
  x = images_u8.astype(np.float32) / 255.0
  return marks.to_model_space(marks.apply_pattern(x, np.asarray(keys, np.float32), pad, pattern, key_layout))
