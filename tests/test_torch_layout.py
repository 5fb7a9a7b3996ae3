"""The Flax <-> PyTorch state-dict rule: written one way and read the other it is the identity, it
agrees with diffusers' and transformers' own PyTorch -> Flax conversions on every weight of a UNet
with cross-attention, a VAE and a CLIP text model, reads old VAE attention names, and a state dict
that is incomplete, has extra weights or misshapen ones is an error naming the weight."""

import jax
import ml_collections
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from solidmark_jax.models import torch_layout
from solidmark_jax.models._diffusers import FlaxUNet2DConditionModel
from solidmark_jax.models.text import fresh_text_encoder
from solidmark_jax.models.vae import build_vae


def _random(shapes, seed=0):
  rs = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rs.standard_normal(s.shape).astype(np.float32), shapes)


def _unet():
  unet = FlaxUNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32),
                                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                  attention_head_dim=8, cross_attention_dim=32)
  return unet, _random(jax.eval_shape(unet.init_weights, jax.random.key(0)))


def _vae():
  cfg = ml_collections.ConfigDict(dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                                       norm_num_groups=8))
  module = build_vae(cfg, 1, 16).module
  return module, _random(jax.eval_shape(module.init_weights, jax.random.key(0)), 1)


def _assert_same(a, b):
  fa, fb = flatten_dict(dict(a)), flatten_dict(dict(b))
  assert set(fa) == set(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


@pytest.mark.parametrize("which", ["unet", "vae"])
def test_round_trip_and_diffusers_rules_agree(which):
  from diffusers.models.modeling_flax_pytorch_utils import rename_key, rename_key_and_reshape_tensor
  module, params = _unet() if which == "unet" else _vae()
  state = torch_layout.to_pytorch(params)
  assert len(state) == len(flatten_dict(params))
  _assert_same(torch_layout.from_pytorch(state, params, "mem"), params)
  # diffusers' own PyTorch -> Flax conversion reads our names and layouts to the same parameters
  shapes = flatten_dict(params)
  theirs = {}
  for name, value in state.items():
    key, v = rename_key_and_reshape_tensor(tuple(rename_key(name).split(".")), value, shapes)
    theirs[key] = v
  _assert_same(unflatten_dict(theirs), params)
  if which == "unet":
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.weight" in state
    assert "time_embedding.linear_1.weight" in state and "mid_block.resnets.1.conv1.weight" in state
    assert state["conv_in.weight"].shape == (32, 4, 3, 3)  # OIHW
  else:
    assert "encoder.mid_block.attentions.0.to_q.weight" in state and "decoder.up_blocks.0.upsamplers.0.conv.weight" in state
    # an old PyTorch VAE checkpoint names the attention projections like the Flax port
    old = {k.replace(".to_q.", ".query.").replace(".to_out.0.", ".proj_attn."): v for k, v in state.items()}
    _assert_same(torch_layout.from_pytorch(old, params, "old"), params)


def test_clip_text_round_trip_and_transformers_rules_agree():
  from transformers.modeling_flax_pytorch_utils import rename_key_and_reshape_tensor
  cfg = ml_collections.ConfigDict(dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_length=16))
  enc = fresh_text_encoder(cfg, 0, ["a coat", "a shoe"])
  params = _random(enc.params, 2)
  state = torch_layout.to_pytorch(params)
  assert state["text_model.encoder.layers.1.self_attn.q_proj.weight"].shape == (32, 32)
  _assert_same(torch_layout.from_pytorch(state, params, "mem"), params)
  shapes = flatten_dict(dict(enc.model.params_shape_tree))
  theirs = {}
  for name, value in state.items():
    key, v = rename_key_and_reshape_tensor(tuple(name.split(".")), value, shapes, enc.model.base_model_prefix)
    theirs[key] = v
  _assert_same(unflatten_dict(theirs), params)
  with_buffer = {**state, "text_model.embeddings.position_ids": np.arange(16)[None]}  # an old PyTorch buffer
  _assert_same(torch_layout.from_pytorch(with_buffer, params, "mem"), params)


def test_bad_state_dicts_name_the_weight():
  _, params = _vae()
  state = torch_layout.to_pytorch(params)
  extra = {**state, "encoder.not_a_layer.weight": np.zeros(3, np.float32)}
  with pytest.raises(ValueError, match=r"f.safetensors: weight encoder.not_a_layer.weight has no place in the VAE"):
    torch_layout.from_pytorch(extra, params, "f.safetensors", "VAE")
  bad = {**state, "encoder.conv_in.weight": state["encoder.conv_in.weight"][:4]}
  with pytest.raises(ValueError, match=r"weight encoder.conv_in.weight has shape \(4, 1, 3, 3\)"):
    torch_layout.from_pytorch(bad, params, "f", "VAE")
  missing = {k: v for k, v in state.items() if k != "quant_conv.bias"}
  with pytest.raises(ValueError, match=r"1 weight\(s\) of the VAE are missing, e.g. \['quant_conv.bias'\]"):
    torch_layout.from_pytorch(missing, params, "f", "VAE")
  twice = {**state, "encoder.mid_block.attentions.0.query.weight": state["encoder.mid_block.attentions.0.to_q.weight"]}
  with pytest.raises(ValueError, match="stored twice"):
    torch_layout.from_pytorch(twice, params, "f", "VAE")


def test_text_encoder_saved_with_safetensors_loads_from_them_alone(tmp_path):
  """save_pretrained writes model.safetensors beside the Flax weights; alone it loads identical params."""
  import json
  import os
  from solidmark_jax.models import text
  cfg = ml_collections.ConfigDict(dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_length=16))
  enc = fresh_text_encoder(cfg, 3, ["a coat", "a shoe"])
  enc.save_pretrained(str(tmp_path))
  te = tmp_path / "text_encoder"
  assert json.load(open(te / "config.json"))["architectures"] == ["CLIPTextModel"]
  os.remove(te / text.FLAX_WEIGHTS)
  _assert_same(text.load_text_encoder(str(tmp_path)).params, enc.params)
