"""Export a trained SolidMark model in diffusers format.

  python export.py --config configs/tiny.py --workdir /tmp/sm_tiny [--out DIR] [--step N]

Writes to DIR (default <workdir>/export):

  unet/                   the UNet's EMA parameters
  condition_embedding.npz class / image models: the condition table `embedding` [K + 1, D] (last row:
                          the null condition, `null_id`); the UNet's encoder_hidden_states for
                          condition c are embedding[c][None] (a length-1 sequence)
  vae/                    latent models: the VAE (stage 1's, or vae.pretrained), scaling factor in
                          its config.json
  text_encoder/, tokenizer/  text models: the frozen text encoder and its tokenizer
  scheduler/              scheduler_config.json: diffusers' DDIMScheduler matching our noise
                          schedule (cosine -> "squaredcos_cap_v2", linear -> "linear" with our
                          T-scaled betas), the model's prediction_type ("epsilon" or
                          "v_prediction"), linspace timesteps as our sampler
  model_index.json        latent text models only: the Stable Diffusion pipeline layout
  keymap.json, export.json  the keymap the model was trained with and what was exported (checkpoint
                          step, keymap hash, config fingerprint, how conditions map to the UNet)

Every model folder holds its weights twice, for both stacks: Flax msgpack (diffusers < 0.40 and
transformers < 5, our own loaders) and PyTorch safetensors in PyTorch's names and layout
(`unet/diffusion_pytorch_model.safetensors`, `vae/diffusion_pytorch_model.safetensors`,
`text_encoder/model.safetensors`), converted with numpy alone (`models.torch_layout`), under
configs that name the PyTorch classes. diffusers >= 0.40 and transformers >= 5 load them with a plain
`from_pretrained`; their eps differs from ours by the layers the two ports compute differently
(docs/export.md gives the measured difference and the bound the check holds it to).
"""

from __future__ import annotations

import logging
import os
import shutil

import jax
import ml_collections
import numpy as np

from solidmark_jax import atomic, parallel
from solidmark_jax.diffusion import check_prediction_type
from solidmark_jax.experiment import build_experiment
from solidmark_jax.models import _diffusers
from solidmark_jax.models._diffusers import FlaxUNet2DConditionModel
from solidmark_jax.models.vae import save_vae
from solidmark_jax.models.weights import save_diffusers_model
from solidmark_jax.training import checkpoint as ckpt
from solidmark_jax.training.state import load_frozen, restore_ema
from solidmark_jax.workdir import KEYMAP_FILE, Workdir

log = logging.getLogger(__name__)

EXPORT_FILE = "export.json"
EMBEDDING_FILE = "condition_embedding.npz"
# Largest absolute differences allowed between the PyTorch-stack model loaded from an export and our
# model on the same inputs (float32, CPU). diffusers' Flax GEGLU (the UNet's transformer feed-forward)
# uses the tanh approximation of GELU, PyTorch's GEGLU the exact GELU: at most 4.7e-4 apart per
# activation; "unet_exact_gelu" compares PyTorch with ours computing the exact GELU, which leaves only
# float round-off. Measured figures: docs/export.md.
PYTORCH_BOUNDS = {
    "unet": 1e-3,  # eps (or v) of the UNet (measured on the tiny models: 1.34e-4 to 1.41e-4)
    "unet_exact_gelu": 2e-5,  # the same with ours on the exact GELU (measured 3.5e-6 to 6.7e-6)
    "text": 1e-5,  # the text encoder's last_hidden_state (measured 4.8e-7)
    "vae_encode": 2e-5,  # the posterior mean (measured 2.0e-6 to 2.1e-6)
    "vae_decode": 2e-5,  # the decoded image (measured 2.1e-6 to 2.2e-6)
}


def scheduler_config(diffusion_cfg: ml_collections.ConfigDict, *, clip_sample: bool,
                     prediction_type: str = "epsilon") -> dict:
  """diffusers DDIMScheduler config of our schedule (`diffusion.schedule_lib.make_schedule`)."""
  kind, steps = diffusion_cfg.schedule, int(diffusion_cfg.num_steps)
  if kind == "cosine":
    betas = {"beta_schedule": "squaredcos_cap_v2", "beta_start": 0.0001, "beta_end": 0.02}  # unused by it
  elif kind == "linear":
    scale = 1000 / steps  # make_schedule scales Ho et al.'s betas to T steps
    betas = {"beta_schedule": "linear", "beta_start": scale * 1e-4, "beta_end": scale * 0.02}
  elif kind == "scaled_linear":
    betas = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
  else:
    raise ValueError(f"export: diffusion.schedule={kind!r} has no diffusers scheduler equivalent here")
  return {
      "_class_name": "DDIMScheduler",
      "_diffusers_version": _diffusers.diffusers.__version__,
      "num_train_timesteps": steps,
      **betas,
      "trained_betas": None,
      "clip_sample": clip_sample,  # our pixel samplers clip x0 to [-1, 1]; latents are not clipped
      "clip_sample_range": 1.0,
      "set_alpha_to_one": True,  # our last step goes to abar = 1 (the clean image)
      "steps_offset": 0,
      "prediction_type": check_prediction_type(prediction_type),
      "timestep_spacing": "linspace",  # round(linspace(0, T - 1, S)), as diffusion.sampling_timesteps
      "rescale_betas_zero_snr": False,
  }


