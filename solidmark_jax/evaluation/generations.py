"""Baseline memorisation metrics from plain generations (the paper's Section 3), beside SolidMark's l_SM.

`score_generations(config, workdir)` (`evaluate.py --generations`) samples `eval.generations.num_samples`
images from a checkpoint's EMA parameters with no known region (prompted by training conditions, seeded
by generation id, resumable), strips the SolidMark border, finds each generation's nearest training
images and scores them with the baselines of `metrics.baselines` (normalised l2, Carlini's modified l2,
patched l2, embedding similarity), each with its thresholds; it also reads the key each generation
outpainted. Results go to DIR/generations/ (scores.json, summary.md, samples/, nearest.png).
docs/generations.md gives the procedure in full.
"""

from __future__ import annotations

import glob
import logging
import os
from typing import Callable

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from solidmark_jax import atomic, dirlock, marks, parallel, report
from solidmark_jax import config as config_lib
from solidmark_jax.data import open_source
from solidmark_jax.evaluation import regions as regions_lib
from solidmark_jax.evaluation.conditioning import Conditioner
from solidmark_jax.experiment import Experiment, build_experiment, make_outpainter
from solidmark_jax.experiment import outpaint_params
from solidmark_jax.metrics import baselines, magnitude, validate_thresholds
from solidmark_jax.metrics import regions as region_stats
from solidmark_jax.outpaint import SamplerSpec
from solidmark_jax.training import checkpoint as ckpt
from solidmark_jax.training.state import load_frozen, restore_ema

log = logging.getLogger(__name__)

GENERATIONS_DIR = "generations"
GROUP = "generations"
PROMPT_SALT = 0x6E4  # prompts: permutation of the instances by default_rng([seed, PROMPT_SALT])
ENCODERS = {"pooled_pixels": baselines.pooled_pixels_encoder}  # reference only: no weights shipped


def generation_settings(config: ml_collections.ConfigDict) -> dict:
  """`eval.generations` over `config.generations_defaults()`, None sampler settings from `eval`, validated.

  The fields come in `config.GENERATIONS_FIELDS` order (as scores.json lists them).
  """
  defaults = config_lib.generations_defaults()
  given = config_lib.section_items(config.eval.get("generations"), "eval.generations", tuple(defaults))
  s = {k: given.get(k, v) for k, v in defaults.items()}
  for k in ("batch_size", "num_steps", "sampler", "eta", "guidance_scale"):
    if s[k] is None:
      s[k] = config.eval[k]
  if int(s["num_samples"]) < 1:
    raise ValueError(f"eval.generations.num_samples must be >= 1, got {s['num_samples']}")
  if int(s["batch_size"]) < 1:
    raise ValueError(f"eval.generations.batch_size must be >= 1, got {s['batch_size']}")
  if int(s["num_neighbors"]) < 1 or not float(s["alpha"]) > 0:
    raise ValueError(f"eval.generations: num_neighbors must be >= 1 and alpha > 0, got {s['num_neighbors']}, "
                     f"{s['alpha']}")
  if s["backend"] not in baselines.BACKENDS:
    raise ValueError(f"eval.generations.backend must be one of {baselines.BACKENDS}, got {s['backend']!r}")
  if s["encoder"] is not None and s["encoder"] not in ENCODERS:
    raise ValueError(f"eval.generations.encoder must be None or one of {sorted(ENCODERS)}, got {s['encoder']!r}")
  for k in ("l2_thresholds", "carlini_thresholds", "similarity_thresholds"):
    s[k] = validate_thresholds(s[k], f"eval.generations.{k}", unit_interval=False)
  s["patch_grid"] = None if s["patch_grid"] is None else tuple(int(v) for v in s["patch_grid"])
  s["region_thresholds"] = tuple(float(v) for v in s["region_thresholds"])
  if len(s["region_thresholds"]) != 2 or not all(v > 0 for v in s["region_thresholds"]):
    raise ValueError("eval.generations.region_thresholds must be (foreground, background), both > 0, got "
                     f"{s['region_thresholds']}")
  if float(s["guidance_scale"]) != 1.0 and config.model.condition == "none":
    raise ValueError(f"eval.generations.guidance_scale={s['guidance_scale']} (or eval.guidance_scale) != 1 needs a "
                     "conditional model (model.condition is 'none')")
  return s


