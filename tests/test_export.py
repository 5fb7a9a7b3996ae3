"""Export to diffusers format: a checkpoint written like training writes it (tiny params, no train
step to compile) exports a UNet that diffusers' own `from_pretrained` loads with identical params
and the same eps, PyTorch safetensors beside the Flax weights that our import reads back to identical
params (UNet, VAE), the condition table beside it, the VAE of a latent model, a scheduler config with
our schedule, the keymap; a workdir without checkpoints is a clear error."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from configs import tiny
from solidmark_jax import models
from solidmark_jax.diffusion import make_schedule
from solidmark_jax.experiment import build_experiment, sync_keymap
from solidmark_jax.export import EMBEDDING_FILE, EXPORT_FILE, export_diffusers, scheduler_config
from solidmark_jax.models import weights
from solidmark_jax.models._diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel
from solidmark_jax.models.vae import build_vae, init_vae_params, load_vae, save_vae
from solidmark_jax.training import checkpoint as ckpt
from solidmark_jax.training.state import init_state, make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_like(tree, seed, scale=0.05):
  rs = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (rs.standard_normal(a.shape) * scale).astype(np.float32), tree)


def write_checkpoint(config, workdir, step=3):
  """What training leaves in a workdir: keymap.json and an Orbax checkpoint (params != EMA params)."""
  exp = build_experiment(config)
  abstract = models.abstract_params(exp.model, exp.model_size, exp.model_channels)
  state = init_state(random_like(abstract, 0), make_optimizer(config.train))
  state["ema_params"] = random_like(abstract, 1)
  state["step"] = jnp.asarray(step, jnp.int32)
  sync_keymap(exp, workdir, write=True)
  checkpointer = ckpt.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1)
  checkpointer.save(step, state, ckpt.make_meta(config, step, exp.keymap.hash), force=True)
  checkpointer.close()
  return exp, jax.device_get(state["ema_params"])


def _assert_pytorch_only_round_trip(folder, copy_to, cls, want):
  """`folder`'s config.json and PyTorch safetensors alone load (`models.weights`) to exactly `want`."""
  os.makedirs(copy_to)
  for f in ("config.json", weights.PT_SAFETENSORS):
    shutil.copy(os.path.join(folder, f), copy_to / f)
  got = weights.load_diffusers_params(cls, str(copy_to))
  flat, flat_got = flatten_dict(want), flatten_dict(got)
  assert set(flat) == set(flat_got)
  for k in flat:
    np.testing.assert_array_equal(np.asarray(flat[k]), flat_got[k])


def pixel_config(fashion_dir):
  c = tiny.get_config()
  c.data.data_dir = fashion_dir
  return c


def test_pixel_class_model_round_trip(fashion_dir, tmp_path):
  config = pixel_config(fashion_dir)
  wd = str(tmp_path / "wd")
  exp, ema = write_checkpoint(config, wd)
  out = export_diffusers(config, wd, str(tmp_path / "out"))

  unet, loaded = FlaxUNet2DConditionModel.from_pretrained(os.path.join(out, "unet"))
  flat, flat_loaded = flatten_dict(ema["unet"]), flatten_dict(loaded)
  assert set(flat) == set(flat_loaded)
  for k in flat:
    np.testing.assert_array_equal(flat[k], np.asarray(flat_loaded[k]))
  # The PyTorch safetensors beside the Flax weights, read back alone (a hub-style folder): identical.
  assert json.load(open(os.path.join(out, "unet", "config.json")))["_class_name"] == "UNet2DConditionModel"
  _assert_pytorch_only_round_trip(os.path.join(out, "unet"), tmp_path / "pt_unet", FlaxUNet2DConditionModel,
                                  ema["unet"])
  table = np.load(os.path.join(out, EMBEDDING_FILE))
  np.testing.assert_array_equal(table["embedding"], ema["condition_embedding"]["embedding"])
  assert int(table["null_id"]) == exp.null_id == 10

  # Same eps: our model on condition ids vs diffusers' UNet on the table rows as a length-1 sequence.
  rs = np.random.default_rng(0)
  x = rs.standard_normal((2, 16, 16, 1)).astype(np.float32)
  t = jnp.array([3, 70], jnp.int32)  # diffusers wraps a non-jax timestep array in another axis
  c = np.array([1, exp.null_id], np.int32)
  ours = jax.jit(lambda p: exp.model.apply({"params": p}, x, t, c))(ema)
  theirs = jax.jit(lambda p: unet.apply({"params": p}, jnp.transpose(x, (0, 3, 1, 2)), t,
                                        jnp.asarray(table["embedding"])[c][:, None]).sample)(loaded)
  np.testing.assert_allclose(np.asarray(ours), np.transpose(np.asarray(theirs), (0, 2, 3, 1)), atol=1e-4)

  info = json.load(open(os.path.join(out, EXPORT_FILE)))
  assert info["checkpoint_step"] == 3 and info["keymap_hash"] == exp.keymap.hash and info["space"] == "pixel"
  assert json.load(open(os.path.join(out, "keymap.json")))["hash"] == exp.keymap.hash
  assert not os.path.exists(os.path.join(out, "vae")) and not os.path.exists(os.path.join(out, "model_index.json"))
  sched = json.load(open(os.path.join(out, "scheduler", "scheduler_config.json")))
  assert sched["beta_schedule"] == "squaredcos_cap_v2" and sched["clip_sample"] is True

  with pytest.raises(FileNotFoundError, match="no checkpoints here; train first"):
    export_diffusers(config, str(tmp_path / "empty"), str(tmp_path / "out2"))


