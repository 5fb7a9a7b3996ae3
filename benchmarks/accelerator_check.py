"""The accelerator check: SD 2.1-sized training and latent outpainting, ours and PyTorch diffusers, one run.

  benchmarks/accelerator_check.sh                 # on the GPU host (see that script for the wheels)
  python benchmarks/accelerator_check.py --smoke  # anywhere: a tiny model end to end (the test suite runs it)

Measures, on the first device JAX sees (meant for one GPU; budget: under 6 minutes):

1. the dense bf16 (and fp32) matmul rate, 8192^3 under XLA (and PyTorch): the peak MFU is taken against;
2. the train step of a UNet with SD 2.1's architecture (configs/sd21_pretrain.py: 865.9M parameters,
   text conditioning of 77 x 1024, 32 x 32 x 4 latents of 256 px images), `model.dtype` float32 and
   bfloat16 (fp32 master weights, AdamW, EMA; `training.step.make_train_step`): images/s, FLOPs per
   step from XLA's cost analysis, MFU = achieved FLOP/s / measured bf16 matmul rate, peak memory;
3. latent outpainting (outpaint/latent.py with an SD 2.1-sized VAE, classifier-free guidance, a
   VAE re-mask every `--remask-every` steps), bf16, keys/s at each batch of `--outpaint-batches`,
   the best reported;
4. the same work in PyTorch diffusers (`UNet2DConditionModel`, `AutoencoderKL`, fp32 and bf16
   autocast training with fp32 weights; the outpainting loop with the same UNet and VAE calls),
   where torch is installed;
5. memory, from compilation alone (nothing more runs): the bf16 train step's compiled temporaries at
   two batches, so per image, and the largest batch that fits the device's memory; the same step under
   `train.remat` "nothing_saveable"; the largest outpainting batch from the peaks of section 3.

Weights are random (speed does not depend on them). Sections that would start after `--budget-s`
are skipped and recorded as such. The JSON (default benchmarks/results/accelerator_check.json) is
written after every section, so a run cut off keeps what it measured; a table is printed at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_remat import SMOKE as SMOKE_UNET_SHAPE, model_config  # noqa: E402  pylint: disable=g-import-not-at-top
from sd21_flops import SD21_VAE, SMOKE_VAE  # noqa: E402  pylint: disable=g-import-not-at-top


SECTIONS = ("matmul", "train", "outpaint", "memory")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--train-batch", type=int, default=16, help="train step batch (images)")
  p.add_argument("--outpaint-batches", type=int, nargs="+", default=[16, 64], help="outpainting batches tried")
  p.add_argument("--outpaint-steps", type=int, default=20, help="sampling steps per key")
  p.add_argument("--remask-every", type=int, default=10, help="VAE re-mask every s steps (paper: 10)")
  p.add_argument("--guidance", type=float, default=3.0)
  p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement, after one warm-up")
  p.add_argument("--matmul", type=int, default=8192, help="side of the square matmul of the peak rate")
  p.add_argument("--budget-s", type=float, default=330.0, help="no section starts after this many seconds")
  p.add_argument("--only", choices=("all", "jax"), default="all", help="'jax' skips PyTorch")
  p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                 help="what to measure (default: everything; e.g. a rerun of what the budget skipped)")
  p.add_argument("--out", help="JSON output (default: benchmarks/results/accelerator_check.json; "
                 "with --smoke, benchmarks/results/smoke/, git-ignored)")
  p.add_argument("--smoke", action="store_true", help="a tiny SD-shaped model, batch 2, one repeat (any CPU)")
  args = p.parse_args(argv)
  args.out = args.out or os.path.join(ROOT, "benchmarks", "results", *["smoke"] * args.smoke, "accelerator_check.json")
  if args.smoke:
    args.train_batch, args.outpaint_batches, args.outpaint_steps, args.remask_every = 2, [2], 2, 1
    args.repeats, args.matmul = 1, 128
  return args


def med_time(fn, repeats: int) -> tuple[float, list[float]]:
  """Median seconds of `repeats` calls of fn (which blocks until done), after one warm-up call."""
  fn()
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts), ts


class Budget:
  def __init__(self, seconds: float):
    self.t0, self.seconds, self.skipped = time.perf_counter(), seconds, []

  def elapsed(self) -> float:
    return time.perf_counter() - self.t0

  def allows(self, section: str) -> bool:
    if self.elapsed() > self.seconds:
      self.skipped.append(section)
      print(f"[{self.elapsed():6.1f} s] skipped {section}: past the {self.seconds:.0f} s budget", flush=True)
      return False
    print(f"[{self.elapsed():6.1f} s] {section}", flush=True)
    return True


def shapes(smoke: bool) -> dict:
  """Model configs and sizes: SD 2.1's (configs/sd21_pretrain.py) or the tiny SD-shaped smoke model."""
  from configs import sd21_pretrain  # pylint: disable=g-import-not-at-top
  if smoke:
    cfg, model_cfg = model_config(SMOKE_UNET_SHAPE)
    return {"cfg": cfg, "model": model_cfg, "vae": SMOKE_VAE, "latent": SMOKE_UNET_SHAPE["latent"],
            "tokens": SMOKE_UNET_SHAPE["tokens"]}
  cfg = sd21_pretrain.get_config()
  return {"cfg": cfg, "model": cfg.model, "vae": SD21_VAE, "latent": 32, "tokens": cfg.text.max_length}