# ---------------------------------------------------------------------------------------------
# Images: what is compared.


def _to_uint8(x_model: np.ndarray) -> np.ndarray:
  """Model space [-1, 1] -> uint8 [0, 255], as an image file would hold it."""
  return np.round(np.clip(marks.from_model_space(np.asarray(x_model, np.float32)), 0.0, 1.0) * 255).astype(np.uint8)


def content(images01: np.ndarray, pad: int, pattern: str, marked: bool) -> np.ndarray:
  """The part of an image that is compared: [n, H, W, C] in [0, 1] -> float32 [n, h, w, C].

  Border pattern: a marked image is cropped to its centre (an unmarked one is already that).
  Centre pattern: the p x p key square is set to 0 (marked or not), the size kept.
  """
  x = np.asarray(images01, np.float32)
  if pattern == "border":
    return x[:, pad:-pad, pad:-pad] if marked else x
  x = x.copy()
  h, w = x.shape[1:3]
  x[:, marks.centre_slice(h, pad), marks.centre_slice(w, pad)] = 0.0
  return x


class TrainImages:
  """The distinct training images (unmarked, compared part only), read by position: an `ImageSet`.

  Position i is distinct image i (`Instances.image_id`), read from the source record of its first
  copy. Held in memory when they fit in `cache_mb`, otherwise read again on every pass.
  """

  def __init__(self, exp: Experiment, cache_mb: float = 1024):
    inst = exp.instances
    _, first = np.unique(inst.image_id, return_index=True)  # first copy of each distinct image
    self.instances = first  # [N_images] the instance id of each image's first copy
    self.records = inst.record_index[first]  # [N_images]
    self.source = exp.source
    self.pad, self.pattern = exp.config.marks.pad, exp.config.marks.pattern
    self._cache = None
    size = exp.source.image_size
    if len(self) * size * size * exp.channels * 4 <= cache_mb * 2**20:
      self._cache = np.concatenate([self._read(np.arange(s, min(s + 4096, len(self))))
                                    for s in range(0, len(self), 4096)])

  def __len__(self) -> int:
    return len(self.records)

  def _read(self, positions: np.ndarray) -> np.ndarray:
    raw = self.source.read(self.records[positions])["image"]  # uint8 [n, S, S, C]
    return content(raw.astype(np.float32) / 255.0, self.pad, self.pattern, marked=False)

  def __getitem__(self, index) -> np.ndarray:
    if self._cache is not None:
      return self._cache[index]
    positions = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index, np.int64)
    return self._read(positions)


# ---------------------------------------------------------------------------------------------
# Sampling and the store.


def prompt_instances(num_instances: int, ids: np.ndarray, seed: int) -> np.ndarray:
  """The training instance whose condition prompts each generation id: perm[g mod M]."""
  perm = np.random.default_rng([int(seed), PROMPT_SALT]).permutation(num_instances)
  return perm[np.asarray(ids, np.int64) % num_instances]


def _save_batch(samples_dir: str, ids: np.ndarray, images_u8: np.ndarray) -> None:
  os.makedirs(samples_dir, exist_ok=True)
  path = os.path.join(samples_dir, f"{int(ids[0]):07d}.npz")
  with atomic.replace_path(path, suffix=".tmp.npz") as tmp:
    np.savez(tmp, ids=np.asarray(ids, np.int64), images=images_u8)


def _load_images(samples_dir: str, ids: np.ndarray) -> np.ndarray:
  """The stored uint8 generations of `ids`, in that order."""
  found = {}
  for path in sorted(glob.glob(os.path.join(samples_dir, "*.npz"))):
    if path.endswith(".tmp.npz"):
      continue
    with np.load(path) as f:
      for i, image in zip(f["ids"], f["images"]):
        found[int(i)] = image
  missing = [int(i) for i in ids if int(i) not in found]
  if missing:
    raise FileNotFoundError(f"{samples_dir}: the images of generations {missing[:10]} are missing although "
                            "samples.jsonl lists them; delete the generations directory to start over")
  return np.stack([found[int(i)] for i in ids])


