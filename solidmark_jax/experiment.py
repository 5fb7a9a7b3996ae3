"""What a config defines, built once and shared by training and evaluation.

The training data (source, instances, keymap), the model and its noise schedule. Everything is
validated here, before any array is allocated.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from solidmark_jax import marks, models
from solidmark_jax.data import open_source
from solidmark_jax.data.pipeline import Instances, make_instances
from solidmark_jax.data.pipeline import condition_ids, marked_batch
from solidmark_jax.diffusion import NoiseSchedule, make_schedule

KEYMAP_FILE = "keymap.json"


@dataclasses.dataclass
class Experiment:
  config: object
  source: object  # solidmark_jax.data Source of the training split
  instances: Instances
  keymap: marks.Keymap
  conditions: np.ndarray  # int64 [M] condition id per instance
  model: models.ConditionedUNet
  sched: NoiseSchedule
  image_size: int  # marked image side
  channels: int

  @property
  def null_id(self) -> int:
    return self.model.null_id

  @property
  def mask(self) -> np.ndarray:
    """[H, W, 1], 1 on the key region."""
    c = self.config.marks
    return marks.key_mask(self.image_size, self.image_size, c.pad, c.pattern)

  def read_marked(self, instance_ids: np.ndarray) -> dict:
    """Process-local batch of training instances: marked images in model space and their labels."""
    rows = self.source.read(self.instances.record_index[instance_ids])
    keys = self.keymap.lookup(instance_ids)
    return {
        "image": marked_batch(rows["image"], keys, self.config.marks.pad, self.config.marks.pattern),
        "condition": self.conditions[instance_ids].astype(np.int32),
        "label": np.asarray(rows["label"], np.int32),
        "key": keys.astype(np.float32),
        "instance_id": instance_ids.astype(np.int64),
    }


def build_experiment(config) -> Experiment:
  """Opens the training data, draws the keymap, validates and builds the model."""
  if config.marks.pattern not in marks.PATTERNS:
    raise ValueError(f"marks.pattern must be one of {marks.PATTERNS}, got {config.marks.pattern!r}")
  if config.marks.pad < 1:
    raise ValueError(f"marks.pad must be >= 1, got {config.marks.pad}")
  source = open_source(config.data, config.data.train_split)
  if config.marks.pattern == "centre" and config.marks.pad >= source.image_size:
    raise ValueError(f"marks.pad={config.marks.pad} must be smaller than the image ({source.image_size} px)")
  size = marks.marked_size(source.image_size, config.marks.pad, config.marks.pattern)
  models.validate(config.model, size, source.channels)
  instances = make_instances(len(source), config.data, config.seed)
  keymap = marks.Keymap.create(config.marks.key_seed, instances.instance_ids, config.marks.pattern)
  cond = config.model.condition
  if cond == "class":
    if source.num_classes <= 0:
      raise ValueError(f"model.condition='class' but data {source.name!r} has no labels; "
                       "use model.condition='none' or 'image'")
    num_conditions = source.num_classes
  elif cond == "image":
    num_conditions = instances.num_images
  else:
    num_conditions = 0
  model = models.build(config.model, size, source.channels, num_conditions)
  labels = source.labels()[instances.record_index] if cond == "class" else None
  conditions = condition_ids(instances, labels, cond, model.null_id)
  sched = make_schedule(config.diffusion.schedule, config.diffusion.num_steps)
  return Experiment(config, source, instances, keymap, conditions, model, sched, size, source.channels)


def sync_keymap(exp: Experiment, workdir: str, *, write: bool) -> str:
  """Writes the keymap to `workdir` or checks the one there; returns its path.

  A keymap already in the workdir that differs from the config's is an error: the workdir belongs
  to another data/marks setup, and nothing there is overwritten.

  In a multi-process run only the writer (process 0) touches the file; the other processes never
  read it (on a shared file system they could race its creation; on separate disks it is not
  there) but learn process 0's verdict in a broadcast, so every process returns, or raises, together,
  and the file is in place on return. Every process must call this at the same point.
  """
  path = os.path.join(workdir, KEYMAP_FILE)
  multi = jax.process_count() > 1
  error = None
  if write or not multi:
    try:
      _check_or_write_keymap(exp, path, write)
    except Exception as e:  # pylint: disable=broad-except - re-raised below, after the broadcast
      error = e
  if multi:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    failed = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if failed and error is None:
      raise ValueError(f"{path}: process 0 could not check or write the workdir's keymap (see its log)")
  if error is not None:
    raise error
  return path


def _check_or_write_keymap(exp: Experiment, path: str, write: bool) -> None:
  if os.path.exists(path):
    stored = marks.Keymap.load(path)
    if stored.hash != exp.keymap.hash:
      raise ValueError(
          f"{path}: the workdir's keymap (hash {stored.hash[:16]}..., {len(stored)} instances) differs from "
          f"the one this config draws (hash {exp.keymap.hash[:16]}..., {len(exp.keymap)} instances): "
          "the data, subset, duplication or key seed changed. Use another --workdir.")
  elif write:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    exp.keymap.save(path)
