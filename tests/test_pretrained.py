"""Fine-tuning from a local Stable-Diffusion-layout directory, and the SD 2.1 configs' sizes.

The test writes a tiny pipeline root itself (unet/, vae/, text_encoder/, tokenizer/, scheduler/)
with save_pretrained, then builds the experiment from it exactly as configs/sd21_finetune.py does.
"""

import json
import os

import jax
import numpy as np
import pytest

from configs import sd21_finetune, sd21_pretrain, tiny_latent
from solidmark_jax import models, parallel
from solidmark_jax.experiment import build_experiment
from solidmark_jax.models import text as text_lib
from solidmark_jax.models import vae as vae_lib
from solidmark_jax.models._diffusers import FlaxUNet2DConditionModel
from solidmark_jax.training.loop import jit_train_step
from solidmark_jax.training.state import create_state, load_frozen, make_optimizer

T = 100


def _scheduler(root, prediction="epsilon", beta="scaled_linear", steps=T):
  os.makedirs(os.path.join(root, "scheduler"), exist_ok=True)
  with open(os.path.join(root, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump({"_class_name": "DDIMScheduler", "beta_schedule": beta, "num_train_timesteps": steps,
               "prediction_type": prediction}, f)


@pytest.fixture(scope="module")
def sd_root(tmp_path_factory):
  """A tiny pipeline in Stable Diffusion's layout, written with save_pretrained."""
  root = str(tmp_path_factory.mktemp("sd_root"))
  c = tiny_latent.get_config()
  unet = FlaxUNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32),
                                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                  attention_head_dim=8, cross_attention_dim=32)
  unet_params = unet.init_weights(jax.random.key(3))
  unet.save_pretrained(os.path.join(root, "unet"), params=unet_params)
  vae = vae_lib.build_vae(c.vae, 1, 16).with_scaling_factor(0.5)
  vae_lib.save_vae(vae, vae_lib.init_vae_params(vae, jax.random.key(4), 16, 1), os.path.join(root, "vae"))
  text_lib.fresh_text_encoder(c.text, 5, captions=["a photo of a coat", "a shoe"]).save_pretrained(root)
  _scheduler(root)
  return root, jax.tree.map(np.asarray, unet_params)


def _config(root, fashion_dir):
  c = tiny_latent.get_config()
  c.data.data_dir = fashion_dir
  c.model.pretrained = c.text.pretrained = c.vae.pretrained = root
  c.diffusion.schedule = "scaled_linear"
  c.diffusion.num_steps = T
  return c


def test_finetune_starts_from_the_pretrained_unet_and_trains(sd_root, fashion_dir, tmp_path):
  root, saved = sd_root
  c = _config(root, fashion_dir)
  exp = build_experiment(c)
  assert (exp.model_size, exp.model_channels) == (8, 4) and exp.text.hidden_size == 32
  mesh = parallel.make_mesh(-1, 1)
  tx = make_optimizer(c.train)
  state, shardings = create_state(exp, mesh, tx, jax.random.key(0))
  got = jax.tree.map(np.asarray, state["params"]["unet"])
  assert jax.tree.all(jax.tree.map(np.array_equal, got, saved))
  exp, frozen = load_frozen(exp, str(tmp_path), train=False, mesh=mesh)
  frozen = jax.device_put(frozen, parallel.replicated(mesh))
  assert exp.vae.scaling_factor == 0.5  # from the root's vae/config.json
  step = jit_train_step(exp, mesh, tx, shardings)
  batch = exp.read_marked(np.arange(8))
  batch = parallel.global_batch(mesh, {"image": batch["image"], "condition": batch["condition"]})
  for _ in range(2):  # the learning rate warms up from 0 at step 0
    state, out = step(state, batch, jax.random.key(1), frozen)
  assert np.isfinite(float(out["loss"])) and int(state["step"]) == 2
  assert not jax.tree.all(jax.tree.map(np.array_equal, jax.tree.map(np.asarray, state["params"]["unet"]), saved))


def test_pretrained_schedule_must_match(sd_root, fashion_dir, tmp_path):
  root, _ = sd_root
  c = _config(root, fashion_dir)
  c.diffusion.schedule = "cosine"
  with pytest.raises(ValueError, match=r"diffusion.schedule='scaled_linear'"):
    build_experiment(c)


