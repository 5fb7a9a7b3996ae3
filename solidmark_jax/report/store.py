"""A resumable, append-only store of per-image outpainting results (JSON lines).

Line 1 holds the run's metadata ({"meta": {...}}: keymap hash, checkpoint step, sampler settings,
...); every further line is one image of one group:

  {"group": "members", "instance_id": 17, "key": 0.41, "k_pred": [0.40, 0.43]}

or, with m keys per image (`marks.num_keys`), the m keys and per repeat the m predicted keys:

  {"group": "members", "instance_id": 17, "key": [0.41, 0.07], "k_pred": [[0.40, 0.05], [0.43, 0.09]]}

With classifier-free guidance a line also holds Wen et al.'s noise magnitude per repeat
("noise_magnitude": [12.1, 11.8]; docs/noise_magnitude.md), and a region query's line the scores of
the hidden region per repeat (`EXTRA_FIELDS`: "region_l2": [0.08, 0.07], ...; docs/regions.md), a DoRI
query's the search's outcome ("dori_delta_norm", ...; docs/dori.md).

Each finished batch is appended in one write, then fsync'ed, so after a crash the file holds whole
batches plus at most one torn last line, which reopening drops. A write that fails (ENOSPC, EIO) is
an `OSError` naming the store, and the file is cut back to the batches before it. A re-run opens the
store with the same metadata (a mismatch is a clear error: results of two checkpoints must not
mix), asks `remaining` which instance ids still need outpainting, and appends those. The final
summary is computed from the store, sorted by (group, instance id), so an interrupted and resumed
run reports exactly what an uninterrupted one does. Only one process (process 0) should write.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable

import numpy as np
from numpy.typing import ArrayLike

GROUPS = ("members", "non_members", "random_init")  # the usual groups, in report order
# per-image, per-repeat numbers a line may hold beside its keys (region queries: evaluation/regions.py)
EXTRA_FIELDS = ("region_l2", "region_ssim", "region_null_l2", "region_null_ssim",
                # a DoRI query (docs/dori.md): ||delta||, the denoising loss under c0 and under c0 + delta
                "dori_delta_norm", "dori_loss_initial", "dori_loss_final")


def group_order(names: Iterable[str]) -> list[str]:
  """Known groups first (members, non_members, random_init), then others alphabetically."""
  names = set(names)
  return [g for g in GROUPS if g in names] + sorted(names - set(GROUPS))


@dataclasses.dataclass
class Results:
  """Per-image results of one evaluation, sorted by (group, instance id).

  Attributes:
    instance_id: int64 [N].
    group: str [N] ("members", "non_members", "random_init", ...).
    key: float64 [N] true keys; [N, m] with m keys per image.
    k_pred: float64 [N, r] predicted keys per repeat (NaN where a group has fewer repeats);
      [N, r, m] with m keys per image.
    noise_magnitude: float64 [N, r] Wen et al.'s noise magnitude per repeat (NaN where an image has
      none), or None when no image has one (no guidance).
    extras: {name: float64 [N, r]} the `EXTRA_FIELDS` some image has (NaN where an image has none).
  """

  instance_id: np.ndarray
  group: np.ndarray
  key: np.ndarray
  k_pred: np.ndarray
  noise_magnitude: np.ndarray | None = None
  extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def __len__(self) -> int:
    return len(self.instance_id)

  @property
  def num_keys(self) -> int:
    """m, keys per image."""
    return 1 if self.key.ndim == 1 else int(self.key.shape[1])

  @classmethod
  def from_records(cls, records: Iterable[dict]) -> "Results":
    """Builds sorted results from dicts with group, instance_id, key, k_pred (list or scalar).

    One key per image: key a number, k_pred [r] (or a number). m keys: key a list of m numbers,
    k_pred [r, m] (or [m]). Every record must have the same number of keys.
    """
    records = list(records)
    order = {g: i for i, g in enumerate(group_order(r["group"] for r in records))}
    records.sort(key=lambda r: (order[r["group"]], int(r["instance_id"])))
    counts = {int(np.size(rec["key"])) if np.ndim(rec["key"]) else 0 for rec in records}  # 0: one scalar key
    if len(counts) > 1:
      raise ValueError(f"results: records with different numbers of keys per image ({sorted(counts)}; 0 = one "
                       "scalar key) cannot be mixed")
    m = counts.pop() if counts else 0
    shape = (-1,) if m == 0 else (-1, m)
    preds = [np.asarray(rec["k_pred"], np.float64).reshape(shape) for rec in records]  # [r] or [r, m]
    r = max((len(kp) for kp in preds), default=1)
    k_pred = np.full((len(records), r) + shape[1:], np.nan)
    for i, kp in enumerate(preds):
      k_pred[i, :len(kp)] = kp
    key = np.array([np.asarray(rec["key"], np.float64) for rec in records], np.float64).reshape((len(records),) +
                                                                                                 shape[1:])

    def per_repeat(name):
      if not any(name in rec for rec in records):
        return None
      out = np.full((len(records), r), np.nan)
      for i, rec in enumerate(records):
        values = np.asarray(rec.get(name, []), np.float64).reshape(-1)
        out[i, :len(values)] = values
      return out

    magnitude = per_repeat("noise_magnitude")
    extras = {name: v for name in EXTRA_FIELDS if (v := per_repeat(name)) is not None}
    return cls(
        instance_id=np.array([int(rec["instance_id"]) for rec in records], np.int64),
        group=np.array([str(rec["group"]) for rec in records], dtype=object),
        key=key,
        k_pred=k_pred,
        noise_magnitude=magnitude,
        extras=extras,
    )

  @property
  def groups(self) -> list[str]:
    return group_order(self.group)

  def select(self, group: str) -> "Results":
    """The rows of one group, trailing all-NaN repeat columns dropped."""
    rows = self.group == group
    k_pred = self.k_pred[rows]
    other = (0,) + tuple(range(2, k_pred.ndim))  # all axes but the repeats
    keep = ~np.all(np.isnan(k_pred), axis=other) if len(k_pred) else np.zeros(k_pred.shape[1], bool)
    magnitude = None if self.noise_magnitude is None else self.noise_magnitude[rows][:, keep]
    extras = {name: v[rows][:, keep] for name, v in self.extras.items()}
    return Results(self.instance_id[rows], self.group[rows], self.key[rows], k_pred[:, keep], magnitude, extras)


def _normalise(meta: dict | None) -> dict:
  return json.loads(json.dumps(meta or {}, sort_keys=True))


class ResultStore:
  """Append-only JSONL results with resume support; see the module docstring.

  Args:
    path: the store file (created with its metadata line if missing).
    meta: run metadata; must equal the stored one when the file exists.
  """

  def __init__(self, path: str, meta: dict | None = None):
    self.path = path
    self.meta = _normalise(meta)
    self._records: dict[tuple[str, int], dict] = {}
    if os.path.exists(path) and os.path.getsize(path) > 0:
      self._load()
    else:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      self._write_lines([{"meta": self.meta}])

  def _load(self) -> None:
    with open(self.path, "rb") as f:
      data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # a torn last line from an interrupted write: drop it
      with open(self.path, "r+b") as f:
        f.truncate(end)
        f.flush()
        os.fsync(f.fileno())
      data = data[:end]
    lines = data.decode().splitlines()
    if not lines:  # only a torn metadata line survived
      self._write_lines([{"meta": self.meta}])
      return
    try:
      head = json.loads(lines[0])
      stored = head["meta"]
    except (ValueError, KeyError, TypeError):
      raise ValueError(f"{self.path}: not a SolidMark results store (line 1 has no metadata)") from None
    if stored != self.meta:
      diff = sorted(k for k in set(stored) | set(self.meta) if stored.get(k) != self.meta.get(k))
      raise ValueError(
          f"{self.path}: the stored results were made with different settings ({', '.join(diff)}: "
          f"stored {[stored.get(k) for k in diff]}, now {[self.meta.get(k) for k in diff]}); "
          "use another output directory or delete the store to start over")
    for i, line in enumerate(lines[1:], start=2):
      try:
        rec = json.loads(line)
        self._records[(str(rec["group"]), int(rec["instance_id"]))] = rec
      except (ValueError, KeyError, TypeError):
        raise ValueError(f"{self.path}:{i}: damaged result line {line[:80]!r}") from None

  def _write_lines(self, objs: list[dict]) -> None:
    """Appends the lines in one write, then fsync; a failed write is cut off again and raised.

    Raises:
      OSError: the write or the fsync failed (e.g. ENOSPC, EIO), naming the store; the file is
        truncated back to its previous length where possible (else the torn tail is dropped when
        it is next opened), so it holds exactly the batches appended before.
    """
    payload = "".join(json.dumps(o) + "\n" for o in objs).encode()
    fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
      before = os.fstat(fd).st_size
      try:
        view = memoryview(payload)
        while view:  # os.write may write less than asked
          view = view[os.write(fd, view):]
        os.fsync(fd)
      except OSError as e:
        try:
          os.ftruncate(fd, before)
          kept = "it keeps the results stored before"
        except OSError:
          kept = "its torn last line is dropped when it is next opened"
        raise OSError(e.errno, f"{self.path}: writing {len(objs)} result line(s) failed ({e.strerror or e}); "
                      f"{kept} ({len(self._records)} images): free space or fix the disk and re-run to resume "
                      "from there") from e
    finally:
      os.close(fd)

  def __len__(self) -> int:
    return len(self._records)

  def done(self, group: str) -> set[int]:
    """Instance ids of `group` already stored."""
    return {i for g, i in self._records if g == group}

  def remaining(self, group: str, instance_ids: ArrayLike) -> np.ndarray:
    """The given instance ids not yet stored for `group`, in their given order."""
    ids = np.asarray(instance_ids, np.int64)
    done = self.done(group)
    return ids[[int(i) not in done for i in ids]] if len(ids) else ids

  def append(self, group: str, instance_ids: ArrayLike, keys: ArrayLike, k_pred: ArrayLike,
             noise_magnitude: ArrayLike | None = None, extras: dict[str, ArrayLike] | None = None) -> None:
    """Appends one finished batch (durably) and records it.

    Args:
      group: e.g. "members".
      instance_ids: [n] ints.
      keys: [n] true keys; [n, m] with m keys per image.
      k_pred: [n] or [n, r] predicted keys; [n, m] or [n, r, m] with m keys per image.
      noise_magnitude: [n] or [n, r] Wen et al.'s noise magnitude (with guidance), or None.
      extras: {name in `EXTRA_FIELDS`: [n] or [n, r]}, e.g. a region query's scores.
    """
    ids = np.asarray(instance_ids, np.int64).reshape(-1)
    keys = np.asarray(keys, np.float64)
    if keys.ndim == 2:
      recs = self._multi_records(group, ids, keys, np.asarray(k_pred, np.float64))
    else:
      keys = keys.reshape(-1)
      k_pred = np.asarray(k_pred, np.float64).reshape(len(ids), -1)
      if len(keys) != len(ids):
        raise ValueError(f"append: {len(ids)} instance ids but {len(keys)} keys")
      recs = [{"group": str(group), "instance_id": int(i), "key": float(k), "k_pred": [float(v) for v in kp]}
              for i, k, kp in zip(ids, keys, k_pred)]
    per_repeat = dict(extras or {})
    unknown = sorted(set(per_repeat) - set(EXTRA_FIELDS))
    if unknown:
      raise ValueError(f"append: unknown extra fields {unknown}; known: {list(EXTRA_FIELDS)}")
    if noise_magnitude is not None:
      per_repeat["noise_magnitude"] = noise_magnitude
    for name, values in per_repeat.items():
      values = np.asarray(values, np.float64).reshape(len(ids), -1)
      repeats = len(recs[0]["k_pred"]) if recs else values.shape[1]
      if values.shape[1] != repeats:
        raise ValueError(f"append: {name} {values.shape} needs one value per image and repeat "
                         f"({len(ids)}, {repeats})")
      for rec, row in zip(recs, values):
        rec[name] = [float(v) for v in row]
    self._record(recs)

  @staticmethod
  def _multi_records(group: str, ids: np.ndarray, keys: np.ndarray, k_pred: np.ndarray) -> list[dict]:
    """`append`'s records with m keys per image: keys [n, m], k_pred [n, m] or [n, r, m]."""
    n, m = keys.shape
    if n != len(ids):
      raise ValueError(f"append: {len(ids)} instance ids but {n} rows of keys")
    if k_pred.ndim not in (2, 3) or k_pred.shape[0] != n or k_pred.shape[-1] != m:
      raise ValueError(f"append: keys [n, m] = {keys.shape} need k_pred [n, m] or [n, r, m], got {k_pred.shape}")
    k_pred = k_pred.reshape(n, -1, m)
    return [{"group": str(group), "instance_id": int(i), "key": [float(v) for v in k],
             "k_pred": [[float(v) for v in row] for row in kp]} for i, k, kp in zip(ids, keys, k_pred)]

  def _record(self, recs: list[dict]) -> None:
    self._write_lines(recs)
    for rec in recs:
      self._records[(rec["group"], rec["instance_id"])] = rec

  def results(self) -> Results:
    """Everything stored, sorted by (group, instance id); a re-stored id keeps its last result."""
    return Results.from_records(self._records.values())


def read_results(path: str) -> tuple[dict, Results]:
  """(metadata, results) of a finished store, read only (no settings check, nothing written)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no results store here (evaluate first)")
  with open(path) as f:
    lines = f.read().splitlines()
  try:
    meta = json.loads(lines[0])["meta"]
    records = [json.loads(line) for line in lines[1:] if line.strip()]
  except (IndexError, ValueError, KeyError, TypeError):
    raise ValueError(f"{path}: not a SolidMark results store (line 1 must hold the metadata)") from None
  return meta, Results.from_records(records)
