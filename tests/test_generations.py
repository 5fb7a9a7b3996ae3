"""score_generations end to end on a tiny trained workdir: sampling, storage, scoring against the
unmarked training images, the report, resume after an interruption, bad settings; and the same for a
latent text-to-image model (configs/tiny_latent.py: VAE decode, caption prompts, guidance).

One in-process `train()` of 2 steps (8 fake CPU devices, see conftest.py) makes each workdir.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from configs import tiny, tiny_latent
from solidmark_jax import parallel, report
from solidmark_jax.evaluation import generations, regions
from solidmark_jax.experiment import build_experiment
from solidmark_jax.metrics import baselines
from solidmark_jax.metrics import regions as region_stats
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
  # FB-Mem's view: nearest training image per region, recomputed by brute force on the same masks
  fb = result["regions"]
  gen_fg = regions.plain_background_masks(gen)
  train_fg = regions.plain_background_masks(train_images[:16])
  d_region = region_stats.region_distances(gen, gen_fg, train_images[:16], train_fg)
  for k in ("foreground", "background"):
    np.testing.assert_array_equal([g[f"{k}_nearest_image"] for g in gens], np.argmin(d_region[k], axis=1))
    np.testing.assert_allclose([g[f"{k}_l2"] for g in gens], d_region[k].min(axis=1), rtol=1e-6)
    assert [g[f"{k}_cluster"] for g in gens] == list(np.sum(d_region[k] <= 0.1, axis=1))
  assert sum(fb["counts"].values()) == 12 and fb["n"] == 12 and sum(fb["null"]["counts"].values()) == 12
  assert fb["counts"] == region_stats.category_counts([g["fb_category"] for g in gens])
  assert "## Regions (FB-Mem's view)" in md and (out / "regions.png").exists()


def test_resume_after_interruption_gives_the_same_result(fashion_dir, trained, reference, tmp_path, monkeypatch):
  out = tmp_path / "gen"
  calls = []
  real_append = report.ResultStore.append

  def crash_on_second_batch(self, group, ids, keys, k_pred, *rest):
    calls.append(list(ids))
    if len(calls) == 2:  # the second batch's images are written, its results line is not
      raise KeyboardInterrupt
    real_append(self, group, ids, keys, k_pred, *rest)

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
# Latent text-to-image: configs/tiny_latent.py (UNet of 2 steps on 8x8x4 latents, captions through a fresh
# text encoder, eval.guidance_scale = 2). Its VAE is a saved random one (`vae.pretrained`, as in
# test_pretrained.py), which skips stage 1: on 2 loaded cores the stage-1 compile alone took ~30 s, and
# loading the workdir's stage-1 VAE is covered by test_latent_e2e.py.

LATENT_OVERRIDES = {"model.block_out_channels": (32,), "model.down_block_types": ("DownBlock2D",),
                    "model.up_block_types": ("UpBlock2D",), "data.subset_size": 16, "train.num_steps": 2,
                    "train.checkpoint_every": 2}
LATENT_GEN = {"num_samples": 12, "batch_size": 8, "num_steps": 3, "num_neighbors": 5, "patch_size": 4,
              "patch_grid": None, "num_grid": 2}
VAE_SCALING = 0.5  # the saved VAE's; the config's default is 1


def _latent_config(fashion_dir, vae_dir, **gen):
  c = tiny_latent.get_config()
  c.update_from_flattened_dict({**LATENT_OVERRIDES, "data.data_dir": fashion_dir, "vae.pretrained": str(vae_dir)})
  c.eval.generations = ml_collections.ConfigDict({**LATENT_GEN, **gen})
  return c


@pytest.fixture(scope="module")
def latent_trained(fashion_dir, tmp_path_factory):
  """(config, workdir) of a latent text model trained for 2 steps."""
  import jax  # pylint: disable=g-import-not-at-top
  from solidmark_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("gen_latent")
  c = tiny_latent.get_config()
  vae = vae_lib.build_vae(c.vae, 1, 16).with_scaling_factor(VAE_SCALING)
  vae_lib.save_vae(vae, vae_lib.init_vae_params(vae, jax.random.key(4), 16, 1), str(root / "vae"))
  config = _latent_config(fashion_dir, root / "vae")
  train(config, str(root / "wd"))
  return config, root / "wd"


@pytest.fixture(scope="module")
def latent_reference(latent_trained, tmp_path_factory):
  """scores.json of the latent workdir, and the settings each outpainter was built with."""
  config, workdir = latent_trained
  out = tmp_path_factory.mktemp("gen_latent_ref")
  built = []
  real = generations.make_outpainter

  def spy(exp, spec, **kwargs):
    record = {"latent": exp.is_latent, "scaling_factor": exp.vae.scaling_factor, "spec": spec, **kwargs}
    built.append(record)
    op = real(exp, spec, **kwargs)
    run = op.run

    def recording_run(*args, **kw):
      record["null_condition"] = kw.get("null_condition")
      return run(*args, **kw)

    op.run = recording_run
    return op

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(generations, "make_outpainter", spy)
    result = generations.score_generations(config, str(workdir), out_dir=str(out))
  return out, result, built


def test_latent_text_generations_end_to_end(latent_trained, latent_reference):
  config, _ = latent_trained
  out, result, built = latent_reference
  exp = build_experiment(config)
  assert result == json.loads((out / "scores.json").read_text())
  meta = result["meta"]
  assert meta["model"] == {"space": "latent", "condition": "text"} and meta["vae_scaling_factor"] == VAE_SCALING
  assert meta["sampling"]["guidance_scale"] == 2.0 and meta["image_size"] == 16 and meta["channels"] == 1
  # the latent sampler with the frozen VAE, guided towards the caption and away from the empty
  # caption's embedding [L, D]
  assert len(built) == 1 and built[0]["latent"] and built[0]["scaling_factor"] == VAE_SCALING
  assert built[0]["spec"].guidance_scale == 2.0 and built[0]["return_images"]
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
    assert np.all(np.isfinite(np.array([g[name] for g in gens], np.float64))), name
  assert all(0.0 <= g["k_pred"] <= 1.0 for g in gens)
  # guided: Wen et al.'s noise magnitude of each generation (a random text model's eps still reads the caption)
  assert meta["sampling"]["magnitude_steps"] == 1
  noise = np.array([g["noise_magnitude"] for g in gens])
  assert np.all(np.isfinite(noise)) and np.all(noise > 0)
  assert result["noise_magnitude"]["mean"] == pytest.approx(noise.mean())
  assert result["noise_magnitude"]["rank_correlation_l_sm_prompt"]["n"] == 12
  assert set(result["summary"]) == {"l2", "carlini", "patched_l2", "patched_carlini"}
  assert all(np.isfinite(v["tail_95"]) and np.isfinite(v["extreme"]) for v in result["summary"].values())
  assert meta["num_train_images"] == 16 and meta["keymap_hash"] == exp.keymap.hash
  md = (out / "summary.md").read_text()
  assert "Noise magnitude (Wen et al. 2024; first 1 step(s)" in md
  best = min(gens, key=lambda g: (g["carlini"], g["id"]))
  assert report.caption_cell(best["caption"]) in md


def test_latent_resume_after_interruption(latent_trained, latent_reference, tmp_path, monkeypatch):
  """The state an interruption in the second batch leaves (test_resume_after_interruption_gives_the_same_result
  makes it by a real crash): both batches' images stored, only the first batch's results listed."""
  config, workdir = latent_trained
  ref_out, reference, _ = latent_reference
  out = tmp_path / "gen"
  shutil.copytree(ref_out / "samples", out / "samples")
  lines = (ref_out / "samples.jsonl").read_text().splitlines(keepends=True)
  assert len(lines) == 1 + 12
  (out / "samples.jsonl").write_text("".join(lines[:1 + 8]))  # metadata + the first batch
  saved = []
  real_save = generations._save_batch
  monkeypatch.setattr(generations, "_save_batch", lambda d, ids, im: saved.append(list(ids)) or real_save(d, ids, im))
  result = generations.score_generations(config, str(workdir), out_dir=str(out))
  assert saved == [list(range(8, 12))]  # only what was not listed
  assert result == reference  # noise seeded per generation id: the same images, the same scores


def test_settings_are_the_config_section():
  """eval.generations read from the config (defaults: config.GENERATIONS_FIELDS), in scores.json's order."""
  from solidmark_jax import config as config_lib
  c = tiny.get_config()
  s = generations.generation_settings(c)
  assert list(s) == [name for name, _, _ in config_lib.GENERATIONS_FIELDS]
  assert s["batch_size"] == c.eval.batch_size and s["num_neighbors"] == 50 and s["patch_grid"] == (4, 4)
  c.eval.generations.num_neighbors = 7
  c.eval.generations.sampler = "ddpm"
  s = generations.generation_settings(c)
  assert s["num_neighbors"] == 7 and s["sampler"] == "ddpm"
  c.eval.generations = ml_collections.ConfigDict({"seed": 3})  # a partial section: the rest defaults
  assert generations.generation_settings(c)["num_neighbors"] == 50


