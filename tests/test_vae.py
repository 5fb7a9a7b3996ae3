"""VAE adapter: config validation, shapes and scaling, fast layers, diffusers-format save/load
(Flax weights, PyTorch safetensors converted without torch, a .bin through torch if installed),
clear errors for missing folders and files. A tiny VAE (widths 8, 8) keeps it fast."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from solidmark_jax.models._diffusers import FlaxAutoencoderKL
from solidmark_jax.models.vae import (VAE, abstract_vae_params, build_vae, init_vae_params, load_vae, save_vae,
                                      vae_dir)

SIZE = 12


def tiny_cfg(**kw):
  c = dict(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=8, scaling_factor=None)
  c.update(kw)
  return ml_collections.ConfigDict(c)


@pytest.fixture(scope="module")
def tiny():
  vae = build_vae(tiny_cfg(scaling_factor=0.5), 1, SIZE)
  return vae, init_vae_params(vae, 0, SIZE)


def images(n=2, channels=1, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (n, SIZE, SIZE, channels)).astype(np.float32)


def test_validation_and_sizes():
  with pytest.raises(ValueError, match=r"vae.block_out_channels=\(8, 12\).*multiple of the 8 GroupNorm.*\[12\]"):
    build_vae(tiny_cfg(block_out_channels=(8, 12)), 1)
  with pytest.raises(ValueError, match="multiple of the 32 GroupNorm"):  # default groups: 32
    build_vae(ml_collections.ConfigDict(dict(block_out_channels=(16,), layers_per_block=1, latent_channels=4)), 1)
  with pytest.raises(ValueError, match="vae.latent_channels"):
    build_vae(tiny_cfg(latent_channels=0), 1)
  with pytest.raises(ValueError, match="vae.scaling_factor"):
    build_vae(tiny_cfg(scaling_factor=-1.0), 1)
  # Stable Diffusion 2.1's VAE: 3 down-samplings (factor 8), 83.7M parameters, shapes only.
  sd = build_vae(ml_collections.ConfigDict(dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                                latent_channels=4)), 3)
  assert sd.factor == 8 and sd.latent_size(288) == 36 and sd.latent_shape(256) == (32, 32, 4)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_vae_params(sd, 64)))
  assert n == 83_653_863
  with pytest.raises(ValueError, match=r"image size 290 .* not divisible by the VAE's factor 8.*288 and 296"):
    sd.latent_size(290)
  with pytest.raises(ValueError, match="not divisible"):
    build_vae(tiny_cfg(), 1, image_size=13)


def test_encode_decode_shapes_scaling_and_fast_layers(tiny):
  vae, params = tiny
  assert vae.factor == 2 and vae.latent_channels == 4 and vae.channels == 1
  x = images(2)
  enc = jax.jit(lambda p, x, r=None: vae.encode(p, x, r))
  z = np.asarray(enc(params, x))
  assert z.shape == (2, 6, 6, 4)
  mean, logvar = jax.jit(vae.posterior)(params, x)
  np.testing.assert_allclose(z, 0.5 * np.asarray(mean), rtol=1e-6)  # scaled by the factor
  z_s = np.asarray(enc(params, x, jax.random.key(0)))
  assert not np.allclose(z_s, z)  # a posterior sample
  np.testing.assert_allclose((z_s - z) / 0.5, np.exp(0.5 * np.asarray(logvar)) * np.asarray(
      jax.random.normal(jax.random.key(0), mean.shape)), rtol=1e-4, atol=1e-5)
  y = np.asarray(jax.jit(vae.decode)(params, z))
  assert y.shape == (2, SIZE, SIZE, 1)
  np.testing.assert_allclose(y, np.asarray(jax.jit(vae.decode_unscaled)(params, z / 0.5)), rtol=1e-6)
  slow = VAE(vae.module, vae.scaling_factor, fast=False)
  np.testing.assert_allclose(np.asarray(jax.jit(slow.encode)(params, x)), z, atol=2e-5)
  np.testing.assert_allclose(np.asarray(jax.jit(slow.decode)(params, z)), y, atol=2e-5)


def test_numpy_init_matches_flax_init_distribution(tiny):
  vae, params = tiny
  flat = flatten_dict(params)
  assert set(flat) == set(flatten_dict(abstract_vae_params(vae, SIZE)))
  k = np.asarray(flat[("decoder", "conv_in", "kernel")])  # [3, 3, 4, 8]
  assert abs(k.std() * np.sqrt(3 * 3 * 4) - 1.0) < 0.2 and np.abs(k).max() <= 2 / np.sqrt(36) / 0.8796 + 1e-6
  assert np.all(np.asarray(flat[("encoder", "conv_norm_out", "scale")]) == 1)
  again = init_vae_params(vae, 0, SIZE)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)))
  other = init_vae_params(vae, jax.random.key(1), SIZE)
  assert not np.array_equal(flatten_dict(other)[("decoder", "conv_in", "kernel")], k)


def test_save_load_round_trip(tiny, tmp_path):
  vae, params = tiny
  path = save_vae(vae, params, str(tmp_path / "sd" / "vae"))
  cfg = json.load(open(os.path.join(path, "config.json")))
  assert cfg["scaling_factor"] == 0.5 and cfg["latent_channels"] == 4 and cfg["norm_num_groups"] == 8
  module, loaded = FlaxAutoencoderKL.from_pretrained(path)  # diffusers' own loader
  assert module.config.scaling_factor == 0.5
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for where in (path, str(tmp_path / "sd")):  # the vae folder itself, or an SD root with vae/
    vae2, params2 = load_vae(where)
    assert vae2.scaling_factor == 0.5 and vae2.factor == 2
    assert jax.tree.structure(params2) == jax.tree.structure(params)
  assert load_vae(path, scaling_factor=0.25)[0].scaling_factor == 0.25


def test_missing_folder_and_files_are_clear_errors(tiny, tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nowhere: no such folder; expected a diffusers VAE folder"):
    load_vae(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="no config.json"):
    vae_dir(str(tmp_path))
  vae, _ = tiny
  folder = tmp_path / "noweights"
  vae.module.save_config(str(folder))
  with pytest.raises(FileNotFoundError, match=r"noweights: no weights; expected diffusion_flax_model.msgpack"):
    load_vae(str(folder))
  other = tmp_path / "other"
  other.mkdir()
  (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
  with pytest.raises(ValueError, match="is not a KL autoencoder"):
    load_vae(str(other))
  (other / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "use_quant_conv": False}))
  with pytest.raises(ValueError, match="use_quant_conv"):
    load_vae(str(other))


def to_pytorch_names(params) -> dict:
  """Our Flax params under diffusers' PyTorch AutoencoderKL names and layouts (written without torch)."""
  out = {}
  rename = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
  for path, w in flatten_dict(params).items():
    *mods, leaf = path
    mods = [rename.get(m, m) for m in mods]
    name = ".".join(m.rsplit("_", 1)[0] + "." + m.rsplit("_", 1)[1] if m.rsplit("_", 1)[-1].isdigit() else m
                    for m in mods)
    w = np.asarray(w)
    if leaf == "kernel":
      w = w.transpose(3, 2, 0, 1) if w.ndim == 4 else w.T  # conv HWIO -> OIHW, dense [in, out] -> [out, in]
      leaf = "weight"
    elif leaf == "scale":
      leaf = "weight"
    out[f"{name}.{leaf}"] = np.ascontiguousarray(w)
  return out