@pytest.mark.parametrize("kind", ["cosine", "linear", "scaled_linear"])
def test_scheduler_config_matches_our_schedule(kind, tmp_path):
  from diffusers import FlaxDDIMScheduler
  cfg = ml_collections.ConfigDict({"schedule": kind, "num_steps": 100})
  folder = tmp_path / "scheduler"
  folder.mkdir()
  (folder / "scheduler_config.json").write_text(json.dumps(scheduler_config(cfg, clip_sample=True)))
  _, state = FlaxDDIMScheduler.from_pretrained(str(tmp_path), subfolder="scheduler")
  np.testing.assert_allclose(np.asarray(state.common.alphas_cumprod), np.asarray(make_schedule(kind, 100).abar),
                             rtol=2e-5, atol=1e-7)
  assert float(state.final_alpha_cumprod) == 1.0  # our last step lands on abar = 1
  with pytest.raises(ValueError, match="no diffusers scheduler"):
    scheduler_config(ml_collections.ConfigDict({"schedule": "sigmoid", "num_steps": 10}), clip_sample=True)


def test_latent_model_exports_its_vae_and_cli(fashion_dir, tmp_path):
  vae = build_vae(ml_collections.ConfigDict(dict(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4,
                                                 norm_num_groups=8)), 1, 16).with_scaling_factor(0.6)
  vae_params = init_vae_params(vae, 0, 16)
  save_vae(vae, vae_params, str(tmp_path / "sd" / "vae"))
  config = pixel_config(fashion_dir)
  config.model.space = "latent"
  config.model.condition = "image"
  config.vae.pretrained = str(tmp_path / "sd")
  wd = str(tmp_path / "wd")
  exp, ema = write_checkpoint(config, wd, step=2)
  assert exp.model_size == 8 and exp.model_channels == 4
  out = str(tmp_path / "out")
  # The command line, as a user runs it.
  cmd = [sys.executable, os.path.join(ROOT, "export.py"), f"--config={ROOT}/configs/tiny.py", f"--workdir={wd}",
         f"--out={out}", f"--config.data.data_dir={fashion_dir}", "--config.model.space=latent",
         "--config.model.condition=image", f"--config.vae.pretrained={tmp_path / 'sd'}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]

  _assert_pytorch_only_round_trip(os.path.join(out, "vae"), tmp_path / "pt_vae", FlaxAutoencoderKL, vae_params)
  _assert_pytorch_only_round_trip(os.path.join(out, "unet"), tmp_path / "pt_unet", FlaxUNet2DConditionModel,
                                  ema["unet"])
  module, loaded = FlaxAutoencoderKL.from_pretrained(os.path.join(out, "vae"))
  assert module.config.scaling_factor == pytest.approx(0.6)
  for a, b in zip(jax.tree.leaves(vae_params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(a, np.asarray(b))
  assert load_vae(out)[0].scaling_factor == pytest.approx(0.6)  # an SD-style root
  unet, unet_params = FlaxUNet2DConditionModel.from_pretrained(os.path.join(out, "unet"))
  assert unet.config.sample_size == 8 and unet.config.in_channels == 4
  for a, b in zip(jax.tree.leaves(ema["unet"]), jax.tree.leaves(unet_params)):
    np.testing.assert_array_equal(a, np.asarray(b))
  sched = json.load(open(os.path.join(out, "scheduler", "scheduler_config.json")))
  assert sched["clip_sample"] is False  # latents are not clipped
  info = json.load(open(os.path.join(out, EXPORT_FILE)))
  assert info["space"] == "latent" and info["vae_scaling_factor"] == pytest.approx(0.6)
  assert info["checkpoint_step"] == 2
