"""What a config defines, built once and shared by training and evaluation.

The training data (source, instances, keymap), the model and its noise schedule, and for latent or
text-conditioned models their frozen parts: the VAE (`model.space == "latent"`) and the text encoder
(`model.condition == "text"`). Everything is validated here, before any array is allocated.

Sizes: `image_size` is the side of the marked image in pixels; `model_size` x `model_size` x
`model_channels` is what the UNet sees (the same in pixel space, the VAE latent in latent space).
Conditions: int ids [M] (class / image / none) or token ids [M, L] of the captions (text).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from solidmark_jax import marks, models, parallel
from solidmark_jax.data import open_source
from solidmark_jax.data.instances import Instances, make_instances
from solidmark_jax.data.instances import class_labels, condition_ids, marked_batch
from solidmark_jax.diffusion import PREDICTION_TYPES, NoiseSchedule, check_prediction_type, make_schedule
from solidmark_jax.models.text import TextEncoder, build_text_encoder
from solidmark_jax.models.vae import VAE, vae_for_config
from solidmark_jax.outpaint import Outpainter, SamplerSpec, make_latent_outpaint_fn, make_outpaint_fn
from solidmark_jax.workdir import Workdir

SPACES = ("pixel", "latent")

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Experiment:
  """What a config defines, built once by `build_experiment` and never changed (`load_frozen` returns a
  new one with the loaded VAE)."""

  config: Any  # ml_collections.ConfigDict
  source: Any  # the training split's data source (`data.open_source`)
  instances: Instances
  keymap: marks.Keymap
  conditions: np.ndarray  # int64 [M] condition id per instance, or int32 [M, L] caption token ids (text)
  model: models.ConditionedUNet
  sched: NoiseSchedule
  image_size: int  # marked image side
  channels: int
  model_size: int  # side of what the UNet sees (the latent side for latent models)
  model_channels: int
  text: TextEncoder | None = None  # model.condition == "text"
  vae: VAE | None = None  # model.space == "latent"
  bad_input: dict = dataclasses.field(default_factory=dict)  # counts of skipped / truncated inputs
  captions: list[str] | None = None  # text models: each instance's caption
  prediction_type: str = "epsilon"  # what the UNet outputs: "epsilon" or "v_prediction"

  @property
  def is_latent(self) -> bool:
    return self.vae is not None

  @property
  def is_text(self) -> bool:
    return self.text is not None

  @property
  def null_id(self) -> int:
    return self.model.null_id

  @property
  def mask(self) -> np.ndarray:
    """[H, W, 1], 1 on the key region (with several keys per image, the union of their regions)."""
    c = self.config.marks
    return marks.key_mask(self.image_size, self.image_size, c.pad, c.pattern)

  @property
  def num_keys(self) -> int:
    """m, keys per image (`marks.num_keys`)."""
    return self.keymap.num_keys

  @property
  def key_masks(self) -> np.ndarray | None:
    """[m, H, W, 1|C], the region of each key (`marks.key_masks`); None with one key per image."""
    if self.num_keys == 1:
      return None
    c = self.config.marks
    return marks.key_masks(self.image_size, self.image_size, c.pad, c.pattern, self.num_keys, c.key_layout,
                           self.channels)

  def read_marked(self, instance_ids: np.ndarray) -> dict:
    """Process-local batch of training instances: marked images in model space and their labels."""
    rows = self.source.read(self.instances.record_index[instance_ids])
    keys = self.keymap.lookup(instance_ids)  # [n] or [n, m]
    c = self.config.marks
    return {
        "image": marked_batch(rows["image"], keys, c.pad, c.pattern, c.get("key_layout", "sides")),
        "condition": self.conditions[instance_ids].astype(np.int32),  # [n] or [n, L]
        "label": np.asarray(rows["label"], np.int32),
        "key": keys.astype(np.float32),
        "instance_id": instance_ids.astype(np.int64),
    }


def build_experiment(config: ml_collections.ConfigDict) -> Experiment:
  """Opens the training data, draws the keymap, validates and builds the model (and text encoder)."""
  if config.marks.pattern not in marks.PATTERNS:
    raise ValueError(f"marks.pattern must be one of {marks.PATTERNS}, got {config.marks.pattern!r}")
  if config.marks.pad < 1:
    raise ValueError(f"marks.pad must be >= 1, got {config.marks.pad}")
  space = config.model.get("space", "pixel")
  if space not in SPACES:
    raise ValueError(f"model.space must be one of {SPACES}, got {space!r}")
  cond = config.model.condition
  if cond not in models.CONDITIONS:
    raise ValueError(f"model.condition must be one of {models.CONDITIONS}, got {cond!r}")
  prediction_type = resolve_prediction_type(config)
  num_keys, key_layout = config.marks.get("num_keys", 1), config.marks.get("key_layout", "sides")
  marks.check_keys(num_keys, key_layout, config.marks.pattern)  # before any data is opened
  source = open_source(config.data, config.data.train_split)
  marks.check_keys(num_keys, key_layout, config.marks.pattern, source.channels)
  if config.marks.pattern == "centre" and config.marks.pad >= source.image_size:
    raise ValueError(f"marks.pad={config.marks.pad} must be smaller than the image ({source.image_size} px)")
  size = marks.marked_size(source.image_size, config.marks.pad, config.marks.pattern)
  vae = None
  model_size, model_channels = size, source.channels
  if space == "latent":
    vae = vae_for_config(config, source.channels).with_dtype(config.model.get("dtype", "float32"))
    model_size, model_channels = vae.latent_size(size), vae.latent_channels
  instances = make_instances(len(source), config.data, config.seed)
  bad_input = {"skipped_records": len(getattr(source, "skipped", ()) or ())}
  text = captions = None
  if cond == "text":
    text, conditions, captions, bad_input["truncated_captions"] = _text_conditions(config, source, instances)
    cross_dim = text.hidden_size
    if config.model.get("pretrained") is None and config.model.cross_attention_dim != cross_dim:
      raise ValueError(f"model.cross_attention_dim={config.model.cross_attention_dim} must equal the text "
                       f"encoder's hidden size {cross_dim} (text.hidden_size or the pretrained text_encoder)")
  model = models.build_for_config(config.model, model_size, model_channels,
                                  _num_conditions(cond, source, instances))
  if cond != "text":
    labels = None
    if cond == "class":
      labels = class_labels(source.labels()[instances.record_index], "data.train_split", config.data.train_split)
    conditions = condition_ids(instances, labels, cond, model.null_id)
  keymap = marks.Keymap.create(config.marks.key_seed, instances.instance_ids, config.marks.pattern, num_keys,
                               key_layout)
  sched = make_schedule(config.diffusion.schedule, config.diffusion.num_steps)
  return Experiment(config, source, instances, keymap, conditions, model, sched, size, source.channels,
                    model_size=model_size, model_channels=model_channels, text=text, vae=vae,
                    bad_input=bad_input, captions=captions, prediction_type=prediction_type)


def resolve_prediction_type(config: ml_collections.ConfigDict) -> str:
  """`diffusion.prediction_type`, or the pretrained pipeline's when unset; checks the pipeline's schedule.

  Returns "epsilon" or "v_prediction".
  """
  configured = config.diffusion.get("prediction_type")
  if configured is not None:
    check_prediction_type(configured)
  pretrained = check_pretrained_scheduler(config) if config.model.get("pretrained") else None
  if configured is None:
    return pretrained or "epsilon"
  return configured


def check_pretrained_scheduler(config: ml_collections.ConfigDict) -> str | None:
  """A pretrained pipeline's noise schedule must be the config's; returns its prediction type.

  Reads `<model.pretrained>/scheduler/scheduler_config.json` when the pretrained path is a pipeline
  root (Stable Diffusion's layout); a bare UNet folder has none and is taken as is (None). A
  `diffusion.prediction_type` set in the config must equal the pipeline's.
  """
  root = os.path.expanduser(config.model.pretrained)
  path = os.path.join(root, "scheduler", "scheduler_config.json")
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    sched = json.load(f)
  prediction = sched.get("prediction_type", "epsilon")
  if prediction not in PREDICTION_TYPES:  # diffusers' "sample" (x0 prediction) is not supported
    raise ValueError(f"{path}: prediction_type={prediction!r}; supported: {PREDICTION_TYPES}")
  configured = config.diffusion.get("prediction_type")
  if configured is not None and configured != prediction:
    raise ValueError(f"{path}: the pretrained UNet predicts prediction_type={prediction!r}, the config says "
                     f"diffusion.prediction_type={configured!r}: set it to {prediction!r} (or leave it unset)")
  beta = sched.get("beta_schedule")
  want = {"scaled_linear": "scaled_linear", "linear": "linear", "squaredcos_cap_v2": "cosine"}.get(beta)
  if want != config.diffusion.schedule or int(sched.get("num_train_timesteps", 1000)) != config.diffusion.num_steps:
    raise ValueError(f"{path}: the pretrained UNet was trained with beta_schedule={beta!r} over "
                     f"{sched.get('num_train_timesteps')} steps; set diffusion.schedule={want!r} and "
                     f"diffusion.num_steps={sched.get('num_train_timesteps')} (the config has "
                     f"{config.diffusion.schedule!r}, {config.diffusion.num_steps})")
  return prediction


def _num_conditions(cond: str, source, instances: Instances) -> int:
  if cond == "class":
    if source.num_classes <= 0:
      raise ValueError(f"model.condition='class' but data {source.name!r} has no labels; "
                       "use model.condition='none', 'image' or 'text'")
    return source.num_classes
  if cond == "image":
    return instances.num_images
  return 0


def source_captions(source: Any, what: str) -> list[str]:
  """Every record's caption, or a clear error for a source without captions."""
  captions = source.captions() if callable(getattr(source, "captions", None)) else getattr(source, "captions", None)
  if captions is None:
    raise ValueError(f"model.condition='text' needs captions, and {what} ({source.name}) has none: use an "
                     "image folder with captions.jsonl, caption shards (data.name='shards') or "
                     "data.name='captioned_fashion_mnist'")
  return list(captions)


def _text_conditions(config, source, instances: Instances):
  """The text encoder and the token ids [M, L] of every instance's caption."""
  captions = source_captions(source, f"data.train_split {config.data.train_split!r}")
  encoder = build_text_encoder(config.text, config.seed, captions=captions,
                                        dtype=config.model.get("dtype", "float32"))
  tokens = encoder.tokenize(captions)
  ids = np.asarray(tokens.ids, np.int32)  # [records, L]
  truncated = int(np.sum(tokens.truncated))
  if truncated:
    log.warning("%d of %d captions were longer than text.max_length=%d tokens and were truncated", truncated,
                len(captions), encoder.max_length)
  return encoder, ids[instances.record_index], [captions[i] for i in instances.record_index], truncated


def sync_keymap(exp: Experiment, workdir: str, *, write: bool) -> str:
  """Writes the keymap to `workdir` or checks the one there; returns its path.

  A keymap already in the workdir that differs from the config's is an error: the workdir belongs
  to another data/marks setup, and nothing there is overwritten.

  In a multi-process run only the writer (process 0) touches the file; the other processes never
  read it (on a shared file system they could race its creation; on separate disks it is not
  there) but learn process 0's verdict in a broadcast, so every process returns, or raises, together,
  and the file is in place on return. Every process must call this at the same point.
  """
  path = Workdir(workdir).keymap
  multi = jax.process_count() > 1
  error = None
  if write or not multi:
    try:
      _check_or_write_keymap(exp, path, write)
    except Exception as e:  # pylint: disable=broad-except - re-raised below, after the broadcast
      error = e
  if multi:
    failed = int(parallel.broadcast_from_main(np.int32(error is not None)))
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


# ---------------------------------------------------------------------------------------------
# What the denoiser is conditioned on, and the outpainter of the experiment's model.


def null_condition(exp: Experiment, frozen: dict) -> int | np.ndarray:
  """The unconditional input of classifier-free guidance: the null id, or the empty caption's embedding [L, D]."""
  return np.asarray(frozen["text_null"]) if exp.is_text else exp.null_id


def encode_conditions(exp: Experiment, frozen: dict, conditions: np.ndarray) -> np.ndarray:
  """Per-instance conditions -> what the denoiser takes: ids [n] pass through (int32), caption token
  ids [n, L] become text embeddings [n, L, D] (the frozen encoder, jitted once)."""
  conditions = np.asarray(conditions, np.int32)
  if not exp.is_text:
    return conditions
  return np.asarray(exp.text.encode_jit(frozen["text"], conditions))


def make_outpainter(exp: Experiment, spec: SamplerSpec, *, mesh: Mesh | None = None,
                    return_images: bool = False) -> Outpainter:
  """The pixel or latent RePaint outpainter for this experiment's model (see `outpaint`).

  Params of a call: the UNet's params (pixel) or {"unet": ..., "vae": ...} (latent). With m keys per
  image (`marks.num_keys`) it reads them off their regions (`exp.key_masks`): k_pred [N, r, m].
  The spec's `remask_every` / `remask_from` act on latent models only.
  """
  denoiser = models.as_denoiser(exp.model)  # eps_hat or v_hat: the outpainters convert v (exp.prediction_type)
  kwargs = dict(return_images=return_images, mesh=mesh, key_masks=exp.key_masks, prediction_type=exp.prediction_type)
  if exp.is_latent:
    return make_latent_outpaint_fn(denoiser, exp.sched, exp.vae, spec, **kwargs)
  return make_outpaint_fn(denoiser, exp.sched, spec, **kwargs)


def outpaint_params(exp: Experiment, unet_params: Any, frozen: dict) -> Any:
  return {"unet": unet_params, "vae": frozen["vae"]} if exp.is_latent else unet_params
