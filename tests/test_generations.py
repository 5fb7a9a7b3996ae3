"""score_generations end to end on a tiny trained workdir: sampling, storage, scoring against the
unmarked training images, the report, resume after an interruption, bad settings; and the same for a
latent text-to-image model (configs/tiny_latent.py: VAE decode, caption prompts, guidance).

One in-process `train()` of 2 steps (8 fake CPU devices, see conftest.py) makes each workdir.
"""

import json
import os

import ml_collections
import numpy as np
import pytest

from configs import tiny, tiny_latent
from solidmark_jax import generations, report
from solidmark_jax.experiment import build_experiment
from solidmark_jax.metrics import baselines
from solidmark_jax.training.loop import train

# One plain UNet block (no down-sampling; the condition enters through the mid block's cross-attention):
# train() compiled and ran 2 steps in 31 s here (51 s with a cross-attention block), under load.
OVERRIDES = {"model.block_out_channels": (32,), "model.down_block_types": ("DownBlock2D",),
             "model.up_block_types": ("UpBlock2D",), "model.condition": "image",
             "data.subset_size": 16, "train.num_steps": 2, "train.checkpoint_every": 2}
GEN = {"num_samples": 12, "batch_size": 8, "num_steps": 3, "num_neighbors": 5, "patch_size": 4,
       "patch_grid": None, "encoder": "pooled_pixels", "num_grid": 4}


def _config(fashion_dir, **gen):
  c = tiny.get_config()
  c.update_from_flattened_dict({**OVERRIDES, "data.data_dir": fashion_dir})
  c.data.duplicates = {2: 2}  # two images twice: 18 instances, 16 distinct images
  c.eval.generations = ml_collections.ConfigDict({**GEN, **gen})
  return c


