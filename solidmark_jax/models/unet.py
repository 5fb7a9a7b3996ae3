"""A thin adapter over diffusers' `FlaxUNet2DConditionModel` for pixel-space SolidMark models.

The adapter owns the condition: a learned table of `num_conditions + 1` embeddings whose last row
is the null condition, fed to the UNet as a length-1 `encoder_hidden_states` sequence. Conditions:

- "class": the class label (paper's class-conditional DDPMs);
- "image": one id per distinct training image, a stand-in for a unique caption;
- "none": always the null id (unconditional models);
- "text": no table; the condition is the frozen text encoder's output [B, L, D] (models/text.py).

Any model also takes a float embedding as its condition, [B, D] (one token) or [B, L, D], used as
`encoder_hidden_states` as is: that is how text embeddings reach the UNet, and how inference-time
mitigations perturb a class embedding (look the ids up with `embed_conditions`, add noise, pass the
result).

Images are channels-last [B, H, W, C] in model space at our boundary; diffusers' UNet takes NCHW
(and works in NHWC inside, so the two transposes cancel).

By default the UNet runs with `fast_layers`: diffusers' GroupNorm and attention layers computed by
equal but faster functions on the same parameters (docs/performance.md); `fast=False` gives the
unmodified diffusers computation. `attention` (config `model.attention`) picks the attention
implementation, `remat` (config `train.remat`, set by the train step) recomputes each down / up block
in the backward pass with a `jax.checkpoint` policy.

Precision (config `model.dtype`): the compute dtype of the UNet's layers, float32 or bfloat16.
Parameters are always created (and trained, and averaged) in float32: diffusers' Flax layers take
`dtype` as their computation dtype and keep float32 parameters, which they cast on use. The output
eps_hat is float32 whatever the compute dtype, so samplers and losses stay in float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from solidmark_jax.models import weights
from solidmark_jax.models._diffusers import FlaxUNet2DConditionModel
from solidmark_jax.models.fast_layers import ATTENTION, REMAT, fast_layers
from solidmark_jax.models.weights import pipeline_folder

log = logging.getLogger(__name__)

CONDITIONS = ("class", "image", "text", "none")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # model.dtype: the compute dtype
GROUPNORM_GROUPS = 32  # diffusers' Flax UNet hard-codes 32 groups in every GroupNorm
DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D")  # the block types diffusers' Flax UNet has
UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")

Denoiser = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


class ConditionedUNet(nn.Module):
  """eps_hat = UNet(x_t, t, embed(condition))."""

  unet_kwargs: dict
  num_conditions: int
  cross_attention_dim: int
  fast: bool = True  # swap in `fast_layers` (same parameters, same result to ~1e-6)
  attention: str = "auto"  # fast_layers.ATTENTION
  dtype: str = "float32"  # compute dtype, a key of DTYPES; parameters stay float32
  remat: str = "none"  # fast_layers.REMAT: per down / up block recomputation in the backward pass

  @property
  def null_id(self) -> int:
    return self.num_conditions

  uses_table: bool = True  # False for text models: the condition is always an embedding

  def setup(self) -> None:
    if self.uses_table:
      self.embed = nn.Embed(self.num_conditions + 1, self.cross_attention_dim, name="condition_embedding")
    self.unet = FlaxUNet2DConditionModel(cross_attention_dim=self.cross_attention_dim, dtype=DTYPES[self.dtype],
                                         **self.unet_kwargs)

  def embed_conditions(self, condition: jax.Array) -> jax.Array:
    """Condition ids [B] -> their table rows [B, D]."""
    return self.embed(condition)

  def __call__(self, x_t, t, condition):
    """x_t [B, H, W, C], t [B] int, condition [B] int, [B, D] or [B, L, D] float -> eps_hat [B, H, W, C]."""
    if jnp.issubdtype(condition.dtype, jnp.integer):
      if not self.uses_table:
        raise ValueError("this model is text-conditioned: pass text embeddings [B, L, D], not ids")
      context = self.embed(condition)[:, None, :]  # [B, 1, D]
    elif condition.ndim == 2:
      context = condition[:, None, :]  # [B, 1, D]
    else:
      context = condition  # [B, L, D]
    dtype = DTYPES[self.dtype]
    sample = jnp.transpose(x_t, (0, 3, 1, 2)).astype(dtype)  # [B, C, H, W]
    context = context.astype(dtype)
    if self.fast:
      layers = fast_layers(self.attention, remat=self.remat)
    elif self.remat != "none" or self.attention not in ("auto", "diffusers"):
      layers = fast_layers(self.attention, group_norm=False, remat=self.remat)
    else:
      layers = contextlib.nullcontext()  # diffusers' own computation, untouched
    with layers:
      out = self.unet(sample, t, context, train=False).sample
    return jnp.transpose(out, (0, 2, 3, 1)).astype(jnp.float32)  # [B, H, W, C]


def num_downsamplings(model_cfg: ml_collections.ConfigDict) -> int:
  return len(model_cfg.block_out_channels) - 1


def validate(model_cfg: ml_collections.ConfigDict, image_size: int, channels: int) -> None:
  """Raises a clear ValueError for a config the UNet cannot take."""
  blocks = tuple(model_cfg.block_out_channels)
  if len(model_cfg.down_block_types) != len(blocks) or len(model_cfg.up_block_types) != len(blocks):
    raise ValueError(
        f"model.down_block_types ({len(model_cfg.down_block_types)}) and model.up_block_types "
        f"({len(model_cfg.up_block_types)}) must each have one entry per block_out_channels ({len(blocks)})")
  for field, known in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
    unknown = [b for b in getattr(model_cfg, field) if b not in known]
    if unknown:  # diffusers would silently build a plain (attention-free) block for any other name
      raise ValueError(f"model.{field}={tuple(getattr(model_cfg, field))}: unknown block types {unknown}; "
                       f"each must be one of {known}")
  bad = [c for c in blocks if c % GROUPNORM_GROUPS]
  if bad:
    raise ValueError(
        f"model.block_out_channels={blocks}: every width must be a multiple of {GROUPNORM_GROUPS} "
        f"(diffusers' Flax UNet uses {GROUPNORM_GROUPS} GroupNorm groups); not: {bad}")
  if model_cfg.condition not in CONDITIONS:
    raise ValueError(f"model.condition must be one of {CONDITIONS}, got {model_cfg.condition!r}")
  validate_compute(model_cfg)
  factor = 2 ** num_downsamplings(model_cfg)
  if image_size % factor:
    lo = image_size - image_size % factor
    what = ("latent side" if model_cfg.get("space", "pixel") == "latent" else "image size")
    raise ValueError(
        f"{what} {image_size} (from data.image_size + 2 * marks.pad for a border) is not divisible by "
        f"{factor} = 2^{num_downsamplings(model_cfg)} down-samplings of model.block_out_channels={blocks}; "
        f"sizes that work include {lo} and {lo + factor}: change data.image_size or marks.pad, "
        "or use fewer blocks")
  if model_cfg.get("space", "pixel") == "pixel" and channels not in (1, 3):
    raise ValueError(f"data.channels must be 1 or 3, got {channels}")


def validate_compute(model_cfg: ml_collections.ConfigDict) -> None:
  """model.dtype and model.attention: a clear ValueError naming the field for anything unknown."""
  dtype = model_cfg.get("dtype", "float32")
  if dtype not in DTYPES:
    raise ValueError(f"model.dtype must be one of {tuple(DTYPES)} (the compute dtype), got {dtype!r}")
  attention = model_cfg.get("attention", "auto")
  if attention not in ATTENTION:
    raise ValueError(f"model.attention must be one of {ATTENTION}, got {attention!r}")


def compute_fields(model_cfg: ml_collections.ConfigDict) -> dict:
  """ConditionedUNet's compute settings from the config's model section."""
  validate_compute(model_cfg)
  return {"dtype": model_cfg.get("dtype", "float32"), "attention": model_cfg.get("attention", "auto")}


def with_remat(model: "ConditionedUNet", remat: str) -> "ConditionedUNet":
  """The same model (same parameters) recomputing each down / up block in the backward pass.

  Raises:
    ValueError: `remat` is not "none" or one of `fast_layers.REMAT`'s policies (names the field).
  """
  if remat not in REMAT:
    raise ValueError(f"train.remat must be one of {REMAT}, got {remat!r}")
  if remat != "none" and jax.default_backend() == "cpu":
    log.warning("train.remat=%r on the CPU backend recomputes without saving memory: XLA:CPU schedules the "
                "recomputed blocks in the forward pass (docs/performance.md, \"Rematerialisation\")", remat)
  return model.clone(remat=remat)


def build(model_cfg: ml_collections.ConfigDict, image_size: int, channels: int, num_conditions: int) -> ConditionedUNet:
  """Validates the config and builds the model.

  Args:
    model_cfg: the config's `model` section.
    image_size: side of the (marked) square images the model sees.
    channels: image channels.
    num_conditions: class count ("class"), distinct images ("image"); ignored for "none".
  """
  validate(model_cfg, image_size, channels)
  if model_cfg.condition in ("none", "text"):
    num_conditions = 0
  kwargs = dict(
      sample_size=image_size,
      in_channels=channels,
      out_channels=channels,
      down_block_types=tuple(model_cfg.down_block_types),
      up_block_types=tuple(model_cfg.up_block_types),
      block_out_channels=tuple(model_cfg.block_out_channels),
      layers_per_block=int(model_cfg.layers_per_block),
      attention_head_dim=_head_dim(model_cfg.attention_head_dim),
      use_linear_projection=bool(model_cfg.get("use_linear_projection", False)),
  )
  return ConditionedUNet(kwargs, int(num_conditions), int(model_cfg.cross_attention_dim),
                         uses_table=model_cfg.condition != "text", **compute_fields(model_cfg))


def _head_dim(value):
  return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else int(value)


UNET_FOLDER = "unet"


def pretrained_unet_dir(path: str) -> str:
  """The UNet folder of a local diffusers directory: `path/unet` (a pipeline root) or `path` itself."""
  path = os.path.expanduser(path)
  folder = pipeline_folder(path, UNET_FOLDER)
  if folder is not None:
    return folder
  raise FileNotFoundError(f"model.pretrained={path}: expected a diffusers UNet there (config.json and weights "
                          f"in {os.path.join(path, UNET_FOLDER)} or in {path} itself)")


def pretrained_unet_kwargs(path: str) -> dict:
  """FlaxUNet2DConditionModel constructor arguments from a local diffusers UNet's config.json."""
  with open(os.path.join(pretrained_unet_dir(path), "config.json"), encoding="utf-8") as f:
    cfg = json.load(f)
  fields = {f.name for f in dataclasses.fields(FlaxUNet2DConditionModel)} - {"parent", "name", "dtype"}
  kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in fields}
  if kwargs.get("attention_head_dim") is None and cfg.get("num_attention_heads") is not None:
    kwargs["attention_head_dim"] = tuple(cfg["num_attention_heads"]) if isinstance(
        cfg["num_attention_heads"], list) else cfg["num_attention_heads"]
  return kwargs