def _sample_all(exp, params, conditioner: Conditioner, s, ids, store, samples_dir, mesh, is_main) -> None:
  """Generates the ids not yet stored, batch by batch, appending each batch as it finishes.

  params: the UNet's (pixel) or `outpaint_params` {"unet", "vae"} (latent); either way the
  outpainter returns pixel images in model space [-1, 1], which are stored as uint8.
  """
  spec = SamplerSpec(num_steps=int(s["num_steps"]), sampler=s["sampler"], eta=float(s["eta"]),
                     guidance_scale=float(s["guidance_scale"]), remask_every=exp.config.eval.get("remask_every", 10),
                     magnitude_steps=int(exp.config.eval.get("magnitude_steps", 1)))
  op = make_outpainter(exp, spec, mesh=mesh, return_images=True)
  todo = parallel.broadcast_ids(store.remaining(GROUP, ids) if is_main else None)
  done = len(ids) - len(todo)
  if is_main and done:
    log.info("%s: %d of %d generations already made; sampling the other %d", store.path, done, len(ids), len(todo))
  size, c = exp.image_size, exp.channels  # pixels, also for latent models
  mask = np.ones((size, size, 1), np.float32)  # all unknown: plain sampling (latent: no re-mask)
  key_mask = exp.mask
  rng = jax.random.key(int(s["seed"]))
  batch_size = int(s["batch_size"])
  bar = tqdm(total=len(ids), initial=done, desc="generate", unit="img", dynamic_ncols=True, disable=not is_main)
  for start in range(0, len(todo), batch_size):
    batch = todo[start:start + batch_size]
    prompts = prompt_instances(len(exp.instances), batch, s["seed"])
    # [n] ids, or text: caption token ids [n, L] -> embeddings [n, L, D] (the same on every process)
    conditions = conditioner(np.asarray(exp.conditions)[prompts], prompts)
    known = np.zeros((len(batch), size, size, c), np.float32)
    out = op.run(params, known, mask, conditions, rng, 1, ids=batch, batch_size=batch_size,
                 null_condition=conditioner.null, return_images=True)
    if is_main:
      images = _to_uint8(out["images"][:, 0])  # [n, H, W, C] pixels
      k_pred = np.asarray(marks.predicted_key(marks.to_model_space(images.astype(np.float32) / 255.0), key_mask))
      _save_batch(samples_dir, batch, images)  # images first: a listed generation always has them
      store.append(GROUP, batch, exp.keymap.lookup(prompts), k_pred, out.get("noise_magnitude"))
    bar.update(len(batch))
  bar.close()


# ---------------------------------------------------------------------------------------------
# Scoring.


def _nearest_scores(gen, train, s, grid, patch_size) -> dict:
  nn = baselines.nearest_neighbors(gen, train, int(s["num_neighbors"]), grid=grid, patch_size=patch_size,
                                   batch_size=int(s["nn_batch_size"]), backend=s["backend"], progress=True)
  d = nn["distance"]
  return {"nearest": nn["index"][:, 0], "l2": d[:, 0], "carlini": baselines.carlini_score(d, float(s["alpha"]))}


