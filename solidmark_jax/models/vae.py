"""A thin adapter over diffusers' `FlaxAutoencoderKL` for latent-space SolidMark models.

Our boundary is channels-last: images x [B, H, W, C] in model space [-1, 1], latents z [B, h, w, c]
with h = H / f, f = 2^(len(block_out_channels) - 1) (8 for Stable Diffusion's VAE). Latents are
*scaled*: z = scaling_factor * E(x) (Rombach et al. 2022, section 4.3.2), so the UNet sees roughly
unit variance; `decode` divides by it again.

A VAE comes from a local diffusers folder (`load_vae`: Flax weights, or PyTorch weights converted
on load by `models.weights`) or is built fresh from the config's `vae` section (`build_vae`) and
trained in stage 1 (`training.vae_stage`). `save_vae` writes the diffusers format, readable by
`FlaxAutoencoderKL.from_pretrained` and by `load_vae`.

By default the VAE runs with `fast_layers` (diffusers' GroupNorm computed by an equal, faster
function on the same parameters); `fast=False` gives the unmodified diffusers computation.
`dtype` (config `model.dtype`) is the compute dtype of its layers; parameters stay float32 and every
output (posterior, latents, images) is float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from numpy.typing import ArrayLike

from solidmark_jax.models import weights
from solidmark_jax.models._diffusers import FlaxAutoencoderKL
from solidmark_jax.models.fast_layers import fast_layers
from solidmark_jax.models.unet import DTYPES
from solidmark_jax.models.weights import pipeline_folder

VAE_FOLDER = "vae"  # the VAE's folder in a diffusers pipeline root (and in a workdir)
DEFAULT_GROUPS = 32  # diffusers' (and Stable Diffusion's) GroupNorm groups
_CLASS_NAMES = ("AutoencoderKL", "FlaxAutoencoderKL")


@dataclasses.dataclass(frozen=True)
class VAE:
  """A `FlaxAutoencoderKL` with our conventions (channels-last, scaled latents).

  Attributes:
    module: the diffusers Flax module (its config's `scaling_factor` is ignored: ours wins).
    scaling_factor: z = scaling_factor * E(x).
    fast: run GroupNorm through `fast_layers` (same parameters, same result to ~1e-6).
    dtype: compute dtype, "float32" or "bfloat16" (parameters and outputs stay float32).
  """

  module: FlaxAutoencoderKL
  scaling_factor: float = 1.0
  fast: bool = True
  dtype: str = "float32"

  @property
  def factor(self) -> int:
    """Pixels per latent pixel along each side, 2^(number of down-samplings)."""
    return 2 ** (len(self.module.block_out_channels) - 1)

  @property
  def latent_channels(self) -> int:
    return int(self.module.latent_channels)

  @property
  def channels(self) -> int:
    """Image channels."""
    return int(self.module.in_channels)

  def latent_size(self, image_size: int) -> int:
    """Latent side for an image side; a clear ValueError when the VAE factor does not divide it."""
    if image_size % self.factor:
      lo = image_size - image_size % self.factor
      raise ValueError(
          f"image size {image_size} (data.image_size + 2 * marks.pad for a border) is not divisible by the "
          f"VAE's factor {self.factor} = 2^{len(self.module.block_out_channels) - 1} (vae.block_out_channels="
          f"{tuple(self.module.block_out_channels)}); sizes that work include {lo} and {lo + self.factor}")
    return image_size // self.factor

  def latent_shape(self, image_size: int) -> tuple[int, int, int]:
    """(h, w, c) of the latents of a square image of side `image_size`."""
    h = self.latent_size(image_size)
    return (h, h, self.latent_channels)

  def with_scaling_factor(self, scaling_factor: float) -> "VAE":
    return dataclasses.replace(self, scaling_factor=float(scaling_factor))

  def with_dtype(self, dtype: str) -> "VAE":
    """The same VAE computing in `dtype` ("float32" or "bfloat16"; a clear error otherwise)."""
    if dtype not in DTYPES:
      raise ValueError(f"model.dtype must be one of {tuple(DTYPES)} (the compute dtype), got {dtype!r}")
    return dataclasses.replace(self, dtype=dtype)

  def _apply(self, params, *args, method):
    module = self.module if self.dtype == "float32" else self.module.clone(dtype=DTYPES[self.dtype])
    args = tuple(a.astype(DTYPES[self.dtype]) for a in args)
    with fast_layers() if self.fast else contextlib.nullcontext():
      return module.apply({"params": params}, *args, method=method)

  def posterior(self, params: Any, x: ArrayLike) -> Any:
    """Unscaled posterior of images x [B, H, W, C] -> (mean, logvar), each [B, h, w, c] float32."""
    dist = self._apply(params, jnp.transpose(x, (0, 3, 1, 2)), method=FlaxAutoencoderKL.encode).latent_dist
    return dist.mean.astype(jnp.float32), dist.logvar.astype(jnp.float32)

  def encode(self, params: Any, x: ArrayLike, rng: jax.Array | None = None) -> jax.Array:
    """Images x [B, H, W, C] in [-1, 1] -> scaled latents [B, h, w, c].

    The posterior mean when `rng` is None, else a sample of the posterior.
    """
    mean, logvar = self.posterior(params, x)
    z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return z * self.scaling_factor

  def decode_unscaled(self, params: Any, z: jax.Array) -> jax.Array:
    """Unscaled latents [B, h, w, c] -> images [B, H, W, C] (stage-1 training)."""
    out = self._apply(params, z, method=FlaxAutoencoderKL.decode).sample  # [B, C, H, W]
    return jnp.transpose(out, (0, 2, 3, 1)).astype(jnp.float32)

  def decode(self, params: Any, z: jax.Array) -> jax.Array:
    """Scaled latents [B, h, w, c] -> images [B, H, W, C] in model space (not clipped)."""
    return self.decode_unscaled(params, z / self.scaling_factor)


def _validate(vae_cfg, channels: int) -> tuple[tuple[int, ...], int]:
  blocks = tuple(int(c) for c in vae_cfg.block_out_channels)
  groups = int(vae_cfg.get("norm_num_groups", None) or DEFAULT_GROUPS)
  if not blocks or any(c < 1 for c in blocks):
    raise ValueError(f"vae.block_out_channels must be a non-empty tuple of positive widths, got {blocks}")
  bad = [c for c in blocks if c % groups]
  if bad:
    raise ValueError(f"vae.block_out_channels={blocks}: every width must be a multiple of the {groups} GroupNorm "
                     f"groups (vae.norm_num_groups, default {DEFAULT_GROUPS}); not: {bad}")
  if int(vae_cfg.layers_per_block) < 1:
    raise ValueError(f"vae.layers_per_block must be >= 1, got {vae_cfg.layers_per_block}")
  if int(vae_cfg.latent_channels) < 1:
    raise ValueError(f"vae.latent_channels must be >= 1, got {vae_cfg.latent_channels}")
  if channels < 1:
    raise ValueError(f"data.channels must be >= 1, got {channels}")
  scale = vae_cfg.get("scaling_factor", None)
  if scale is not None and not float(scale) > 0:
    raise ValueError(f"vae.scaling_factor must be > 0 (or None: measured in stage 1), got {scale}")
  return blocks, groups


def build_vae(vae_cfg: ml_collections.ConfigDict, channels: int, image_size: int | None = None) -> VAE:
  """A fresh VAE of the config's `vae` section (validated); scaling factor `vae.scaling_factor` or 1.

  Args:
    vae_cfg: the config's `vae` section (block_out_channels, layers_per_block, latent_channels, and
      optionally norm_num_groups, default 32).
    channels: image channels (1 or 3).
    image_size: the marked image side, if known: validated against the VAE factor and recorded as
      the diffusers config's `sample_size`.
  """
  blocks, groups = _validate(vae_cfg, channels)
  module = FlaxAutoencoderKL(
      in_channels=channels,
      out_channels=channels,
      down_block_types=("DownEncoderBlock2D",) * len(blocks),
      up_block_types=("UpDecoderBlock2D",) * len(blocks),
      block_out_channels=blocks,
      layers_per_block=int(vae_cfg.layers_per_block),
      latent_channels=int(vae_cfg.latent_channels),
      norm_num_groups=groups,
      sample_size=int(image_size or 32),
  )
  vae = VAE(module, float(vae_cfg.get("scaling_factor", None) or 1.0))
  if image_size is not None:
    vae.latent_size(image_size)
  return vae


def init_vae_params(vae: VAE, rng: jax.Array, image_size: int, channels: int | None = None) -> dict:
  """Fresh parameters as numpy arrays, drawn on the host from the parameter shapes.

  The distributions are flax's defaults that diffusers' layers use (kernels: truncated-normal
  LeCun, variance 1 / fan_in; biases 0; GroupNorm scales 1). Drawn with numpy because XLA:CPU took
  ~25 s to compile the jitted `module.init` of even a tiny VAE (its thousands of RNG ops).

  Args:
    vae: the VAE.
    rng: an int seed or a JAX PRNG key.
    image_size: any side the VAE accepts (parameter shapes do not depend on it).
    channels: image channels (default: the VAE's).
  """
  if isinstance(rng, (int, np.integer)):
    seed = [int(rng)]
  else:
    seed = np.asarray(jax.random.key_data(rng)).ravel().tolist()
  gen = np.random.default_rng([0x7AE, *seed])
  flat = flatten_dict(abstract_vae_params(vae, image_size, channels))
  out = {}
  for path in sorted(flat):
    shape = flat[path].shape
    if path[-1] == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      std = np.sqrt(1.0 / fan_in) / 0.87962566103423978  # flax's variance_scaling(1, fan_in, truncated)
      w = gen.standard_normal(shape)
      bad = np.abs(w) > 2
      while bad.any():  # truncated at 2 standard deviations
        w[bad] = gen.standard_normal(int(bad.sum()))
        bad = np.abs(w) > 2
      out[path] = (w * std).astype(np.float32)
    elif path[-1] == "scale":
      out[path] = np.ones(shape, np.float32)
    elif path[-1] == "bias":
      out[path] = np.zeros(shape, np.float32)
    else:
      raise ValueError(f"init_vae_params: unexpected parameter {'/'.join(path)} of {type(vae.module).__name__}")
  return unflatten_dict(out)


def abstract_vae_params(vae: VAE, image_size: int, channels: int | None = None) -> Any:
  """Parameter shapes (ShapeDtypeStructs) without allocating them."""
  x = jax.ShapeDtypeStruct((1, channels or vae.channels, image_size, image_size), jnp.float32)
  return jax.eval_shape(lambda r, x: vae.module.init({"params": r}, x)["params"], jax.random.key(0), x)


# ---------------------------------------------------------------------------------------------
# diffusers folders.


def vae_dir(path: str) -> str:
  """The VAE folder of a local diffusers directory: `path/vae` (a pipeline root) or `path` itself."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such folder; expected a diffusers VAE folder (config.json with "
                            f"weights) or a Stable Diffusion root with {VAE_FOLDER}/")
  folder = pipeline_folder(path, VAE_FOLDER)
  if folder is not None:
    return folder
  raise FileNotFoundError(f"{path}: no config.json there nor in {os.path.join(path, VAE_FOLDER)}; expected a "
                          "diffusers VAE folder or a Stable Diffusion root with vae/")


