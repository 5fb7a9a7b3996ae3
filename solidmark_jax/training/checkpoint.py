"""Orbax checkpoints with a metadata record that ties them to a config and a keymap.

Every checkpoint holds the train state and a JSON record: the step, the config fingerprint (the
sections that define the model and its data) and the keymap hash. A workdir that holds
checkpoints of another config, or of another keymap, is an error and is left untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import jax
import ml_collections
import orbax.checkpoint as ocp

from solidmark_jax.config import default_config

# Config sections that must not change between a checkpoint and a run that resumes or evaluates it.
FINGERPRINT_SECTIONS = ("model", "marks", "diffusion")
# model fields that say how the model is computed, not what it is: a checkpoint trained in float32
# evaluates in bfloat16 (and with another attention implementation) without a config mismatch
COMPUTE_FIELDS = ("dtype", "attention")
FINGERPRINT_DATA_FIELDS = ("name", "train_split", "image_size", "channels", "subset_size", "subset_mode",
                           "duplicates", "folder")


def fingerprint_fields(config: ml_collections.ConfigDict) -> dict:
  out = {s: config[s].to_dict() for s in FINGERPRINT_SECTIONS}
  out["model"] = {k: v for k, v in out["model"].items() if k not in COMPUTE_FIELDS}
  out["data"] = {k: config.data.get(k) for k in FINGERPRINT_DATA_FIELDS}
  out["seed"] = config.seed
  return json.loads(json.dumps(out, sort_keys=True, default=str))


def config_fingerprint(config: ml_collections.ConfigDict) -> str:
  return hashlib.sha256(json.dumps(fingerprint_fields(config), sort_keys=True).encode()).hexdigest()


def _diff(a: dict, b: dict, prefix: str = "", defaults: dict | None = None) -> list[str]:
  """Fields where checkpoint record `a` and config `b` differ.

  A field the checkpoint's record lacks (added to the project after it was written) counts as equal
  when the config holds that field's default (`defaults`, from `default_config`), which reproduces
  what the older code did.
  """
  keys = sorted(set(a) | set(b))
  out = []
  for k in keys:
    va, vb = a.get(k), b.get(k)
    d = (defaults or {}).get(k) if isinstance(defaults, dict) else None
    if isinstance(va, dict) and isinstance(vb, dict):
      out += _diff(va, vb, f"{prefix}{k}.", d if isinstance(d, dict) else None)
    elif k not in a and defaults is not None and k in defaults and vb == d:
      continue
    elif va != vb:
      out.append(f"{prefix}{k}: checkpoint {va!r} vs config {vb!r}")
  return out


def _default_fields() -> dict:
  return fingerprint_fields(default_config())


class CheckpointWriteError(RuntimeError):
  """Writing a checkpoint failed (e.g. ENOSPC, EIO); the checkpoints committed before it are intact."""


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` for (state, metadata) checkpoints.

  Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it to `<step>` once every
  part is written, so a failed write (full disk, I/O error) leaves the committed steps as they were
  and is never taken for a checkpoint: it surfaces from `save`, `wait` or `close` (saves run in
  the background) as a `CheckpointWriteError` naming the step and the latest complete one, which
  a re-run resumes from (Orbax replaces the leftover temporary folder when it saves that step
  again). Orbax writes a step's own metadata file apart from its items and still commits the step
  when only that file failed; such a folder is removed here (`_discard`), so a failed step is never
  on disk as committed.
  """

  def __init__(self, directory: str, *, save_every: int = 1000, keep: int = 3, create: bool = True):
    self.directory = os.path.abspath(directory)
    if not create and not os.path.isdir(self.directory):
      raise FileNotFoundError(f"no checkpoint directory at {self.directory}")
    policies = ocp.checkpoint_managers
    # Every `save_every` steps (and on preemption) only: Orbax's default policy also saves the first
    # step a manager sees in an empty directory (a stray step-1 checkpoint in every fresh run).
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=create, save_decision_policy=policies.AnySavePolicy(
            [policies.FixedIntervalPolicy(save_every), policies.PreemptionCheckpointingPolicy()]))
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._writing: int | None = None  # the step being written in the background, if any
    self._last_saved: int | None = None
    self._failed = False  # a write failure was reported

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def committed_steps(self) -> list[int]:
    """The steps whose folders are committed on disk (what a re-run can resume from)."""
    try:
      return sorted(int(d) for d in os.listdir(self.directory) if d.isdigit())
    except OSError:
      return []

  def _write_error(self, step: int | None, e: BaseException) -> CheckpointWriteError:
    steps = [s for s in self.committed_steps() if s != step]
    resume = (f"the complete checkpoints there ({', '.join(map(str, steps))}) are intact and a re-run resumes from "
              f"step {steps[-1]}" if steps else "no complete checkpoint is there yet: a re-run starts from step 0")
    return CheckpointWriteError(f"{self.directory}: writing checkpoint {step if step is not None else '(unknown)'} "
                                f"failed ({type(e).__name__}: {e}); {resume}. Free space or fix the disk first.")

  def save(self, step: int, state: dict, meta: dict, *, force: bool = False) -> bool:
    """Starts writing checkpoint `step` in the background (the previous write's failure raises here)."""
    self.wait()  # Orbax waits for the previous save anyway: this names the step that failed
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                              meta=ocp.args.JsonSave(meta)), force=force)
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(step, e) from e
    if saved:
      self._writing = self._last_saved = int(step)
    return saved

  def read_meta(self, step: int) -> dict:
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:
      raise RuntimeError(f"{self.directory}: cannot read the metadata of checkpoint {step}: {e}") from e
    return dict(out["meta"])

  def check_compatible(self, step: int, config: ml_collections.ConfigDict, keymap_hash: str | None) -> dict:
    """Raises ValueError, naming the fields, when checkpoint `step` is of another config or keymap."""
    meta = self.read_meta(step)
    theirs = meta.get("fingerprint_fields", {})
    if meta.get("config_fingerprint") != config_fingerprint(config):
      diffs = _diff(theirs, fingerprint_fields(config), defaults=_default_fields()) if theirs else [
          "(fingerprint differs)"]
      if not diffs:  # only fields added since, at their defaults
        return meta
      raise ValueError(
          f"{self.directory}: checkpoint {step} was written by a different config; differing fields:\n  "
          + "\n  ".join(diffs) + "\nUse another --workdir, or the config it was trained with.")
    if keymap_hash is not None and meta.get("keymap_hash") != keymap_hash:
      raise ValueError(
          f"{self.directory}: checkpoint {step} was trained with keymap {str(meta.get('keymap_hash'))[:16]}..., "
          f"the keymap here is {keymap_hash[:16]}...: refusing to mix keys")
    return meta

  def restore_state(self, step: int, abstract_state: dict) -> dict:
    """Restores the state onto the shardings of `abstract_state` (ShapeDtypeStructs with .sharding)."""
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:
      raise RuntimeError(
          f"{self.directory}: restoring checkpoint {step} failed ({type(e).__name__}: {e}); "
          "not starting from scratch over it. Move the workdir aside to train anew.") from e
    return out["state"]

  def restore_subtree(self, step: int, abstract_subtree: dict) -> dict:
    """Restores only the top-level entries of the state in `abstract_subtree` (e.g. {"ema_params": ...}),
    onto its shardings: an Orbax partial restore, the rest of the state is not read."""
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract_subtree)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=abstract_subtree, restore_args=restore_args, partial_restore=True)))
    except Exception as e:
      raise RuntimeError(f"{self.directory}: restoring {sorted(abstract_subtree)} of checkpoint {step} failed "
                         f"({type(e).__name__}: {e})") from e
    return dict(out["state"])

  def wait(self) -> None:
    """Waits for the background write; raises CheckpointWriteError if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._failed = True
      error = self._write_error(self._writing, e)
      if self._writing is not None:
        self._discard(self._writing)
      raise error from e
    finally:
      self._writing = None

  def _discard(self, step: int) -> None:
    """Removes the folder of `step`, whose write failed, if Orbax committed it regardless."""
    # After a failed step-metadata write the manager's wait returns before its item writer has finished
    # (and renamed the folder): wait for that writer first (a private attribute of the pinned Orbax).
    writer = getattr(self.manager, "_checkpointer", None)
    try:
      if writer is not None:
        writer.wait_until_finished()
    except Exception:  # pylint: disable=broad-except
      pass  # the failure is being reported already
    folder = os.path.join(self.directory, str(step))
    if jax.process_index() == 0 and os.path.isdir(folder):
      shutil.rmtree(folder, ignore_errors=True)
    self.manager.reload()

  def close(self) -> None:
    """Waits for the background write (CheckpointWriteError if it failed), then stops the manager."""
    try:
      self.wait()
    finally:
      try:
        self.manager.close()
      except Exception as e:  # pylint: disable=broad-except
        if not self._failed:  # Orbax may raise a failure already reported once more while closing
          self._failed = True
          raise self._write_error(self._last_saved, e) from e


def make_meta(config: ml_collections.ConfigDict, step: int, keymap_hash: str) -> dict:
  return {
      "format": "solidmark-checkpoint/1",
      "step": int(step),
      "config_fingerprint": config_fingerprint(config),
      "fingerprint_fields": fingerprint_fields(config),
      "keymap_hash": keymap_hash,
      "config": json.loads(config.to_json_best_effort()),
  }