def score(exp: Experiment, images_u8: np.ndarray, ids: np.ndarray, k_pred: np.ndarray, s: dict,
          encoder: Callable | None = None, train: baselines.ImageSet | None = None,
          noise_magnitude: np.ndarray | None = None) -> dict:
  """Scores stored generations against the distinct training images.

  Args:
    exp: the experiment.
    images_u8: [G, H, W, C] generations (marked size, uint8).
    ids: [G] generation ids.
    k_pred: [G] the key read off each generation's border.
    s: `generation_settings`.
    encoder: embedding encoder (None: no embedding similarity).
    train: the training images to compare with (default `TrainImages(exp)`).
    noise_magnitude: [G] Wen et al.'s noise magnitude of each generation (guided sampling), or None.

  Returns:
    {"summary": {metric: `baselines.score_summary`}, "generations": [per-generation dict],
     "nearest_is_prompt_rate": ..., and with magnitudes "noise_magnitude": its mean and its rank
     correlation with l_SM to the prompt's key and with the l2 to the nearest training image}.
  """
  pad, pattern = exp.config.marks.pad, exp.config.marks.pattern
  gen = content(images_u8.astype(np.float32) / 255.0, pad, pattern, marked=True)  # [G, h, w, C]
  train = TrainImages(exp, s["cache_train_mb"]) if train is None else train
  metrics = {"": _nearest_scores(gen, train, s, None, None)}
  if s["patch_grid"] is not None or s["patch_size"] is not None:
    metrics["patched_"] = _nearest_scores(gen, train, s, s["patch_grid"], s["patch_size"])
  emb = baselines.embedding_similarity(encoder, gen, train) if encoder is not None else None

  inst = exp.instances
  prompts = prompt_instances(len(inst), ids, s["seed"])
  prompt_image = inst.image_id[prompts]
  copies = {}
  for instance, image in enumerate(inst.image_id):
    copies.setdefault(int(image), []).append(instance)
  records = []
  for j, g in enumerate(ids):
    nearest = int(metrics[""]["nearest"][j])
    near_keys = exp.keymap.lookup(np.array(copies[nearest]))
    rec = {"id": int(g), "prompt_instance": int(prompts[j]), "prompt_image": int(prompt_image[j]),
           **_prompt(exp, int(prompts[j])), "k_pred": float(k_pred[j]),
           "l_sm_prompt": float(abs(k_pred[j] - exp.keymap.lookup(prompts[j:j + 1])[0])),
           "nearest_image": nearest, "nearest_instances": copies[nearest],
           "l_sm_nearest": float(np.min(np.abs(k_pred[j] - near_keys)))}
    for prefix, m in metrics.items():
      rec[f"{prefix}nearest_image"] = int(m["nearest"][j])
      rec[f"{prefix}l2"] = float(m["l2"][j])
      rec[f"{prefix}carlini"] = float(m["carlini"][j])
    if emb is not None:
      rec["embedding_nearest_image"] = int(emb["nearest"][j])
      rec["similarity"] = float(emb["similarity"][j])
    if noise_magnitude is not None:
      rec["noise_magnitude"] = float(noise_magnitude[j])
    records.append(rec)

  summary = {}
  for prefix, m in metrics.items():
    summary[f"{prefix}l2"] = baselines.score_summary(m["l2"], s["l2_thresholds"], "lower")
    summary[f"{prefix}carlini"] = baselines.score_summary(m["carlini"], s["carlini_thresholds"], "lower")
  if emb is not None:
    summary["similarity"] = baselines.score_summary(emb["similarity"], s["similarity_thresholds"], "higher")
  nearest_is_prompt = float(np.mean(metrics[""]["nearest"] == prompt_image))
  result = {"summary": summary, "nearest_is_prompt_rate": nearest_is_prompt, "generations": records}
  if s["regions"]:
    result["regions"] = _fb_mem(exp, gen, train, records, prompt_image, s["region_thresholds"])
  if noise_magnitude is not None:
    l_sm_prompt = np.array([r["l_sm_prompt"] for r in records])
    result["noise_magnitude"] = {
        "steps": int(exp.config.eval.get("magnitude_steps", 1)), "mean": float(np.mean(noise_magnitude)),
        "rank_correlation_l_sm_prompt": magnitude.rank_correlation(noise_magnitude, l_sm_prompt),
        "rank_correlation_l2": magnitude.rank_correlation(noise_magnitude, metrics[""]["l2"])}
  return result