def random_params(abstract, seed: int = 0):
  """Parameters of the given shapes on the default device, filled at random in one small program.

  Kernels and embeddings ~ N(0, 0.02^2), norm scales 1, biases 0: speed does not depend on values,
  and this compiles in a second where a jitted `init` of the whole model takes a minute.
  """
  import jax
  import jax.numpy as jnp
  from flax.traverse_util import flatten_dict, unflatten_dict

  flat = flatten_dict(abstract)

  def fill(key):
    out = {}
    for i, (path, leaf) in enumerate(sorted(flat.items())):
      if path[-1] == "scale":
        out[path] = jnp.ones(leaf.shape, leaf.dtype)
      elif path[-1] == "bias":
        out[path] = jnp.zeros(leaf.shape, leaf.dtype)
      else:
        out[path] = 0.02 * jax.random.normal(jax.random.fold_in(key, i), leaf.shape, leaf.dtype)
    return unflatten_dict(out)

  return jax.jit(fill)(jax.random.key(seed))


def device_peak_bytes():
  import jax
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def device_limit_bytes():
  """The memory the allocator may use on the first device (None where the backend does not say: CPU)."""
  import jax
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def largest_batch(b1: int, bytes1: float, b2: int, bytes2: float, limit: float | None,
                  fill: float = 0.9) -> int | None:
  """The largest batch whose bytes fit `fill` of `limit`, on the line through (b1, bytes1), (b2, bytes2)."""
  if not limit or b2 == b1 or bytes2 <= bytes1:
    return None
  per = (bytes2 - bytes1) / (b2 - b1)
  return max(int((fill * limit - (bytes1 - per * b1)) // per), 0)


# ---------------------------------------------------------------------------------------------
# JAX


def jax_matmul(n: int, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  out = {}
  for name, dtype in (("bfloat16", jnp.bfloat16), ("float32", jnp.float32)):
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    mm = jax.jit(lambda a, b: a @ b)
    t, _ = med_time(lambda: mm(a, a).block_until_ready(), repeats)
    out[name] = 2 * n**3 / t / 1e12
  return out  # TFLOP/s


def train_setup(sh: dict, dtype: str, remat: str = "none"):
  """(train step, optimizer, abstract parameters, condition width) of the SD-shaped UNet."""
  import jax
  import jax.numpy as jnp
  from solidmark_jax import models
  from solidmark_jax.diffusion import make_schedule
  from solidmark_jax.training.state import init_state, make_optimizer
  from solidmark_jax.training.step import make_train_step

  cfg, side, L = sh["cfg"], sh["latent"], sh["tokens"]
  model_cfg = sh["model"].copy_and_resolve_references()
  model_cfg.dtype = dtype
  model = models.build(model_cfg, side, 4, 0)
  D = model.cross_attention_dim
  tx = make_optimizer(cfg.train)
  abstract = models.abstract_params(model, side, 4)
  null = jnp.zeros((L, D), jnp.float32)
  step = make_train_step(models.as_denoiser(models.with_remat(model, remat)),
                         make_schedule(cfg.diffusion.schedule, cfg.diffusion.num_steps), tx,
                         ema_decay=cfg.train.ema_decay, cond_dropout=cfg.train.cond_dropout,
                         prepare=lambda frozen, b, r: (b["image"], b["condition"], null))
  return step, tx, abstract, D


def jax_train_memory(sh: dict, batches: list[int], remat: str = "none", dtype: str = "bfloat16") -> dict:
  """Compiled memory of the train step at each batch (lowered from shapes: nothing is allocated or run)."""
  import jax
  import jax.numpy as jnp
  from solidmark_jax.training.state import init_state

  step, tx, abstract, D = train_setup(sh, dtype, remat)
  state = jax.eval_shape(lambda p: init_state(p, tx), abstract)
  side, L = sh["latent"], sh["tokens"]
  rows = {}
  for b in batches:
    batch = {"image": jax.ShapeDtypeStruct((b, side, side, 4), jnp.float32),
             "condition": jax.ShapeDtypeStruct((b, L, D), jnp.float32)}
    t0 = time.perf_counter()
    mem = jax.jit(step, donate_argnums=(0,)).lower(state, batch, jax.random.key(0)).compile().memory_analysis()
    rows[b] = {"temp_bytes": int(mem.temp_size_in_bytes), "argument_bytes": int(mem.argument_size_in_bytes),
               "compile_s": time.perf_counter() - t0}
  (b1, r1), (b2, r2) = sorted(rows.items())[0], sorted(rows.items())[-1]
  limit = device_limit_bytes()
  return {"dtype": dtype, "remat": remat, "batches": {str(b): r for b, r in rows.items()},
          "temp_bytes_per_image": (r2["temp_bytes"] - r1["temp_bytes"]) / (b2 - b1) if b2 > b1 else None,
          "device_limit_bytes": limit,
          "largest_batch": largest_batch(b1, r1["temp_bytes"] + r1["argument_bytes"], b2,
                                         r2["temp_bytes"] + r2["argument_bytes"], limit)}


def jax_train(sh: dict, dtype: str, batch: int, repeats: int, peak_tflops: float) -> dict:
  import jax
  from solidmark_jax.training.state import init_state

  side, L = sh["latent"], sh["tokens"]
  step, tx, abstract, D = train_setup(sh, dtype)
  params = random_params(abstract)
  n_params = sum(a.size for a in jax.tree.leaves(params))
  state = jax.jit(lambda p: init_state(p, tx))(params)
  del params
  key = jax.random.key(1)
  b = {"image": jax.random.normal(key, (batch, side, side, 4)), "condition": jax.random.normal(key, (batch, L, D))}
  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0,)).lower(state, b, key).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan")))
  mem = compiled.memory_analysis()
  holder = {"state": state}

  def run():
    holder["state"], m = compiled(holder["state"], b, key)
    jax.block_until_ready(m)

  t, ts = med_time(run, repeats)
  return {"dtype": dtype, "batch": batch, "params": int(n_params), "compile_s": compile_s, "median_s": t,
          "times_s": ts, "images_per_s": batch / t, "flops_per_step": flops, "tflops": flops / t / 1e12,
          "mfu_vs_bf16_matmul": flops / t / 1e12 / peak_tflops, "temp_bytes": int(mem.temp_size_in_bytes),
          "argument_bytes": int(mem.argument_size_in_bytes), "device_peak_bytes": device_peak_bytes()}


def jax_outpaint(sh: dict, batch: int, args, dtype: str = "bfloat16") -> dict:
  import jax
  import numpy as np
  from solidmark_jax import marks, models
  from solidmark_jax.diffusion import make_schedule
  from solidmark_jax.models._diffusers import FlaxAutoencoderKL
  from solidmark_jax.models.vae import VAE, abstract_vae_params
  from solidmark_jax.outpaint import SamplerSpec, make_latent_outpaint_fn

  cfg, side, L = sh["cfg"], sh["latent"], sh["tokens"]
  model_cfg = sh["model"].copy_and_resolve_references()
  model_cfg.dtype = dtype
  model = models.build(model_cfg, side, 4, 0)
  D = model.cross_attention_dim
  factor = 2 ** (len(sh["vae"]["block_out_channels"]) - 1)
  px = side * factor
  vae = VAE(FlaxAutoencoderKL(sample_size=px, **sh["vae"]), 0.18215, dtype=dtype)
  params = {"unet": random_params(models.abstract_params(model, side, 4)),
            "vae": random_params(abstract_vae_params(vae, px, 3), seed=1)}
  rs = np.random.default_rng(0)
  pad = max(px // 16, 1)
  null = np.zeros((L, D), np.float32)
  op = make_latent_outpaint_fn(models.as_denoiser(model), make_schedule(cfg.diffusion.schedule,
                                                                       cfg.diffusion.num_steps), vae,
                               SamplerSpec(num_steps=args.outpaint_steps, remask_every=args.remask_every,
                                           guidance_scale=args.guidance))
  known = rs.uniform(-1, 1, (batch, px, px, 3)).astype(np.float32)
  conds = rs.normal(size=(batch, L, D)).astype(np.float32)
  mask = marks.key_mask(px, px, pad)
  ids = np.arange(batch, dtype=np.int32)
  t0 = time.perf_counter()
  run = lambda: jax.block_until_ready(op(params, known, mask, conds, jax.random.key(2), ids=ids,
                                                 null_condition=null)["k_pred"])
  run()
  compile_s = time.perf_counter() - t0
  t, ts = med_time(run, args.repeats)
  return {"dtype": dtype, "batch": batch, "steps": args.outpaint_steps, "remask_every": args.remask_every,
          "guidance": args.guidance, "image_px": px, "first_call_s": compile_s, "median_s": t, "times_s": ts,
          "keys_per_s": batch / t, "unet_rows_per_s": batch * 2 * args.outpaint_steps / t,
          "device_peak_bytes": device_peak_bytes()}


# ---------------------------------------------------------------------------------------------
# PyTorch diffusers


def torch_models(sh: dict, device):
  import torch
  from diffusers import AutoencoderKL, UNet2DConditionModel
  from solidmark_jax import models

  model = models.build(sh["model"], sh["latent"], 4, 0)
  unet = UNet2DConditionModel(cross_attention_dim=model.cross_attention_dim, norm_num_groups=32,
                              **model.unet_kwargs).to(device)
  vae = AutoencoderKL(**{k: v for k, v in sh["vae"].items()}).to(device).eval()
  torch.manual_seed(0)
  return unet, vae, model.cross_attention_dim


def torch_sync(device):
  import torch
  if device.type == "cuda":
    torch.cuda.synchronize()


def torch_peak(device):
  import torch
  return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def torch_train(sh: dict, dtype: str, batch: int, repeats: int, device) -> dict:
  """AdamW step of diffusers' UNet: fp32, or bf16 autocast with fp32 weights (mixed precision)."""
  import torch
  import torch.nn.functional as F
  unet, _, D = torch_models(sh, device)
  unet.train()
  opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
  ema = [p.detach().clone() for p in unet.parameters()]
  side, L = sh["latent"], sh["tokens"]
  x0 = torch.randn(batch, 4, side, side, device=device)
  ctx = torch.randn(batch, L, D, device=device)

  def step():
    t = torch.randint(0, 1000, (batch,), device=device)
    eps = torch.randn_like(x0)
    x_t = 0.7 * x0 + 0.7 * eps
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      pred = unet(x_t, t, ctx).sample
    loss = F.mse_loss(pred.float(), eps)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, [p.detach() for p in unet.parameters()], 1e-4)
    torch_sync(device)

  t, ts = med_time(step, repeats)
  out = {"dtype": dtype, "batch": batch, "median_s": t, "times_s": ts, "images_per_s": batch / t,
         "device_peak_bytes": torch_peak(device)}
  del unet, opt, ema
  return out


def torch_outpaint(sh: dict, batch: int, args, device) -> dict:
  """The same calls as our latent loop: guided UNet (2 rows per image) every step, DDIM, a decode /
  re-mask / re-encode every `remask_every` steps, one encode and one decode per key; bf16 autocast."""
  import torch
  unet, vae, D = torch_models(sh, device)
  unet.eval()
  side, L = sh["latent"], sh["tokens"]
  factor = 2 ** (len(sh["vae"]["block_out_channels"]) - 1)
  px = side * factor
  known = torch.rand(batch, 3, px, px, device=device) * 2 - 1
  mask = torch.zeros(1, 1, px, px, device=device)
  pad = max(px // 16, 1)
  mask[..., :pad, :] = mask[..., -pad:, :] = mask[..., :, :pad] = mask[..., :, -pad:] = 1
  ctx = torch.cat([torch.randn(batch, L, D, device=device), torch.zeros(batch, L, D, device=device)])
  abar = torch.linspace(0.9991, 0.0047, 1000, device=device)
  ts = torch.linspace(999, 0, args.outpaint_steps, device=device).round().long()

  def run():
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
      z_known = vae.encode(known).latent_dist.mean * 0.18215
      z = torch.randn_like(z_known)
      for i, t in enumerate(ts):
        eps_c, eps_u = unet(torch.cat([z, z]), t.expand(2 * batch), ctx).sample.float().chunk(2)
        eps = eps_u + args.guidance * (eps_c - eps_u)
        a = abar[t]
        z0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
        if args.remask_every and i % args.remask_every == args.remask_every - 1:
          x = vae.decode(z0 / 0.18215).sample.clamp(-1, 1)
          z0 = vae.encode(mask * x + (1 - mask) * known).latent_dist.mean * 0.18215
        a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, device=device)
        z = a_prev.sqrt() * z0 + (1 - a_prev).sqrt() * eps
      x = vae.decode(z / 0.18215).sample.clamp(-1, 1)
      k = ((x * mask).sum((1, 2, 3)) / (mask.sum() * 3) + 1) / 2
    torch_sync(device)
    return k

  t, times = med_time(run, args.repeats)
  return {"dtype": "bfloat16 autocast", "batch": batch, "median_s": t, "times_s": times, "keys_per_s": batch / t,
          "unet_rows_per_s": batch * 2 * args.outpaint_steps / t, "device_peak_bytes": torch_peak(device)}


def torch_matmul(n: int, repeats: int, device) -> dict:
  import torch
  out = {}
  for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
    a = torch.randn(n, n, device=device, dtype=dtype)

    def mm():
      a @ a
      torch_sync(device)

    t, _ = med_time(mm, repeats)
    out[name] = 2 * n**3 / t / 1e12
  return out


# ---------------------------------------------------------------------------------------------


def main(argv=None):
  args = parse_args(argv)
  os.environ.setdefault("USE_TF", "0")
  budget = Budget(args.budget_s)
  import jax
  import numpy as np
  result = {"args": vars(args), "smoke": args.smoke, "python": platform.python_version(),
            "backend": jax.default_backend(), "device": str(jax.local_devices()[0].device_kind),
            "jax": jax.__version__, "sections": {}, "skipped": budget.skipped}
  with_torch = args.only == "all" and importlib.util.find_spec("torch") is not None
  if args.only == "all" and not with_torch:
    print("torch is not installed: the PyTorch side is skipped", flush=True)
  device = None
  if with_torch:
    import torch
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result["torch"] = torch.__version__
    result["torch_device"] = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
  sec = result["sections"]
  sh = shapes(args.smoke)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

  def save():  # after every section: a run cut off keeps what it measured
    result["elapsed_s"] = budget.elapsed()
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1, default=lambda o: float(o) if isinstance(o, np.floating) else str(o))

  print(f"backend {result['backend']} ({result['device']}), jax {jax.__version__}, python {result['python']}",
        flush=True)

  if "matmul" in args.sections and budget.allows("matmul"):
    sec["matmul_tflops"] = {"jax": jax_matmul(args.matmul, args.repeats)}
    if with_torch:
      sec["matmul_tflops"]["torch"] = torch_matmul(args.matmul, args.repeats, device)
    save()
  peak = sec.get("matmul_tflops", {}).get("jax", {}).get("bfloat16", float("nan"))
  sec["train"] = {}
  for dtype in ("bfloat16", "float32") if "train" in args.sections else ():
    if budget.allows(f"train jax {dtype}"):
      sec["train"][f"jax_{dtype}"] = jax_train(sh, dtype, args.train_batch, args.repeats, peak)
      save()
  sec["outpaint"] = {}
  for b in args.outpaint_batches if "outpaint" in args.sections else ():
    if budget.allows(f"outpaint jax batch {b}"):
      sec["outpaint"][f"jax_{b}"] = jax_outpaint(sh, b, args)
      save()
  if with_torch:
    for dtype in ("bfloat16", "float32") if "train" in args.sections else ():
      if budget.allows(f"train torch {dtype}"):
        sec["train"][f"torch_{dtype}"] = torch_train(sh, dtype, args.train_batch, args.repeats, device)
        save()
    for b in args.outpaint_batches if "outpaint" in args.sections else ():
      if budget.allows(f"outpaint torch batch {b}"):
        sec["outpaint"][f"torch_{b}"] = torch_outpaint(sh, b, args, device)
        save()
  sec["outpaint_best"] = {}
  for fw in ("jax", "torch"):
    rows = [v for k, v in sec["outpaint"].items() if k.startswith(fw)]
    if rows:
      sec["outpaint_best"][fw] = best = max(rows, key=lambda r: r["keys_per_s"])
      lo, hi = min(rows, key=lambda r: r["batch"]), max(rows, key=lambda r: r["batch"])
      best["largest_batch"] = largest_batch(lo["batch"], lo["device_peak_bytes"] or 0, hi["batch"],
                                            hi["device_peak_bytes"] or 0, device_limit_bytes())
  sec["memory"] = {}
  batches = [args.train_batch, 2 * args.train_batch]
  for remat in ("none", "nothing_saveable") if "memory" in args.sections else ():
    if budget.allows(f"memory train bf16 remat {remat}"):
      sec["memory"][f"train_bfloat16_{remat}"] = jax_train_memory(sh, batches, remat)
      save()
  save()
  table(result)
  print(f"wrote {args.out} ({result['elapsed_s']:.0f} s)")
  return result


