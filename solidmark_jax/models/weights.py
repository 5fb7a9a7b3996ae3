"""Loading diffusers Flax models' weights from a local diffusers-format folder, without torch.

A folder holds `config.json` and either Flax weights (`diffusion_flax_model.msgpack`) or PyTorch
weights (`diffusion_pytorch_model.safetensors`). PyTorch weights are read with safetensors' numpy
loader and converted with diffusers' own key renaming and reshaping rules
(`modeling_flax_pytorch_utils`), checked against the Flax model's parameter shapes (from
`jax.eval_shape`, nothing allocated twice). A `.bin` (pickle) file needs torch to read: it is used
only when torch is installed, otherwise the error says to convert it to safetensors.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

FLAX_WEIGHTS = "diffusion_flax_model.msgpack"
PT_SAFETENSORS = "diffusion_pytorch_model.safetensors"
PT_BIN = "diffusion_pytorch_model.bin"


def _read_pytorch(folder: str) -> dict[str, np.ndarray]:
  st = os.path.join(folder, PT_SAFETENSORS)
  if os.path.isfile(st):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return load_file(st)
  binary = os.path.join(folder, PT_BIN)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise FileNotFoundError(f"{binary}: PyTorch pickle weights need torch to read; convert them to "
                            f"{PT_SAFETENSORS} (or install torch)") from None
  state = torch.load(binary, map_location="cpu", weights_only=True)
  return {k: v.float().numpy() for k, v in state.items()}


def convert_pytorch_state(pt_state: dict[str, np.ndarray], model, where: str) -> dict:
  """PyTorch diffusers state dict (numpy arrays) -> the Flax model's params, shapes checked."""
  from diffusers.models.modeling_flax_pytorch_utils import (  # pylint: disable=g-import-not-at-top
      rename_key, rename_key_and_reshape_tensor)
  shapes = flatten_dict(jax.eval_shape(model.init_weights, jax.random.key(0)))
  out = {}
  for pt_key, tensor in pt_state.items():
    key, value = rename_key_and_reshape_tensor(tuple(rename_key(pt_key).split(".")), np.asarray(tensor), shapes)
    if key not in shapes:
      raise ValueError(f"{where}: weight {pt_key!r} has no place in the {type(model).__name__} of its config.json")
    if value.shape != shapes[key].shape:
      raise ValueError(f"{where}: weight {pt_key!r} has shape {value.shape}, the model expects {shapes[key].shape}")
    out[key] = np.asarray(value, np.float32)
  missing = sorted(".".join(k) for k in set(shapes) - set(out))
  if missing:
    raise ValueError(f"{where}: {len(missing)} parameters are missing, e.g. {missing[:3]}")
  return unflatten_dict(out)


def load_diffusers_params(cls, folder: str):
  """Params of diffusers Flax class `cls` stored in `folder` (Flax or PyTorch weights)."""
  if not os.path.isfile(os.path.join(folder, "config.json")):
    raise FileNotFoundError(f"{folder}: expected a diffusers model folder with config.json")
  if os.path.isfile(os.path.join(folder, FLAX_WEIGHTS)):
    _, params = cls.from_pretrained(folder)
    return jax.tree.map(np.asarray, params)
  if not any(os.path.isfile(os.path.join(folder, f)) for f in (PT_SAFETENSORS, PT_BIN)):
    raise FileNotFoundError(f"{folder}: no weights; expected {FLAX_WEIGHTS}, {PT_SAFETENSORS} or {PT_BIN}")
  model = cls.from_config(cls.load_config(folder))
  return convert_pytorch_state(_read_pytorch(folder), model, folder)