def _check_config(folder: str) -> dict:
  path = os.path.join(folder, "config.json")
  with open(path, encoding="utf-8") as f:
    cfg = json.load(f)
  name = cfg.get("_class_name")
  if name is not None and name not in _CLASS_NAMES:
    raise ValueError(f"{path}: _class_name {name!r} is not a KL autoencoder (expected one of {_CLASS_NAMES})")
  # Options of the PyTorch AutoencoderKL that diffusers' Flax port does not have.
  unsupported = {k: cfg[k] for k, ok in (("use_quant_conv", True), ("use_post_quant_conv", True),
                                        ("mid_block_add_attention", True)) if k in cfg and cfg[k] != ok}
  if cfg.get("shift_factor") not in (None, 0, 0.0):
    unsupported["shift_factor"] = cfg["shift_factor"]
  if cfg.get("latents_mean") is not None or cfg.get("latents_std") is not None:
    unsupported["latents_mean/std"] = "set"
  if unsupported:
    raise ValueError(f"{path}: {unsupported}: diffusers' FlaxAutoencoderKL has no such options; only "
                     "Stable Diffusion 1.x/2.x-style VAEs load")
  return cfg


def is_saved(path: str) -> bool:
  """Whether `path` holds a diffusers VAE (config.json and weights), or an SD root whose vae/ does."""
  try:
    folder = vae_dir(path)
  except FileNotFoundError:
    return False
  return any(os.path.isfile(os.path.join(folder, f)) for f in (weights.FLAX_WEIGHTS, weights.PT_SAFETENSORS,
                                                              weights.PT_BIN))