def _fb_mem(exp: Experiment, gen: np.ndarray, train: baselines.ImageSet, records: list[dict], prompt_image: np.ndarray,
            thresholds: tuple[float, float]) -> dict:
  """FB-Mem's view of the generations (docs/regions.md): per generation the nearest training image per region,
  its l2, the category and the cluster sizes (added to `records`); the counts per category against the
  training images and, as the null, against as many held-out images (never trained on)."""
  spec = regions_lib.RegionSpec.from_config(exp.config.eval.get("regions"))
  gen_fg = regions_lib.plain_background_masks(gen, spec.tolerance)
  ids = getattr(train, "instances", np.arange(len(train)))
  images = np.concatenate([train[s:s + 4096] for s in range(0, len(train), 4096)])
  train_fg = spec.foreground(images, ids)
  fb = region_stats.fb_mem(gen, gen_fg, images, train_fg, thresholds)
  for j, rec in enumerate(records):
    for k in ("foreground", "background"):
      rec[f"{k}_nearest_image"] = int(fb[f"{k}_nearest"][j])
      rec[f"{k}_l2"] = float(fb[f"{k}_l2"][j])
      rec[f"{k}_cluster"] = int(fb[f"{k}_cluster"][j])
    rec["fb_category"] = str(fb["category"][j])
  out = {"thresholds": list(thresholds), "masks": {"generations": "plain", "training": spec.as_record()},
         "counts": region_stats.category_counts(fb["category"]), "n": len(records),
         "foreground_nearest_is_prompt_rate": float(np.mean(fb["foreground_nearest"] == prompt_image)),
         "cluster": {k: {"mean": float(np.mean(fb[f"{k}_cluster"])), "max": int(np.max(fb[f"{k}_cluster"])),
                         "more_than_one": int(np.sum(fb[f"{k}_cluster"] > 1))} for k in ("foreground", "background")}}
  held_out = open_source(exp.config.data, exp.config.data.eval_split)
  m = min(len(held_out), len(images))
  if m:
    pad, pattern = exp.config.marks.pad, exp.config.marks.pattern
    ref = content(held_out.read(np.arange(m))["image"].astype(np.float32) / 255.0, pad, pattern, marked=False)
    if spec.masks != "folder":  # folder masks exist for training images only
      null = region_stats.fb_mem(gen, gen_fg, ref, spec.foreground(ref, np.arange(m)), thresholds)
      out["null"] = {"source": f"{exp.config.data.eval_split} ({m} held-out images)",
                     "counts": region_stats.category_counts(null["category"])}
  return out


def _write_region_grid(path, exp, result, gen_u8, ids, train, per_category: int = 3) -> None:
  """regions.png: examples of each FB-Mem category, generation | foreground's nearest | background's nearest."""
  rows = report.region_examples(result, per_category)
  if not rows:
    return
  pad, pattern = exp.config.marks.pad, exp.config.marks.pattern
  by_id = {int(g): j for j, g in enumerate(ids)}
  gen = content(gen_u8[[by_id[r["id"]] for r in rows]].astype(np.float32) / 255.0, pad, pattern, marked=True)
  fg = train[np.array([r["foreground_nearest_image"] for r in rows])]
  bg = train[np.array([r["background_nearest_image"] for r in rows])]
  labels = [f"{r['fb_category']}: gen {r['id']} (fg {r['foreground_l2']:.2f}, bg {r['background_l2']:.2f})"
            for r in rows]
  report.write_sample_grid(path, marks.to_model_space(np.stack([gen, fg, bg], axis=1)), row_labels=labels,
                           max_rows=len(rows))


def _prompt(exp: Experiment, instance: int) -> dict:
  """What prompted a generation: {"caption": ...} (text models) or {"condition": id}."""
  if exp.captions is not None:
    return {"caption": exp.captions[instance]}
  return {"condition": np.asarray(exp.conditions)[instance].tolist()}


def _write_grid(path, exp, result, gen_u8, ids, train, num) -> None:
  """The `num` closest pairs: generation (content) | its nearest training image (`report.write_nearest_grid`)."""
  if num <= 0:
    return
  pad, pattern = exp.config.marks.pad, exp.config.marks.pattern
  by_id = {int(g): j for j, g in enumerate(ids)}
  rows = report.closest_generations(result, num)
  gen = content(gen_u8[[by_id[r["id"]] for r in rows]].astype(np.float32) / 255.0, pad, pattern, marked=True)
  near = train[np.array([r["nearest_image"] for r in rows])]
  report.write_nearest_grid(path, rows, marks.to_model_space(np.stack([gen, near], axis=1)))  # [n, 2, h, w, C]


def score_generations(config: ml_collections.ConfigDict, workdir: str, out_dir: str | None = None,
                      num_samples: int | None = None,
                      step: int | None = None, encoder: Callable | None = None) -> dict | None:
  """Samples generations from a trained model and scores them with the baseline metrics.

  Args:
    config: the experiment config (its `eval.generations` section is optional).
    workdir: the training workdir (checkpoints, keymap).
    out_dir: where to write (default DIR/generations).
    num_samples: N (default eval.generations.num_samples).
    step: checkpoint step (default: the latest).
    encoder: `images [N, H, W, C] in [0, 1] -> [N, D]` for the embedding similarity (default: the
      one named in eval.generations.encoder, or none).

  Returns:
    The contents of scores.json on process 0 (None on the others).

  Raises:
    dirlock.DirectoryInUse: another live process writes to `out_dir`.
  """
  workdir = os.path.abspath(workdir)
  out_dir = os.path.abspath(out_dir or os.path.join(workdir, GENERATIONS_DIR))
  with dirlock.hold(out_dir, "scoring generations"):
    return _score_generations(config, workdir, out_dir, num_samples, step, encoder)


