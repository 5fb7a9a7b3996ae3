"""Loads one of our exports with today's PyTorch stack and compares it with our outputs.

Runs in a SEPARATE virtualenv with torch, diffusers >= 0.40 and transformers >= 5 (no Flax, no
JAX; `.ci/modern_stack.sh` builds it), never in the project's own:

  $SOLIDMARK_MODERN_VENV/bin/python tests/export_check/modern_check.py EXPORT_DIR CASE.npz BOUNDS.json OUT.json [RESAVE_DIR]

EXPORT_DIR is what `python export.py` wrote. CASE.npz holds the inputs and our
(JAX) outputs on them, written by tests/test_export_modern.py: `x_t` [B, H, W, C], `t` [B], the
condition (`cond_ids` [B] for table models, `token_ids` [B, L] for text models), our `unet_out`
(eps, or v for a v-prediction model), `unet_out_exact_gelu` (the same with diffusers' Flax GEGLU
computing the exact GELU instead of its tanh approximation), `abar` [T]; for text models `hidden` [B, L, D] and the
`captions` with our `caption_ids`; for latent models `images` [B, H, W, C], our `latent_mean` and
`decoded`; for v models `eps_from_v` (our v -> eps conversion of `unet_out`). BOUNDS.json holds
the largest absolute differences allowed (`unet`, `unet_exact_gelu`, `text`, `vae_encode`,
`vae_decode`).

Everything is loaded with plain `from_pretrained` (the whole StableDiffusionPipeline for a text
model). Writes OUT.json with every measured difference; exits 1 when one exceeds its bound. With
RESAVE_DIR, the loaded PyTorch models are saved there again by PyTorch's own `save_pretrained` (a
hub-style folder: PyTorch safetensors and PyTorch-written configs only), for our import to read back.
"""

import json
import os
import sys

import numpy as np
import torch


def nchw(a):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2))))


