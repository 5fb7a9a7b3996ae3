"""Flax parameters <-> PyTorch state dicts, one naming and layout rule used in both directions.

diffusers' PyTorch `UNet2DConditionModel` and `AutoencoderKL` and transformers' `CLIPTextModel`
name their weights like the Flax ports, with three differences, all handled by `pytorch_name`:

- list members: Flax `down_blocks_0` is PyTorch `down_blocks.0` (`LIST_MODULES`; the time
  embedding's `linear_1` is a plain name in both);
- attention projections of the VAE: Flax `query`/`key`/`value`/`proj_attn` are PyTorch
  `to_q`/`to_k`/`to_v`/`to_out.0` (the UNet's Flax attention already uses the PyTorch names;
  older VAE checkpoints with the Flax names are read as aliases);
- leaves: `kernel` -> `weight` (convolutions HWIO -> OIHW, dense layers transposed),
  `scale` -> `weight` (norms), `embedding` -> `weight`, `bias` as is.

`to_pytorch` writes every Flax parameter under its PyTorch name; `from_pytorch` inverts the same
table built from the Flax model's parameter shapes, so a state dict is complete or an error names
what is missing, unexpected or misshapen. Only numpy is used: no torch.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

# PyTorch nn.ModuleList / nn.Sequential members that the Flax ports name `<name>_<i>`.
LIST_MODULES = frozenset({"down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
                          "transformer_blocks", "net", "to_out"})
# The VAE's Flax attention block names its projections like diffusers' old PyTorch attention.
_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# PyTorch buffers that are no parameters in Flax (older CLIP checkpoints store them).
IGNORED_BUFFERS = ("text_model.embeddings.position_ids",)
_LIST_MEMBER = re.compile(r"^(.+)_(\d+)$")


def _module_name(part: str, *, aliases: bool) -> str:
  m = _LIST_MEMBER.match(part)
  if m and m.group(1) in LIST_MODULES:
    return f"{m.group(1)}.{m.group(2)}"
  if part in _ATTENTION and not aliases:
    return _ATTENTION[part]
  return part


def pytorch_name(flax_key: tuple[str, ...], *, aliases: bool = False) -> str:
  """The PyTorch state-dict name of Flax parameter `flax_key` (a path tuple).

  With `aliases`, the VAE's attention projections keep their Flax names (old PyTorch checkpoints).
  """
  *modules, leaf = flax_key
  leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
  return ".".join([_module_name(p, aliases=aliases) for p in modules] + [leaf])


def to_pytorch_layout(flax_key: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  """A Flax array in PyTorch's layout: conv kernels HWIO -> OIHW, dense kernels transposed."""
  value = np.asarray(value)
  if flax_key[-1] != "kernel":
    return value
  if value.ndim == 4:
    return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
  if value.ndim == 2:
    return np.ascontiguousarray(value.T)
  raise ValueError(f"{'/'.join(flax_key)}: a kernel of {value.ndim} dimensions has no PyTorch layout here")


def to_flax_layout(flax_key: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  """The inverse of `to_pytorch_layout`."""
  value = np.asarray(value)
  if flax_key[-1] != "kernel":
    return value
  if value.ndim == 4:
    return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
  if value.ndim == 2:
    return np.ascontiguousarray(value.T)
  raise ValueError(f"{'/'.join(flax_key)}: a weight of {value.ndim} dimensions cannot be a Flax kernel")


def to_pytorch(params: Any) -> dict[str, np.ndarray]:
  """Flax params (a nested dict) -> a PyTorch-layout state dict of numpy arrays (float32 kept)."""
  out = {}
  for key, value in flatten_dict(dict(params)).items():
    name = pytorch_name(key)
    if name in out:  # the rule must stay one-to-one
      raise ValueError(f"two Flax parameters map to the PyTorch name {name!r}")
    out[name] = to_pytorch_layout(key, np.asarray(value))
  return out


def from_pytorch(state: Mapping[str, np.ndarray], shapes: Any, where: str, what: str = "model") -> dict:
  """A PyTorch-layout state dict -> Flax params with the structure of `shapes`, checked complete.

  Args:
    state: PyTorch name -> numpy array (e.g. `safetensors.numpy.load_file`).
    shapes: the Flax model's parameters or their shapes (`jax.eval_shape`), a nested dict.
    where: the file the state dict came from, for error messages.
    what: the model, for error messages ("text model", ...).

  Returns:
    Nested dict of float32 numpy arrays (integer arrays keep their dtype).

  Raises:
    ValueError: a weight with no place in the model, a wrong shape, or missing weights.
  """
  flat_shapes = flatten_dict(dict(shapes))
  table = {}
  for key in flat_shapes:
    table[pytorch_name(key)] = key
    table.setdefault(pytorch_name(key, aliases=True), key)
  out = {}
  for name, tensor in state.items():
    if name in IGNORED_BUFFERS:
      continue
    key = table.get(name)
    if key is None:
      raise ValueError(f"{where}: weight {name} has no place in the {what} of its config.json")
    if key in out:
      raise ValueError(f"{where}: weight {name} is stored twice (under its current and its old name)")
    value = to_flax_layout(key, np.asarray(tensor))
    want = tuple(flat_shapes[key].shape)
    if tuple(value.shape) != want:
      raise ValueError(f"{where}: weight {name} has shape {tuple(np.shape(tensor))}, the {what}'s config "
                       f"expects {want} in Flax layout (PyTorch {to_pytorch_layout(key, np.zeros(want)).shape})")
    out[key] = value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value
  missing = sorted(pytorch_name(k) for k in set(flat_shapes) - set(out))
  if missing:
    raise ValueError(f"{where}: {len(missing)} weight(s) of the {what} are missing, e.g. {missing[:3]}")
  return unflatten_dict(out)