def vae_for_config(config: ml_collections.ConfigDict, channels: int, image_size: int | None = None) -> VAE:
  """The VAE a config describes, without weights: `vae.pretrained`'s architecture, or a fresh one.

  The scaling factor is `vae.scaling_factor` when set, else the pretrained config.json's, else 1
  (a fresh VAE's is measured at stage 1: load the trained VAE for the real one).
  """
  vcfg = config.vae
  if not vcfg.get("pretrained"):
    return build_vae(vcfg, channels, image_size)
  folder = vae_dir(vcfg.pretrained)
  cfg = _check_config(folder)
  module = FlaxAutoencoderKL.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
  if int(module.in_channels) != channels:
    raise ValueError(f"vae.pretrained={vcfg.pretrained}: the VAE takes {module.in_channels} channels, the data "
                     f"gives {channels} (data.channels)")
  scale = vcfg.get("scaling_factor") or module.config.scaling_factor
  vae = VAE(module, float(scale))
  if image_size is not None:
    vae.latent_size(image_size)
  return vae


def load_vae(path: str, scaling_factor: float | None = None) -> tuple[VAE, dict]:
  """A VAE and its parameters from a local diffusers directory.

  Args:
    path: a Stable Diffusion root (with vae/) or a VAE folder: config.json and Flax weights
      (diffusion_flax_model.msgpack) or PyTorch weights (diffusion_pytorch_model.safetensors, read
      with safetensors' numpy loader and converted without torch; a .bin needs torch to read).
    scaling_factor: overrides the one in config.json (e.g. the config's `vae.scaling_factor`).

  Returns:
    (VAE, params) with params as numpy arrays.

  Raises:
    FileNotFoundError: the folder, its config.json or its weights are missing (the message names
      the path and what was expected).
    ValueError: the config is not of a KL autoencoder this port supports, or weights do not fit it.
  """
  folder = vae_dir(path)
  cfg = _check_config(folder)
  module = FlaxAutoencoderKL.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
  params = weights.load_diffusers_params(FlaxAutoencoderKL, folder)
  scale = float(scaling_factor if scaling_factor is not None else module.config.scaling_factor)
  return VAE(module, scale), params


def save_vae(vae: VAE, params: Any, path: str) -> str:
  """Writes the VAE in diffusers format; returns path.

  config.json (class `AutoencoderKL`, our scaling factor), Flax weights and the same weights as
  PyTorch safetensors (`weights.save_diffusers_model`): readable by `FlaxAutoencoderKL.from_pretrained`,
  diffusers' PyTorch `AutoencoderKL.from_pretrained` and `load_vae`. Call it on one process only;
  params must be fully addressable (e.g. replicated) or numpy.
  """
  cfg = {k: v for k, v in vae.module.config.items() if not k.startswith("_")}
  module = FlaxAutoencoderKL.from_config({**cfg, "scaling_factor": float(vae.scaling_factor)})
  return weights.save_diffusers_model(module, params, path, "AutoencoderKL")