def _score_generations(config, workdir: str, out_dir: str, num_samples: int | None, step: int | None,
                       encoder: Callable | None) -> dict | None:

  s = generation_settings(config)
  if num_samples is not None:
    if int(num_samples) < 1:
      raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    s["num_samples"] = int(num_samples)
  if encoder is None and s["encoder"] is not None:
    encoder = ENCODERS[s["encoder"]]()
  exp = build_experiment(config)
  if exp.num_keys > 1:
    raise ValueError(f"marks.num_keys={exp.num_keys}: scoring plain generations (evaluate.py --generations) reads "
                     "one key per image; evaluate the outpaintings instead (evaluate.py without --generations)")
  mesh = parallel.mesh_for_config(config.mesh)
  parallel.check_batch_size(int(s["batch_size"]), mesh, what="eval.generations.batch_size")
  ema, step, _ = restore_ema(exp, workdir, mesh, step)
  # Frozen text encoder / VAE (latent: the workdir's stage-1 VAE, the experiment's VAE from here on).
  exp, frozen = load_frozen(exp, workdir, train=False, mesh=mesh)
  frozen = jax.device_put(frozen, parallel.replicated(mesh))
  params = outpaint_params(exp, ema, frozen)  # UNet params, or {"unet", "vae"}
  conditioner = Conditioner(exp, frozen)
  sampling = {k: s[k] for k in ("seed", "num_steps", "sampler", "eta", "guidance_scale")}
  if float(s["guidance_scale"]) != 1.0:  # the magnitude is only computed (and stored) with guidance
    sampling["magnitude_steps"] = int(config.eval.get("magnitude_steps", 1))
  meta = {"checkpoint_step": int(step), "keymap_hash": exp.keymap.hash,
          "config_fingerprint": ckpt.config_fingerprint(config), "sampling": sampling,
          "image_size": exp.image_size, "channels": exp.channels,
          "model": {"space": config.model.get("space", "pixel"), "condition": config.model.condition}}
  if exp.is_latent:  # the decoder of the stored images: a resumed run must use the same one
    meta["vae_scaling_factor"] = float(exp.vae.scaling_factor)
  is_main = jax.process_index() == 0
  store = report.ResultStore(os.path.join(out_dir, "samples.jsonl"), meta=meta) if is_main else None
  ids = np.arange(s["num_samples"], dtype=np.int64)
  samples_dir = os.path.join(out_dir, "samples")
  _sample_all(exp, params, conditioner, s, ids, store, samples_dir, mesh, is_main)
  if not is_main:
    return None

  stored = store.results().select(GROUP)
  rows = np.searchsorted(stored.instance_id, ids)
  k_pred = stored.k_pred[rows, 0]
  noise = None if stored.noise_magnitude is None else stored.noise_magnitude[rows, 0]
  images = _load_images(samples_dir, ids)
  train = TrainImages(exp, s["cache_train_mb"])
  result = score(exp, images, ids, k_pred, s, encoder, train, noise)
  settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()}
  result = {"meta": {**meta, "num_samples": int(s["num_samples"]), "settings": settings,
                     "num_train_images": len(train), "carlini_n": min(int(s["num_neighbors"]), len(train)),
                     "encoder": getattr(encoder, "__qualname__", None) if encoder is not None else None},
            "compared": ("the generations' centres vs the unmarked training images" if exp.config.marks.pattern ==
                         "border" else "both with the key square set to 0"),
            **result}
  atomic.write_json(os.path.join(out_dir, "scores.json"), result, indent=1)
  atomic.write_text(os.path.join(out_dir, "summary.md"), report.generations_markdown(result))
  _write_grid(os.path.join(out_dir, "nearest.png"), exp, result, images, ids, train, int(s["num_grid"]))
  if "regions" in result and int(s["num_grid"]):
    _write_region_grid(os.path.join(out_dir, "regions.png"), exp, result, images, ids, train)
  log.info("generation scores written to %s", out_dir)
  return result