# ---------------------------------------------------------------------------------------------
# parallel.broadcast_ids / broadcast_from_main: what process 0 decided, on every process; to_host:
# a batch split over both processes, whole on each.

_BROADCAST = """
import json, sys
import numpy as np
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from solidmark_jax import parallel
main = jax.process_index() == 0
out = [parallel.broadcast_ids([7, 3, 2**40] if main else None),
       parallel.broadcast_ids(np.arange(10)[::2] if main else [9, 9]),  # strided; the others' value is ignored
       parallel.broadcast_ids([] if main else None),
       parallel.broadcast_from_main(np.arange(3, dtype=np.int32) + (0 if main else 10))]
rows = np.full((2, 3), jax.process_index(), np.float32)  # this process's rows of a [4, 3] batch
out += list(parallel.to_host(parallel.global_batch(parallel.make_mesh(), {"x": rows})).values())
print(json.dumps([[str(a.dtype), a.tolist()] for a in out]))
"""


def test_broadcast_ids_one_process():
  got = parallel.broadcast_ids([4, 1, 2])
  assert got.dtype == np.int64 and got.tolist() == [4, 1, 2]
  assert parallel.broadcast_ids(np.zeros(0, np.int32)).dtype == np.int64
  with pytest.raises(ValueError, match="process 0 must pass the ids"):
    parallel.broadcast_ids(None)


def test_broadcast_ids_two_processes(tmp_path):
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{sock.getsockname()[1]}"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": root}
  procs = [subprocess.Popen([sys.executable, "-c", _BROADCAST, address, str(i)], env=env, cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, text in zip(procs, outputs):
    assert p.returncode == 0, text
  want = [["int64", [7, 3, 2**40]], ["int64", [0, 2, 4, 6, 8]], ["int64", []], ["int32", [0, 1, 2]],
          ["float32", [[0.0] * 3] * 2 + [[1.0] * 3] * 2]]
  assert [json.loads(text.strip().splitlines()[-1]) for text in outputs] == [want, want]