def table(result: dict) -> None:
  sec = result["sections"]
  gib = lambda b: f"{b / 2**30:.1f}" if b else "-"
  print("\n| measurement | JAX (ours) | PyTorch diffusers |\n|---|---|---|")
  mm = sec.get("matmul_tflops", {})
  for dt in ("bfloat16", "float32"):
    print(f"| matmul {dt}, TFLOP/s | {mm.get('jax', {}).get(dt, float('nan')):.1f} | "
          f"{mm.get('torch', {}).get(dt, float('nan')):.1f} |")
  for dt in ("float32", "bfloat16"):
    j, t = sec["train"].get(f"jax_{dt}"), sec["train"].get(f"torch_{dt}")
    jt = f"{j['images_per_s']:.1f} img/s, MFU {j['mfu_vs_bf16_matmul']:.2f}, peak {gib(j['device_peak_bytes'])} GiB" \
        if j else "skipped"
    tt = f"{t['images_per_s']:.1f} img/s, peak {gib(t['device_peak_bytes'])} GiB" if t else "skipped"
    print(f"| train step {dt} | {jt} | {tt} |")
  best = sec.get("outpaint_best", {})
  fmt = lambda r: f"{r['keys_per_s']:.2f} keys/s at batch {r['batch']}, peak {gib(r['device_peak_bytes'])} GiB" \
      if r else "skipped"
  print(f"| latent outpainting (bf16) | {fmt(best.get('jax'))} | {fmt(best.get('torch'))} |")
  for name, m in sec.get("memory", {}).items():
    per = m["temp_bytes_per_image"]
    print(f"| {name}: compiled temporaries per image, largest batch | "
          f"{'-' if per is None else f'{per / 2**20:.1f} MiB'}, {m['largest_batch'] or '-'} | |")
  if result["skipped"]:
    print(f"skipped (time budget): {result['skipped']}")
  if result["smoke"]:
    print(f"smoke mode: a {result['args']['matmul']}^3 matmul, far below any chip's peak, so MFU against it "
          "means nothing; it checks the script, the real run measures")


if __name__ == "__main__":
  main()