def test_pytorch_safetensors_load_equal_without_torch(tiny, tmp_path):
  from safetensors.numpy import save_file
  vae, params = tiny
  folder = tmp_path / "pt"
  folder.mkdir()
  cfg = {k: v for k, v in vae.module.config.items() if not k.startswith("_")}
  cfg.update(_class_name="AutoencoderKL", scaling_factor=0.18215, force_upcast=True)  # PyTorch-only key ignored
  (folder / "config.json").write_text(json.dumps(cfg))
  state = to_pytorch_names(params)
  assert "encoder.mid_block.attentions.0.to_out.0.weight" in state and "decoder.up_blocks.0.upsamplers.0.conv.weight" in state
  save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
  vae2, loaded = load_vae(str(folder))
  assert vae2.scaling_factor == 0.18215
  for (pa, a), (pb, b) in zip(sorted(flatten_dict(params).items()), sorted(flatten_dict(loaded).items())):
    assert pa == pb
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  broken = dict(state)
  broken["encoder.conv_in.weight"] = broken["encoder.conv_in.weight"][:4]
  save_file(broken, str(folder / "diffusion_pytorch_model.safetensors"))
  with pytest.raises(ValueError, match="encoder.conv_in.weight"):
    load_vae(str(folder))


def test_pytorch_names_are_diffusers_and_bin_loads(tiny, tmp_path):
  """Our PyTorch names are those of diffusers' PyTorch AutoencoderKL; a .bin loads through torch."""
  torch = pytest.importorskip("torch")
  from diffusers import AutoencoderKL
  vae, params = tiny
  cfg = {k: v for k, v in vae.module.config.items() if not k.startswith("_")}
  pt = AutoencoderKL(**{k: v for k, v in cfg.items() if k != "dtype"})
  state = to_pytorch_names(params)
  assert set(pt.state_dict()) == set(state)
  folder = tmp_path / "bin"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps({**cfg, "_class_name": "AutoencoderKL"}))
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, str(folder / "diffusion_pytorch_model.bin"))
  _, loaded = load_vae(str(folder))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