def nhwc(t):
  return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def max_abs(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def main(export_dir, case_path, bounds_path, out_path, resave_dir=None):
  import diffusers
  import transformers
  from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
  torch.manual_seed(0)
  case = dict(np.load(case_path, allow_pickle=False))
  with open(bounds_path, encoding="utf-8") as f:
    bounds = json.load(f)
  with open(os.path.join(export_dir, "export.json"), encoding="utf-8") as f:
    info = json.load(f)
  report = {"versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__},
            "space": info["space"], "condition": info["condition"], "prediction_type": info["prediction_type"],
            "bounds": bounds, "max_abs_diff": {}, "checks": {}}
  diff, checks = report["max_abs_diff"], report["checks"]

  if os.path.isfile(os.path.join(export_dir, "model_index.json")):  # a Stable Diffusion pipeline
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(export_dir, safety_checker=None)
    unet, vae, text_encoder, tokenizer, scheduler = (pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                                                     pipe.scheduler)
    checks["pipeline_class"] = type(pipe).__name__
  else:
    unet = UNet2DConditionModel.from_pretrained(os.path.join(export_dir, "unet"))
    scheduler = DDIMScheduler.from_pretrained(export_dir, subfolder="scheduler")
    vae = text_encoder = tokenizer = None
    if os.path.isdir(os.path.join(export_dir, "vae")):
      vae = AutoencoderKL.from_pretrained(os.path.join(export_dir, "vae"))
  # Every weight in place: loading again with the loading report (no missing, no unexpected keys).
  _, unet_info = UNet2DConditionModel.from_pretrained(os.path.join(export_dir, "unet"), output_loading_info=True)
  checks["unet_loading"] = {k: list(v) for k, v in unet_info.items() if v}
  for m in (unet, vae, text_encoder):
    if m is not None:
      m.eval()

  with torch.no_grad():
    if "token_ids" in case:
      from transformers import CLIPTextModel
      _, te_info = CLIPTextModel.from_pretrained(os.path.join(export_dir, "text_encoder"), output_loading_info=True)
      checks["text_encoder_loading"] = {k: list(v) for k, v in te_info.items() if v}
      hidden = text_encoder(torch.from_numpy(case["token_ids"].astype(np.int64))).last_hidden_state
      diff["text"] = max_abs(hidden.numpy(), case["hidden"])
      captions = [str(c) for c in case["captions"]]
      ids = tokenizer(captions, padding="max_length", max_length=case["caption_ids"].shape[1], truncation=True,
                      return_tensors="np").input_ids
      checks["tokenizer_ids_equal"] = bool(np.array_equal(ids, case["caption_ids"]))
      context = hidden
    else:
      table = np.load(os.path.join(export_dir, "condition_embedding.npz"))["embedding"]
      context = torch.from_numpy(table[case["cond_ids"]][:, None, :].astype(np.float32))  # [B, 1, D]
    out = unet(nchw(case["x_t"]), torch.from_numpy(case["t"].astype(np.int64)), context).sample
    diff["unet"] = max_abs(nhwc(out), case["unet_out"])
    if "unet_out_exact_gelu" in case:  # ours with GEGLU's exact GELU, as PyTorch computes it
      diff["unet_exact_gelu"] = max_abs(nhwc(out), case["unet_out_exact_gelu"])
    report["unet_out_scale"] = float(np.abs(case["unet_out"]).mean())

    if vae is not None and "images" in case:
      _, vae_info = AutoencoderKL.from_pretrained(os.path.join(export_dir, "vae"), output_loading_info=True)
      checks["vae_loading"] = {k: list(v) for k, v in vae_info.items() if v}
      mean = vae.encode(nchw(case["images"])).latent_dist.mean
      diff["vae_encode"] = max_abs(nhwc(mean), case["latent_mean"])
      decoded = vae.decode(nchw(case["latent_mean"])).sample
      diff["vae_decode"] = max_abs(nhwc(decoded), case["decoded"])
      checks["vae_scaling_factor"] = float(vae.config.scaling_factor)

    # The scheduler: our schedule, our prediction type; for v, our v -> eps conversion is diffusers'.
    checks["scheduler_class"] = type(scheduler).__name__
    checks["scheduler_prediction_type"] = scheduler.config.prediction_type
    abar = scheduler.alphas_cumprod.numpy()
    diff["abar"] = max_abs(abar, case["abar"])
    if "eps_from_v" in case:
      t0 = int(case["t"][0])
      x_t, v, eps = (nchw(case[k][:1]) for k in ("x_t", "unet_out", "eps_from_v"))
      as_v = DDIMScheduler.from_config(scheduler.config, prediction_type="v_prediction")
      as_eps = DDIMScheduler.from_config(scheduler.config, prediction_type="epsilon")
      for s in (as_v, as_eps):
        s.set_timesteps(10)
      step_v = as_v.step(v, t0, x_t).prev_sample
      step_eps = as_eps.step(eps, t0, x_t).prev_sample
      diff["v_to_eps_ddim_step"] = max_abs(step_v.numpy(), step_eps.numpy())

  failed = [k for k, b in bounds.items() if k in diff and not diff[k] <= b]
  if diff.get("abar", 0.0) > 1e-6:
    failed.append("abar")
  if diff.get("v_to_eps_ddim_step", 0.0) > 1e-5:
    failed.append("v_to_eps_ddim_step")
  if checks["scheduler_prediction_type"] != info["prediction_type"]:
    failed.append("scheduler_prediction_type")
  if checks.get("tokenizer_ids_equal") is False:
    failed.append("tokenizer_ids_equal")
  for k in ("unet_loading", "text_encoder_loading", "vae_loading"):
    if checks.get(k):
      failed.append(k)
  if resave_dir:
    for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder), ("scheduler", scheduler)):
      if m is not None:
        m.save_pretrained(os.path.join(resave_dir, name))
    checks["resaved"] = sorted(os.listdir(resave_dir))
  report["failed"] = failed
  with open(out_path, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2, sort_keys=True)
  print(json.dumps(report, indent=2, sort_keys=True))
  return 1 if failed else 0


if __name__ == "__main__":
  if len(sys.argv) not in (5, 6):
    sys.exit(__doc__)
  sys.exit(main(*sys.argv[1:]))