def test_v_prediction_pipeline_is_read_from_its_scheduler(sd_root, fashion_dir, tmp_path):
  """SD 2.1 at 768 px predicts v: its scheduler config sets the experiment's prediction type (which
  the train step and the outpainters follow); a config that says otherwise is an error."""
  root, _ = sd_root
  assert build_experiment(_config(root, fashion_dir)).prediction_type == "epsilon"
  other = tmp_path / "v_root"
  other.mkdir()
  for sub in ("unet", "vae", "text_encoder", "tokenizer"):
    os.symlink(os.path.join(root, sub), other / sub)
  _scheduler(str(other), prediction="v_prediction")
  c = _config(str(other), fashion_dir)
  exp = build_experiment(c)
  assert exp.prediction_type == "v_prediction"
  c.diffusion.prediction_type = "epsilon"
  with pytest.raises(ValueError, match=r"predicts prediction_type='v_prediction', the config says "
                                       r"diffusion.prediction_type='epsilon'"):
    build_experiment(c)
  _scheduler(str(other), prediction="sample")
  c.diffusion.prediction_type = None
  with pytest.raises(ValueError, match=r"scheduler_config.json: prediction_type='sample'; supported"):
    build_experiment(c)


def test_missing_pretrained_folders_are_named(sd_root, fashion_dir, tmp_path):
  root, _ = sd_root
  c = _config(str(tmp_path), fashion_dir)  # an empty folder
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    build_experiment(c)


def test_sd21_configs_sizes():
  for module in (sd21_finetune, sd21_pretrain):
    c = module.get_config()
    assert c.data.image_size + 2 * c.marks.pad == 256
    assert c.text.pretrained == module.SD_ROOT and c.vae.pretrained == module.SD_ROOT
  c = sd21_pretrain.get_config()
  models.validate(c.model, 256 // 8, 4)  # 32 x 32 latents: SD 2.1's three down-samplings divide it
  with pytest.raises(ValueError, match=r"latent side 36 .* sizes that work include 32 and 40"):
    models.validate(c.model, 288 // 8, 4)  # the paper's 256 + 2 x 16 = 288 px does not
  c.sd_root = "/elsewhere"
  assert c.text.pretrained == "/elsewhere" and c.vae.pretrained == "/elsewhere"


def test_cached_latents_are_the_posterior_means(sd_root, fashion_dir, tmp_path):
  from solidmark_jax.data.instances import BatchPlan
  from solidmark_jax.training.loop import _cache_latents, make_prepare
  root, _ = sd_root
  c = _config(root, fashion_dir)
  c.vae.cache_latents = True
  exp = build_experiment(c)
  mesh = parallel.make_mesh(-1, 1)
  exp, frozen = load_frozen(exp, str(tmp_path), train=False, mesh=mesh)
  frozen = jax.device_put(frozen, parallel.replicated(mesh))
  latents = _cache_latents(exp, frozen, mesh, BatchPlan(len(exp.instances), 8, 0))  # [M, 8, 8, 4]
  assert latents.shape == (len(exp.instances), 8, 8, 4)
  ids = np.array([0, 5, 31])
  direct = np.asarray(exp.vae.encode(frozen["vae"], exp.read_marked(ids)["image"]))
  np.testing.assert_allclose(latents[ids], direct, atol=1e-5)
  # the train step then denoises exactly those latents; on the fly it draws posterior samples instead
  batch = {"latent": latents[ids], "condition": exp.conditions[ids]}
  x0, cond, null = make_prepare(exp, cached_latents=True)(frozen, batch, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(x0), latents[ids])
  assert cond.shape == (3, c.text.max_length, 32) and null.shape == (c.text.max_length, 32)
  sampled, _, _ = make_prepare(exp)(frozen, {"image": exp.read_marked(ids)["image"], "condition": batch["condition"]},
                                    jax.random.key(0))
  assert not np.allclose(np.asarray(sampled), latents[ids])


def test_one_pipeline_folder_rule_for_every_component(tmp_path):
  from solidmark_jax.models.weights import pipeline_folder
  root = tmp_path / "sd"
  for sub in ("unet", "vae"):
    (root / sub).mkdir(parents=True)
    (root / sub / "config.json").write_text("{}")
  (root / "text_encoder").mkdir()
  assert pipeline_folder(str(root), "unet") == str(root / "unet")  # a pipeline root
  assert pipeline_folder(str(root / "vae"), "vae") == str(root / "vae")  # the component's own folder
  assert pipeline_folder(str(root), "text_encoder") is None  # no config.json in either
  assert pipeline_folder(str(root), "text_encoder", ()) == str(root / "text_encoder")
  assert pipeline_folder(str(root), "tokenizer", ()) == str(root)
  assert models.pretrained_unet_dir(str(root)) == str(root / "unet")