def build_for_config(model_cfg: ml_collections.ConfigDict, image_size: int, channels: int,
                     num_conditions: int) -> ConditionedUNet:
  """`build`, or for `model.pretrained` the architecture of that local diffusers UNet (fine-tuning)."""
  if not model_cfg.get("pretrained"):
    return build(model_cfg, image_size, channels, num_conditions)
  if model_cfg.condition not in CONDITIONS:
    raise ValueError(f"model.condition must be one of {CONDITIONS}, got {model_cfg.condition!r}")
  kwargs = pretrained_unet_kwargs(model_cfg.pretrained)
  cross = kwargs.pop("cross_attention_dim")
  factor = 2 ** (len(kwargs["block_out_channels"]) - 1)
  where = f"model.pretrained={model_cfg.pretrained}"
  if kwargs.get("in_channels", 4) != channels:
    raise ValueError(f"{where}: the UNet takes {kwargs.get('in_channels')} channels, the data gives {channels}")
  if image_size % factor:
    lo = image_size - image_size % factor
    raise ValueError(f"{where}: its {len(kwargs['block_out_channels']) - 1} down-samplings need a side divisible "
                     f"by {factor}, got {image_size} (latent side for latent models); sizes that work include "
                     f"{lo} and {lo + factor}: change data.image_size or marks.pad")
  kwargs["sample_size"] = image_size
  if model_cfg.condition in ("none", "text"):
    num_conditions = 0
  return ConditionedUNet(kwargs, int(num_conditions), int(cross), uses_table=model_cfg.condition != "text",
                         **compute_fields(model_cfg))


def load_pretrained_unet_params(model_cfg: ml_collections.ConfigDict) -> Any:
  """The pretrained UNet's parameters (Flax weights, or PyTorch weights converted on load)."""
  folder = pretrained_unet_dir(model_cfg.pretrained)
  return weights.load_diffusers_params(FlaxUNet2DConditionModel, folder)


def init_params(model: ConditionedUNet, rng: jax.Array, image_size: int, channels: int) -> Any:
  x = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  if model.uses_table:
    c = jnp.zeros((1,), jnp.int32)
  else:
    c = jnp.zeros((1, 1, model.cross_attention_dim), jnp.float32)
  return model.init(rng, x, t, c)["params"]


def abstract_params(model: ConditionedUNet, image_size: int, channels: int) -> Any:
  """Parameter shapes without allocating them."""
  return jax.eval_shape(lambda r: init_params(model, r, image_size, channels), jax.random.key(0))


def as_denoiser(model: ConditionedUNet) -> Denoiser:
  """The model as a plain function (params, x_t, t, condition) -> eps_hat for the samplers."""

  def denoiser(params, x_t, t, condition):
    return model.apply({"params": params}, x_t, t, condition)

  return denoiser