def _host(tree):
  leaves = jax.tree.leaves(tree)
  if any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in leaves):
    raise ValueError("export: run it as a single process (the parameters are spread over several hosts)")
  return parallel.to_host(tree)


def export_diffusers(config: ml_collections.ConfigDict, workdir: str, out_dir: str | None = None,
                     step: int | None = None) -> str:
  """Exports checkpoint `step` (default: the latest) of `workdir` to `out_dir`; returns out_dir.

  Args:
    config: the config the workdir was trained with (checked against the checkpoint and keymap).
    workdir: the training run's directory.
    out_dir: where to write (default <workdir>/export); existing exported files are overwritten.
    step: checkpoint step (default: the latest).
  """
  workdir = os.path.abspath(workdir)
  out_dir = os.path.abspath(out_dir or os.path.join(workdir, "export"))
  exp = build_experiment(config)
  mesh = parallel.mesh_for_config(config.mesh)
  ema, step, meta = restore_ema(exp, workdir, mesh, step)
  ema = _host(ema)
  os.makedirs(out_dir, exist_ok=True)

  model = exp.model
  unet = FlaxUNet2DConditionModel(cross_attention_dim=model.cross_attention_dim, **model.unet_kwargs)
  save_diffusers_model(unet, ema["unet"], os.path.join(out_dir, "unet"), "UNet2DConditionModel")
  condition = config.model.condition
  info = {
      "format": "solidmark-export/1",
      "checkpoint_step": int(step),
      "keymap_hash": exp.keymap.hash,
      "config_fingerprint": ckpt.config_fingerprint(config),
      "space": "latent" if exp.is_latent else "pixel",
      "condition": condition,
      "image_size": exp.image_size,
      "channels": exp.channels,
      "unet_sample_size": exp.model_size,
      "marks": config.marks.to_dict(),
      "diffusion": config.diffusion.to_dict(),
      "prediction_type": exp.prediction_type,
  }
  table = ema.get("condition_embedding", {}).get("embedding")
  if table is not None:
    np.savez(os.path.join(out_dir, EMBEDDING_FILE), embedding=table, null_id=np.int64(exp.null_id))
    info["conditioning"] = (f"encoder_hidden_states = embedding[c][None] from {EMBEDDING_FILE} (a length-1 "
                            f"sequence); c = class label / image id, null (unconditional) id {exp.null_id}")
  elif exp.is_text:
    info["conditioning"] = "encoder_hidden_states = text_encoder(tokenizer(caption)).last_hidden_state"

  if exp.is_latent or exp.is_text:
    exp, frozen = load_frozen(exp, workdir, train=False, mesh=mesh)
    if exp.is_latent:
      save_vae(exp.vae, _host(frozen["vae"]), os.path.join(out_dir, "vae"))
      info["vae_scaling_factor"] = exp.vae.scaling_factor
    if exp.is_text:
      exp.text.save_pretrained(out_dir)

  sched = scheduler_config(config.diffusion, clip_sample=not exp.is_latent, prediction_type=exp.prediction_type)
  os.makedirs(os.path.join(out_dir, "scheduler"), exist_ok=True)
  atomic.write_json(os.path.join(out_dir, "scheduler", "scheduler_config.json"), sched, indent=2, sort_keys=True,
                    trailing_newline=False)
  if exp.is_latent and exp.is_text:
    _write_model_index(out_dir)
  shutil.copyfile(Workdir(workdir).keymap, os.path.join(out_dir, KEYMAP_FILE))
  info["checkpoint_meta_keymap_hash"] = meta.get("keymap_hash")
  atomic.write_json(os.path.join(out_dir, EXPORT_FILE), info, indent=2, sort_keys=True, default=str,
                    trailing_newline=False)
  log.info("exported checkpoint %d of %s to %s", step, workdir, out_dir)
  return out_dir


def _write_model_index(out_dir: str) -> None:
  """The Stable Diffusion pipeline layout (no safety checker) over the exported folders."""
  index = {
      "_class_name": "StableDiffusionPipeline",
      "_diffusers_version": _diffusers.diffusers.__version__,
      "feature_extractor": [None, None],
      "requires_safety_checker": False,
      "safety_checker": [None, None],
      "scheduler": ["diffusers", "DDIMScheduler"],
      "text_encoder": ["transformers", "CLIPTextModel"],
      "tokenizer": ["transformers", "CLIPTokenizer"],
      "unet": ["diffusers", "UNet2DConditionModel"],
      "vae": ["diffusers", "AutoencoderKL"],
  }
  atomic.write_json(os.path.join(out_dir, "model_index.json"), index, indent=2, trailing_newline=False)
