"""Loading diffusers Flax models' weights from a local diffusers-format folder, without torch.

A folder holds `config.json` and either Flax weights (`diffusion_flax_model.msgpack`) or PyTorch
weights (`diffusion_pytorch_model.safetensors`), or both (what `save_diffusers_model` writes).
PyTorch weights are read with safetensors' numpy loader and converted by `models.torch_layout`
(the same naming rule the export writes them with), checked complete against the Flax model's
parameter shapes (from `jax.eval_shape`, nothing allocated twice). A `.bin` (pickle) file needs
torch to read: it is used only when torch is installed, otherwise the error says to convert it to
safetensors.

A component's folder is found in one way for the UNet, the VAE and the text encoder
(`pipeline_folder`): a Stable Diffusion pipeline root holds it as a subfolder (unet/, vae/,
text_encoder/, tokenizer/), otherwise the path is the component's own folder.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from solidmark_jax import atomic, parallel
from solidmark_jax.models import torch_layout

FLAX_WEIGHTS = "diffusion_flax_model.msgpack"
PT_SAFETENSORS = "diffusion_pytorch_model.safetensors"
PT_BIN = "diffusion_pytorch_model.bin"
FLAX_ONLY_CONFIG = ("dtype", "split_head_dim", "use_memory_efficient_attention")


def pipeline_folder(path: str, component: str, required: tuple[str, ...] = ("config.json",)) -> str | None:
  """The folder of a pipeline component: `path/<component>` (a Stable Diffusion root) or `path` itself.

  Args:
    path: a local diffusers directory (a pipeline root, or the component's own folder).
    component: the component's subfolder in a pipeline root, e.g. "unet", "vae", "text_encoder".
    required: files the folder must hold to count (() : any existing folder).

  Returns:
    The first of `path/<component>`, `path` that is a folder holding every `required` file; None
    when neither is (the caller names what it expected).
  """
  for candidate in (os.path.join(path, component), path):
    if os.path.isdir(candidate) and all(os.path.isfile(os.path.join(candidate, f)) for f in required):
      return candidate
  return None


def _read_pytorch(folder: str) -> dict[str, np.ndarray]:
  st = os.path.join(folder, PT_SAFETENSORS)
  if os.path.isfile(st):
    from safetensors.numpy import load_file  # lazy: safetensors is optional  # pylint: disable=g-import-not-at-top
    return load_file(st)
  binary = os.path.join(folder, PT_BIN)
  try:
    import torch  # lazy: PyTorch is heavy, only for .bin weights  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise FileNotFoundError(f"{binary}: PyTorch pickle weights need torch to read; convert them to "
                            f"{PT_SAFETENSORS} (or install torch)") from None
  state = torch.load(binary, map_location="cpu", weights_only=True)
  return {k: v.float().numpy() for k, v in state.items()}


def convert_pytorch_state(pt_state: dict[str, np.ndarray], model: Any, where: str) -> dict:
  """PyTorch diffusers state dict (numpy arrays) -> the Flax model's params, complete and shapes checked."""
  shapes = jax.eval_shape(model.init_weights, jax.random.key(0))
  return torch_layout.from_pytorch(pt_state, shapes, where, type(model).__name__)


def save_diffusers_model(module: Any, params: Any, folder: str, pytorch_class: str) -> str:
  """Writes a diffusers model folder that both stacks load; returns `folder`.

  `config.json` names the PyTorch class (`pytorch_class`, e.g. "UNet2DConditionModel"; diffusers'
  Flax classes read that config as well), `diffusion_flax_model.msgpack` holds the Flax weights
  (diffusers < 0.40) and `diffusion_pytorch_model.safetensors` the same weights in PyTorch's names
  and layout (what diffusers >= 0.40 reads), converted with numpy alone.

  Args:
    module: the diffusers Flax module (its config is written).
    params: its parameters (numpy or fully addressable arrays).
    folder: the folder to write.
    pytorch_class: the diffusers PyTorch class the folder is meant for.
  """
  from safetensors.numpy import save_file  # lazy: safetensors is optional  # pylint: disable=g-import-not-at-top
  host = parallel.to_host(params)
  module.save_pretrained(folder, host)
  path = os.path.join(folder, "config.json")
  with open(path, encoding="utf-8") as f:
    cfg = json.load(f)
  cfg["_class_name"] = pytorch_class
  for key in FLAX_ONLY_CONFIG:  # the PyTorch class warns about them; the Flax one defaults them alike
    if key in cfg and cfg[key] in (False, None, "float32"):
      del cfg[key]
  atomic.write_json(path, cfg, indent=2, sort_keys=True, trailing_newline=False)
  save_file(torch_layout.to_pytorch(host), os.path.join(folder, PT_SAFETENSORS), metadata={"format": "pt"})
  return folder


def load_diffusers_params(cls, folder: str) -> Any:
  """Params of diffusers Flax class `cls` stored in `folder` (Flax or PyTorch weights)."""
  if not os.path.isfile(os.path.join(folder, "config.json")):
    raise FileNotFoundError(f"{folder}: expected a diffusers model folder with config.json")
  if os.path.isfile(os.path.join(folder, FLAX_WEIGHTS)):  # Flax first: nothing converted
    _, params = cls.from_pretrained(folder)
    return jax.tree.map(np.asarray, params)
  if not any(os.path.isfile(os.path.join(folder, f)) for f in (PT_SAFETENSORS, PT_BIN)):
    raise FileNotFoundError(f"{folder}: no weights; expected {FLAX_WEIGHTS}, {PT_SAFETENSORS} or {PT_BIN}")
  model = cls.from_config(cls.load_config(folder))
  return convert_pytorch_state(_read_pytorch(folder), model, folder)