@pytest.fixture(scope="module")
def trained(fashion_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("gen") / "wd"
  train(_config(fashion_dir), str(workdir))
  return workdir


@pytest.fixture(scope="module")
def reference(fashion_dir, trained, tmp_path_factory):
  out = tmp_path_factory.mktemp("gen_ref")
  result = generations.score_generations(_config(fashion_dir), str(trained), out_dir=str(out))
  return out, result


def test_score_generations_end_to_end(fashion_dir, reference):
  out, result = reference
  config = _config(fashion_dir)
  exp = build_experiment(config)
  assert result == json.loads((out / "scores.json").read_text())
  gens = result["generations"]
  ids = [g["id"] for g in gens]
  assert ids == list(range(12))
  # prompts: a permutation of the 18 instances; each generation conditioned on its prompt's image id
  prompts = [g["prompt_instance"] for g in gens]
  assert len(set(prompts)) == 12 and all(0 <= p < 18 for p in prompts)
  assert [g["condition"] for g in gens] == [int(exp.instances.image_id[p]) for p in prompts]
  # the stored images are the marked-size generations; scores compare their centres with the
  # 16 distinct unmarked training images (the border stripped on both sides)
  images = generations._load_images(str(out / "samples"), np.arange(12))
  assert images.shape == (12, 16, 16, 1) and images.dtype == np.uint8 and images.std() > 0
  gen = images[:, 2:-2, 2:-2].astype(np.float64) / 255.0
  train_images = generations.TrainImages(exp)
  assert len(train_images) == 16 and train_images[:16].shape == (16, 12, 12, 1)
  d = baselines.pairwise_l2(gen, train_images[:16])  # brute force [12, 16]
  np.testing.assert_array_equal([g["nearest_image"] for g in gens], np.argmin(d, axis=1))
  np.testing.assert_allclose([g["l2"] for g in gens], d.min(axis=1), rtol=1e-6)
  near5 = np.sort(d, axis=1)[:, :5]
  np.testing.assert_allclose([g["carlini"] for g in gens], near5[:, 0] / (0.5 * near5.mean(axis=1)), rtol=1e-6)
  dp = baselines.pairwise_l2(gen, train_images[:16], grid=(3, 3))  # 4 px patches of 12 px
  np.testing.assert_allclose([g["patched_l2"] for g in gens], dp.min(axis=1), rtol=1e-6)
  assert all(g["patched_l2"] >= g["l2"] - 1e-9 for g in gens)  # the worst patch is never below the mean
  # a duplicated image lists both copies; l_SM to the nearest's keys is the closer of them
  dup = [g for g in gens if len(g["nearest_instances"]) == 2]
  for g in dup:
    keys = exp.keymap.lookup(np.array(g["nearest_instances"]))
    assert g["l_sm_nearest"] == pytest.approx(np.min(np.abs(g["k_pred"] - keys)))
  # k_pred is read off the generation's own border
  border = images.astype(np.float64) / 255.0
  mask = exp.mask[..., 0] > 0
  np.testing.assert_allclose([g["k_pred"] for g in gens], [b[..., 0][mask].mean() for b in border], atol=1e-5)
  # summaries and their direction
  summary = result["summary"]
  assert set(summary) == {"l2", "carlini", "patched_l2", "patched_carlini", "similarity"}
  l2 = np.array([g["l2"] for g in gens])
  assert summary["l2"]["counts"] == [int(np.sum(l2 <= t)) for t in (0.1, 0.05, 0.02)]
  assert summary["l2"]["tail_95"] == pytest.approx(np.percentile(l2, 5)) and summary["l2"]["extreme"] == l2.min()
  sims = np.array([g["similarity"] for g in gens])
  assert summary["similarity"]["direction"] == "higher"
  assert summary["similarity"]["counts"] == [int(np.sum(sims >= t)) for t in (0.5, 0.75, 0.95)]
  assert result["meta"]["keymap_hash"] == exp.keymap.hash and result["meta"]["checkpoint_step"] == 2
  assert result["meta"]["num_train_images"] == 16 and result["meta"]["carlini_n"] == 5
  md = (out / "summary.md").read_text()
  assert "| Carlini's modified l2 (patched) | lower = memorised |" in md and "Closest generations" in md
  assert (out / "nearest.png").stat().st_size > 1000


def test_resume_after_interruption_gives_the_same_result(fashion_dir, trained, reference, tmp_path, monkeypatch):
  out = tmp_path / "gen"
  calls = []
  real_append = report.ResultStore.append

  def crash_on_second_batch(self, group, ids, keys, k_pred):
    calls.append(list(ids))
    if len(calls) == 2:  # the second batch's images are written, its results line is not
      raise KeyboardInterrupt
    real_append(self, group, ids, keys, k_pred)

  monkeypatch.setattr(report.ResultStore, "append", crash_on_second_batch)
  with pytest.raises(KeyboardInterrupt):
    generations.score_generations(_config(fashion_dir), str(trained), out_dir=str(out))
  assert not (out / "scores.json").exists()
  assert len((out / "samples.jsonl").read_text().splitlines()) == 1 + 8  # metadata + the first batch
  monkeypatch.setattr(report.ResultStore, "append", real_append)
  saved = []
  real_save = generations._save_batch
  monkeypatch.setattr(generations, "_save_batch", lambda d, ids, im: saved.append(list(ids)) or real_save(d, ids, im))
  result = generations.score_generations(_config(fashion_dir), str(trained), out_dir=str(out))
  assert saved == [list(range(8, 12))]  # only what was not stored
  assert result == reference[1]


def test_bad_settings(fashion_dir, trained, reference):
  with pytest.raises(ValueError, match=r"eval.generations: unknown fields \['num_sample'\]"):
    generations.score_generations(_config(fashion_dir, num_sample=4), str(trained))
  with pytest.raises(ValueError, match="eval.generations.backend"):
    generations.score_generations(_config(fashion_dir, backend="torch"), str(trained))
  with pytest.raises(ValueError, match="eval.generations.l2_thresholds"):
    generations.score_generations(_config(fashion_dir, l2_thresholds=0.1), str(trained))
  with pytest.raises(ValueError, match="divisible by the 8 devices"):
    generations.score_generations(_config(fashion_dir, batch_size=6), str(trained))
  out, _ = reference
  before = (out / "samples.jsonl").read_text()
  with pytest.raises(ValueError, match="samples.jsonl: the stored results were made with different settings"):
    generations.score_generations(_config(fashion_dir, num_steps=5), str(trained), out_dir=str(out))
  assert (out / "samples.jsonl").read_text() == before


# ---------------------------------------------------------------------------------------------
# Latent text-to-image: configs/tiny_latent.py (VAE stage 1 of 2 steps, UNet of 2 steps on 8x8x4 latents,
# captions through a fresh text encoder, eval.guidance_scale = 2).

LATENT_OVERRIDES = {"model.block_out_channels": (32,), "model.down_block_types": ("DownBlock2D",),
                    "model.up_block_types": ("UpBlock2D",), "data.subset_size": 16, "vae.train_steps": 2,
                    "train.num_steps": 2, "train.checkpoint_every": 2}
LATENT_GEN = {"num_samples": 12, "batch_size": 8, "num_steps": 3, "num_neighbors": 5, "patch_size": 4,
              "patch_grid": None, "num_grid": 2}


def _latent_config(fashion_dir, **gen):
  c = tiny_latent.get_config()
  c.update_from_flattened_dict({**LATENT_OVERRIDES, "data.data_dir": fashion_dir})
  c.eval.generations = ml_collections.ConfigDict({**LATENT_GEN, **gen})
  return c


@pytest.fixture(scope="module")
def latent_trained(fashion_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("gen_latent") / "wd"
  train(_latent_config(fashion_dir), str(workdir))
  return workdir


@pytest.fixture(scope="module")
def latent_reference(fashion_dir, latent_trained, tmp_path_factory):
  """scores.json of the latent workdir, and the settings each outpainter was built with."""
  out = tmp_path_factory.mktemp("gen_latent_ref")
  built = []
  real = generations.make_outpainter

  def spy(exp, **kwargs):
    built.append({"latent": exp.is_latent, "scaling_factor": exp.vae.scaling_factor, **kwargs})
    return real(exp, **kwargs)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(generations, "make_outpainter", spy)
    result = generations.score_generations(_latent_config(fashion_dir), str(latent_trained), out_dir=str(out))
  return out, result, built


def test_latent_text_generations_end_to_end(fashion_dir, latent_trained, latent_reference):
  out, result, built = latent_reference
  exp = build_experiment(_latent_config(fashion_dir))
  assert result == json.loads((out / "scores.json").read_text())
  meta = result["meta"]
  assert meta["model"] == {"space": "latent", "condition": "text"}
  assert meta["sampling"]["guidance_scale"] == 2.0 and meta["image_size"] == 16 and meta["channels"] == 1
  # the latent sampler, with the workdir's stage-1 VAE (its measured scaling factor), guided towards the
  # caption and away from the empty caption's embedding [L, D]
  vae_cfg = json.loads((latent_trained / "vae" / "config.json").read_text())
  assert len(built) == 1 and built[0]["latent"] and built[0]["scaling_factor"] == vae_cfg["scaling_factor"]
  assert built[0]["guidance_scale"] == 2.0
  null = np.asarray(exp.text.encode(exp.text.params, np.asarray(exp.text.null_ids, np.int32)[None]))[0]
  assert null.shape == (32, 32)
  np.testing.assert_allclose(np.asarray(built[0]["null_condition"]), null, rtol=1e-5, atol=1e-6)
  # prompts are the training captions of the prompt instances, recorded per generation
  gens = result["generations"]
  assert [g["id"] for g in gens] == list(range(12))
  prompts = [g["prompt_instance"] for g in gens]
  assert len(set(prompts)) == 12 and all(0 <= p < 16 for p in prompts)
  assert [g["caption"] for g in gens] == [exp.captions[p] for p in prompts]
  assert all(isinstance(g["caption"], str) and g["caption"] for g in gens) and "condition" not in gens[0]
  # decoded to pixels before storing: marked-size uint8 images, not 8x8x4 latents
  images = generations._load_images(str(out / "samples"), np.arange(12))
  assert images.shape == (12, 16, 16, 1) and images.dtype == np.uint8 and images.std() > 0
  # every baseline metric is finite, and each generation's k_pred is a key in [0, 1]
  for name in ("l2", "carlini", "patched_l2", "patched_carlini", "k_pred", "l_sm_prompt", "l_sm_nearest"):
    values = np.array([g[name] for g in gens], np.float64)
    assert np.all(np.isfinite(values)), name
  assert all(0.0 <= g["k_pred"] <= 1.0 for g in gens)
  assert set(result["summary"]) == {"l2", "carlini", "patched_l2", "patched_carlini"}
  assert all(np.isfinite(v["tail_95"]) and np.isfinite(v["extreme"]) for v in result["summary"].values())
  assert meta["num_train_images"] == 16 and meta["keymap_hash"] == exp.keymap.hash
  md = (out / "summary.md").read_text()
  best = min(gens, key=lambda g: (g["carlini"], g["id"]))
  assert generations._cell(best["caption"]) in md


def test_latent_resume_after_interruption(fashion_dir, latent_trained, latent_reference, tmp_path, monkeypatch):
  out = tmp_path / "gen"
  real_append = report.ResultStore.append
  calls = []

  def crash_on_second_batch(self, group, ids, keys, k_pred):
    calls.append(list(ids))
    if len(calls) == 2:
      raise KeyboardInterrupt
    real_append(self, group, ids, keys, k_pred)

  monkeypatch.setattr(report.ResultStore, "append", crash_on_second_batch)
  with pytest.raises(KeyboardInterrupt):
    generations.score_generations(_latent_config(fashion_dir), str(latent_trained), out_dir=str(out))
  assert not (out / "scores.json").exists()
  monkeypatch.setattr(report.ResultStore, "append", real_append)
  saved = []
  real_save = generations._save_batch
  monkeypatch.setattr(generations, "_save_batch", lambda d, ids, im: saved.append(list(ids)) or real_save(d, ids, im))
  result = generations.score_generations(_latent_config(fashion_dir), str(latent_trained), out_dir=str(out))
  assert saved == [list(range(8, 12))]  # only what was not stored
  assert result == latent_reference[1]  # noise seeded per generation id: the same images, the same scores
