"""Our JAX UNet paths against a PyTorch diffusers peer: same config, same weights, same steps, fp32, one run.

  pip install -e ".[bench]"     # torch==2.13.0 (CPU wheel); the core install stays torch-free
  python benchmarks/bench_unet.py --config configs/fashion_mnist.py

Measures, medians over `--repeats` timed runs after a warm-up (JAX and PyTorch timed alternately, so
that both see the same machine load):

- outpainting (RePaint replacement, DDIM eta=0, no resampling, `--steps` steps), UNet evaluations/s
  and keys/s of (a) our jitted, vmapped `Outpainter`, (b) a PyTorch diffusers loop that evaluates one
  image at a time with a Python loop per step (how the public SolidMark code evaluates), on
  `--single-images` images, (c) the same PyTorch loop batched at our batch size;
- the UNet forward alone (images/s), both frameworks;
- training images/s of our sharded train step (`training.loop.jit_train_step`: AdamW, clipping, EMA)
  and of a PyTorch step doing the same work (MSE on eps, clipping, AdamW, EMA);
- achieved FLOP/s (FLOPs from XLA's cost analysis) against the measured 2048^2 fp32 matmul peak under
  XLA and under PyTorch.

The PyTorch UNet is diffusers' `UNet2DConditionModel` built from the same config, with our Flax
parameters converted by diffusers' `load_flax_weights_in_pytorch_model`; its eps is compared to ours
on the same input before anything is timed. diffusers' Flax GEGLU uses tanh-approximated GELU and its
PyTorch GEGLU the exact one, so the peer's GEGLU is switched to the tanh form (same speed) to compute
the same function; the difference without that switch is printed too.

Prints a table with the ratios and writes benchmarks/results/<name>.json (with machine info and the
load average at start). `--sweep` instead measures our outpainting throughput and compiled memory per
batch size (no PyTorch needed). `--profile` adds where the train step's time goes: the forward loss,
forward + backward (`value_and_grad`), and the whole step (+ clipping, AdamW, EMA) timed apart, for
both frameworks, and `--trace DIR` writes a `jax.profiler` trace of one JAX step there (TensorBoard's
profile plugin or Perfetto read it).

`--smoke` runs every section once on configs/tiny.py's UNet with tiny batches (the test suite runs
it); without torch installed the PyTorch peer is skipped with a message.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "fashion_mnist.py"),
                 help="experiment config (its model section and image size are benchmarked)")
  p.add_argument("--image-size", type=int, default=None,
                 help="unmarked image side (default: config's data.image_size, else the dataset's native size)")
  p.add_argument("--num-conditions", type=int, default=10, help="rows of the condition table (10 classes)")
  p.add_argument("--batch-size", type=int, default=None, help="outpainting batch (default: the config's eval.batch_size)")
  p.add_argument("--train-batch-size", type=int, default=None, help="training batch (default: the config's train.batch_size)")
  p.add_argument("--steps", type=int, default=10, help="sampling steps per outpainting (same for every path)")
  p.add_argument("--single-images", type=int, default=4, help="images outpainted by the one-image PyTorch loop")
  p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (after one warm-up)")
  p.add_argument("--devices", type=int, default=os.cpu_count(),
                 help="XLA CPU devices (the mesh the batch is sharded over); default: one per core")
  p.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
  p.add_argument("--only", choices=("all", "jax"), default="all", help="'jax' skips the PyTorch peer")
  p.add_argument("--reference-layers", action="store_true",
                 help="run our model with diffusers' own GroupNorm/attention (fast=False) instead of fast_layers")
  p.add_argument("--sweep", default=None,
                 help="comma-separated outpainting batch sizes: throughput and compiled memory of ours only")
  p.add_argument("--name", default=None, help="results/<name>.json (default: <config>_<devices>dev[_sweep])")
  p.add_argument("--out-dir",
                 help="default: benchmarks/results; with --smoke, benchmarks/results/smoke (git-ignored)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="model.dtype of our UNet (compute dtype; the PyTorch peer stays fp32)")
  p.add_argument("--profile", action="store_true",
                 help="time the train step's phases apart: forward loss, forward + backward, whole step")
  p.add_argument("--trace", default=None, help="write a jax.profiler trace of one JAX train step to this folder")
  p.add_argument("--smoke", action="store_true",
                 help="tiny config (configs/tiny.py), batch 4, 2 steps, one repeat: checks the script runs")
  args = p.parse_args(argv)
  if args.smoke:
    args.config = os.path.join(ROOT, "configs", "tiny.py")
    args.batch_size = args.batch_size or 4
    args.train_batch_size = args.train_batch_size or 4
    args.steps, args.repeats, args.single_images = 2, 1, 1
    args.devices = min(args.devices or 2, 2)
    args.profile = True
    args.name = args.name or "smoke"
  args.out_dir = args.out_dir or os.path.join(ROOT, "benchmarks", "results", *["smoke"] * args.smoke)
  return args


def torch_available() -> bool:
  return importlib.util.find_spec("torch") is not None


NATIVE_SIZES = {"fashion_mnist": 28, "mnist": 28, "cifar10": 32, "cifar100": 32, "stl10": 96, "celeb_a": 218}


def load_config(path):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def machine_info() -> dict:
  cpu = platform.processor()
  with contextlib.suppress(OSError):
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
  flags = ""
  with contextlib.suppress(OSError):
    with open("/proc/cpuinfo") as f:
      flags = next((line.split(":", 1)[1] for line in f if line.startswith("flags")), "")
  info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
          "isa": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags.split()],
          "loadavg_start": list(os.getloadavg())}
  with contextlib.suppress(OSError, subprocess.SubprocessError):
    info["git_commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True, check=True).stdout.strip()
  return info


def timed(fn, repeats: int) -> list[float]:
  """Seconds of `repeats` calls of fn (which must block until its work is done)."""
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
  return out


def alternate(fns: dict, repeats: int) -> dict:
  """One warm-up call each, then `repeats` rounds calling every fn once per round; seconds per fn."""
  for fn in fns.values():
    fn()
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      times[k] += timed(fn, 1)
  return times


def med(ts):
  return statistics.median(ts)


# ---------------------------------------------------------------------------------------------
# The PyTorch peer.


def torch_unet(model, flax_params):
  """diffusers' PyTorch UNet2DConditionModel with our converted Flax parameters (eval mode)."""
  import torch
  import torch.nn.functional as F
  import jax
  from diffusers import UNet2DConditionModel
  from diffusers.models.activations import GEGLU
  from diffusers.models.modeling_pytorch_flax_utils import load_flax_weights_in_pytorch_model

  kw = dict(model.unet_kwargs)
  pt = UNet2DConditionModel(cross_attention_dim=model.cross_attention_dim, norm_num_groups=32, **kw)
  unet_params = jax.tree.map(lambda a: jax.device_get(a).copy(), flax_params["unet"])
  n_flax = sum(a.size for a in jax.tree.leaves(unet_params))
  n_torch = sum(p.numel() for p in pt.parameters())
  if n_flax != n_torch:
    raise RuntimeError(f"converted UNet has {n_torch} parameters, ours {n_flax}")
  with warnings.catch_warnings():  # diffusers hands torch read-only numpy views: harmless here
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    pt = load_flax_weights_in_pytorch_model(pt, unet_params).eval()
  geglus = [m for m in pt.modules() if isinstance(m, GEGLU)]
  table = torch.from_numpy(jax.device_get(flax_params["condition_embedding"]["embedding"]).copy())
  embed = torch.nn.Embedding.from_pretrained(table, freeze=False)

  def set_tanh_gelu(on: bool):
    for m in geglus:
      if on:
        m.gelu = lambda gate: F.gelu(gate, approximate="tanh")
      elif "gelu" in m.__dict__:
        del m.gelu

  set_tanh_gelu(True)
  return pt, embed, set_tanh_gelu


class TorchOutpainter:
  """RePaint replacement + DDIM (eta = 0, clipped x0) in PyTorch, as `schedule.ddim_step` computes it."""

  def __init__(self, pt, embed, abar, steps):
    import torch
    self.torch = torch
    self.pt, self.embed = pt, embed
    self.abar = torch.from_numpy(abar.astype("float32"))
    self.steps = [tuple(int(v) for v in row) for row in steps]  # (t_from, t, t_prev), t_from == t (u = 1)

  def _abar(self, t):
    return self.abar[t] if t >= 0 else self.torch.tensor(1.0)

  def ddim(self, x, t, t_prev, eps):
    a, a_prev = self._abar(t), self._abar(t_prev)
    x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
    eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps

  def __call__(self, known, mask, conditions, generator):
    """known [B, C, H, W], mask [1, 1, H, W] (1 = unknown), conditions [B] -> k_pred [B]."""
    torch = self.torch
    with torch.inference_mode():
      ctx = self.embed(conditions)[:, None]  # [B, 1, D]
      x = torch.randn(known.shape, generator=generator)
      for _, t, t_prev in self.steps:
        a = self._abar(t)
        x_known = a.sqrt() * known + (1 - a).sqrt() * torch.randn(known.shape, generator=generator)
        x = mask * x + (1 - mask) * x_known
        tt = torch.full((known.shape[0],), t, dtype=torch.long)
        eps = self.pt(x, tt, ctx).sample
        x = self.ddim(x, t, t_prev, eps)
      x = mask * x + (1 - mask) * known
      region = (x * mask).sum((1, 2, 3)) / mask.sum()
      return (region + 1) / 2


def torch_train_step(pt, embed, abar, train_cfg, null_id):
  """A PyTorch step doing our step's work: q_sample, condition dropout, MSE on eps, clipping, AdamW, EMA."""
  import torch
  import torch.nn.functional as F
  params = list(pt.parameters()) + list(embed.parameters())
  opt = torch.optim.AdamW(params, lr=train_cfg.learning_rate, betas=(0.9, 0.999), weight_decay=train_cfg.weight_decay)
  ema = [p.detach().clone() for p in params]
  abar = torch.from_numpy(abar.astype("float32"))

  def step(x0, cond):
    pt.train()
    b = x0.shape[0]
    t = torch.randint(0, abar.shape[0], (b,))
    eps = torch.randn_like(x0)
    a = abar[t].view(b, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    drop = torch.rand(b) < train_cfg.cond_dropout
    cond = torch.where(drop, torch.full_like(cond, null_id), cond)
    loss = F.mse_loss(pt(x_t, t, embed(cond)[:, None]).sample, eps)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, train_cfg.grad_clip)
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - train_cfg.ema_decay)
    return loss

  return step


# ---------------------------------------------------------------------------------------------


def main(argv=None):
  args = parse_args(argv)
  os.environ.setdefault("USE_TF", "0")  # diffusers/transformers must not import TensorFlow here
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if args.devices and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}").strip()
  info = machine_info()  # load average before anything heavy starts
  sys.path.insert(0, ROOT)

  import jax
  import jax.numpy as jnp
  import jaxlib
  import numpy as np
  import flax
  import optax
  import diffusers
  from types import SimpleNamespace

  from solidmark_jax import marks, models, parallel
  from solidmark_jax.diffusion import make_schedule
  from solidmark_jax.outpaint import SamplerSpec, make_outpaint_fn
  from solidmark_jax.training.loop import jit_train_step
  from solidmark_jax.training.state import create_state
  from solidmark_jax.training.state import make_optimizer

  cfg = load_config(args.config)
  config_name = os.path.splitext(os.path.basename(args.config))[0]
  size = args.image_size or cfg.data.image_size or NATIVE_SIZES.get(cfg.data.name)
  if size is None:
    raise SystemExit(f"--image-size is needed for data.name={cfg.data.name!r}")
  side = marks.marked_size(size, cfg.marks.pad, cfg.marks.pattern)
  ch = cfg.data.channels
  num_cond = 0 if cfg.model.condition == "none" else args.num_conditions
  model = models.build(cfg.model, side, ch, num_cond)
  if args.reference_layers:
    model = model.clone(fast=False)
  model = model.clone(dtype=args.dtype)
  sched = make_schedule(cfg.diffusion.schedule, cfg.diffusion.num_steps)
  mesh = parallel.make_mesh()
  rep, bsh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  params = jax.device_put(models.init_params(model, jax.random.key(0), side, ch), rep)
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
  mask = marks.key_mask(side, side, cfg.marks.pad, cfg.marks.pattern)  # [H, W, 1]
  rs = np.random.RandomState(0)

  def outpaint_inputs(b):
    known = rs.uniform(-1, 1, (b, side, side, ch)).astype(np.float32)
    conds = rs.randint(0, num_cond + 1, b).astype(np.int32)
    return known, conds

  versions = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
              "optax": optax.__version__, "diffusers": diffusers.__version__, "numpy": np.__version__}
  result = {"config": config_name, "args": vars(args), "machine": info, "versions": versions,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax_devices": len(jax.devices()),
            "model": {"block_out_channels": list(cfg.model.block_out_channels), "image": [side, side, ch],
                      "params": n_params, "fast_layers": bool(model.fast),
                      "dtype": model.dtype}}
  print(f"{info['cpu']}, {info['cores']} cores, load {info['loadavg_start'][0]:.2f}; jax {jax.__version__} on "
        f"{len(jax.devices())} CPU devices; model {n_params / 1e6:.2f}M params, {side}x{side}x{ch}", flush=True)

  def forward_fn(b):
    return jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c),
                   in_shardings=(rep, bsh, bsh, bsh), out_shardings=bsh)

  def forward_inputs(b):
    x = rs.randn(b, side, side, ch).astype(np.float32)
    t = rs.randint(0, sched.num_steps, b).astype(np.int32)
    c = rs.randint(0, num_cond + 1, b).astype(np.int32)
    return x, t, c

  def flops_of(compiled):
    """FLOPs of one call over all devices: XLA reports the per-device (SPMD-partitioned) module."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) * mesh.size

  def make_outpainter(b):
    op = make_outpaint_fn(models.as_denoiser(model), sched, SamplerSpec(num_steps=args.steps), mesh=mesh)
    known, conds = outpaint_inputs(b)
    known, conds, ids = parallel.global_batch(mesh, (known, conds, np.arange(b, dtype=np.int32)))
    rng = jax.random.key(1)
    call = lambda: jax.block_until_ready(op(params, known, mask, conds, rng, ids=ids)["k_pred"])
    return op, call, (params, known, jnp.asarray(mask), conds, rng, ids, np.int32(0), None, 1, False)

  # -- sweep mode: ours only, throughput and compiled memory per outpainting batch ---------------
  if args.sweep:
    rows = []
    for b in [int(v) for v in args.sweep.split(",")]:
      op, call, lower_args = make_outpainter(b)
      t0 = time.perf_counter()
      compiled = op._jitted.lower(*lower_args).compile()
      compile_s = time.perf_counter() - t0
      mem = compiled.memory_analysis()
      ts = alternate({"jax": call}, args.repeats)["jax"]
      calls = b * op.num_denoiser_calls
      row = {"batch": b, "median_s": med(ts), "keys_per_s": b / med(ts), "evals_per_s": calls / med(ts),
             "compile_s": compile_s, "devices": mesh.size,
             # per device (the SPMD module): temporaries, arguments (params + its rows), outputs
             "temp_bytes": mem.temp_size_in_bytes, "argument_bytes": mem.argument_size_in_bytes,
             "output_bytes": mem.output_size_in_bytes,
             # process peak RSS so far (batches run in the order given, so ascending order shows growth)
             "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
             "times_s": ts}
      rows.append(row)
      print(f"batch {b:5d}: {row['keys_per_s']:8.2f} keys/s {row['evals_per_s']:8.1f} evals/s  temp "
            f"{mem.temp_size_in_bytes / 2**20:8.1f} MiB/device  args {mem.argument_size_in_bytes / 2**20:6.1f} MiB  "
            f"peak RSS {row['process_peak_rss_bytes'] / 2**20:7.0f} MiB  compile {compile_s:.1f} s", flush=True)
    result["sweep"] = rows
    name = args.name or f"{config_name}_{len(jax.devices())}dev_sweep"
    _write(args.out_dir, name, result)
    return result

  with_torch = args.only == "all" and torch_available()
  if args.only == "all" and not with_torch:
    print("torch is not installed (pip install -e '.[bench]'): the PyTorch peer is skipped", flush=True)
  result["with_torch"] = with_torch
  if with_torch:
    import torch
    if args.torch_threads:
      torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    versions["torch"] = torch.__version__
    result["torch_threads"] = torch.get_num_threads()
    pt, embed, set_tanh_gelu = torch_unet(model, params)
    # Same eps on the same input.
    x, t, c = forward_inputs(4)
    ours = np.asarray(jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))(params, x, t, c))
    ref = models.build(cfg.model, side, ch, num_cond).clone(fast=False)
    ours_ref = np.asarray(jax.jit(lambda p, x, t, c: ref.apply({"params": p}, x, t, c))(params, x, t, c))
    with torch.inference_mode():
      run_pt = lambda: pt(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t).long(),
                          embed(torch.from_numpy(c).long())[:, None]).sample.permute(0, 2, 3, 1).numpy()
      theirs = run_pt()
      set_tanh_gelu(False)
      theirs_exact = run_pt()
      set_tanh_gelu(True)
    result["equality"] = {"max_abs_diff_eps": float(np.abs(ours - theirs).max()),
                          "max_abs_diff_eps_exact_gelu_peer": float(np.abs(ours - theirs_exact).max()),
                          "max_abs_diff_fast_vs_reference_layers": float(np.abs(ours - ours_ref).max()),
                          "max_abs_eps": float(np.abs(ours).max())}
    print(f"converted weights: max |eps_jax - eps_torch| = {result['equality']['max_abs_diff_eps']:.2e} "
          f"(peer with exact GELU: {result['equality']['max_abs_diff_eps_exact_gelu_peer']:.2e}; "
          f"fast_layers vs diffusers' layers: {result['equality']['max_abs_diff_fast_vs_reference_layers']:.2e})",
          flush=True)
    if result["equality"]["max_abs_diff_eps"] > 1e-3:
      raise SystemExit("the converted PyTorch UNet does not compute our eps: refusing to compare speeds")

  # -- matmul peak ------------------------------------------------------------------------------
  n = 256 if args.smoke else 2048
  a = jnp.asarray(rs.randn(n, n).astype(np.float32))
  mm = jax.jit(lambda a, b: a @ b)
  peaks = {"xla": lambda: mm(a, a).block_until_ready()}
  if with_torch:
    ta = torch.from_numpy(np.asarray(a).copy())
    peaks["torch"] = lambda: ta @ ta
  pt_times = alternate(peaks, 1 if args.smoke else max(args.repeats, 5))
  result["matmul_peak_gflops"] = {k: 2 * n**3 / med(v) / 1e9 for k, v in pt_times.items()}
  print(f"matmul {n}^2 fp32: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in result["matmul_peak_gflops"].items()),
        flush=True)
  peak = result["matmul_peak_gflops"]["xla"]

  # -- forward ----------------------------------------------------------------------------------
  b = args.batch_size or cfg.eval.batch_size
  fwd = forward_fn(b)
  xs = parallel.global_batch(mesh, forward_inputs(b))
  fwd_compiled = fwd.lower(params, *xs).compile()
  fwd_flops = flops_of(fwd_compiled)
  fns = {"jax": lambda: fwd(params, *xs).block_until_ready()}
  if with_torch:
    xh, th, ch_ = (np.asarray(v) for v in xs)
    tx = torch.from_numpy(xh).permute(0, 3, 1, 2).contiguous()
    tt, tctx = torch.from_numpy(th).long(), embed(torch.from_numpy(ch_).long())[:, None].detach()

    def pt_fwd():
      with torch.inference_mode():
        pt(tx, tt, tctx)
    fns["torch"] = pt_fwd
  ts = alternate(fns, args.repeats)
  result["forward"] = {"batch": b, "flops_per_image": fwd_flops / b, "times_s": ts,
                       "images_per_s": {k: b / med(v) for k, v in ts.items()}}
  result["forward"]["jax_gflops"] = fwd_flops / med(ts["jax"]) / 1e9
  print(f"forward, batch {b}: " + ", ".join(f"{k} {v:.1f} img/s" for k, v in result["forward"]["images_per_s"].items())
        + f"; ours {result['forward']['jax_gflops']:.0f} GFLOP/s ({fwd_flops / b / 1e9:.3f} GFLOP per image)",
        flush=True)

  # -- outpainting ------------------------------------------------------------------------------
  op, call, lower_args = make_outpainter(b)
  op_compiled = op._jitted.lower(*lower_args).compile()
  k_calls = op.num_denoiser_calls
  # XLA's cost analysis counts a while-loop body once: the scan body holds one UNet call.
  op_flops = flops_of(op_compiled) * k_calls
  fns = {"jax": call}
  if with_torch:
    tout = TorchOutpainter(pt, embed, np.asarray(sched.abar), op.steps)
    known, conds = outpaint_inputs(b)
    tknown = torch.from_numpy(known).permute(0, 3, 1, 2).contiguous()
    tmask = torch.from_numpy(mask).permute(2, 0, 1)[None].contiguous()
    tconds = torch.from_numpy(conds).long()
    gen = torch.Generator().manual_seed(0)
    fns["torch_batched"] = lambda: tout(tknown, tmask, tconds, gen)
    single = min(args.single_images, b)

    def one_by_one():
      for i in range(single):
        tout(tknown[i:i + 1], tmask, tconds[i:i + 1], gen)
    fns["torch_one_image"] = one_by_one
  ts = alternate(fns, args.repeats)
  images = {"jax": b, "torch_batched": b, "torch_one_image": min(args.single_images, b)}
  keys_s = {k: images[k] / med(v) for k, v in ts.items()}
  result["outpaint"] = {"batch": b, "steps": args.steps, "denoiser_calls_per_key": k_calls, "times_s": ts,
                        "images_timed": {k: images[k] for k in ts}, "keys_per_s": keys_s,
                        "unet_evals_per_s": {k: v * k_calls for k, v in keys_s.items()},
                        "jax_flops_per_call": op_flops, "jax_gflops": op_flops / med(ts["jax"]) / 1e9}
  print(f"outpainting, batch {b}, {args.steps} steps: " +
        ", ".join(f"{k} {v:.2f} keys/s ({v * k_calls:.1f} evals/s)" for k, v in keys_s.items()) +
        f"; ours {result['outpaint']['jax_gflops']:.0f} GFLOP/s", flush=True)

  # -- training ---------------------------------------------------------------------------------
  tb = args.train_batch_size or cfg.train.batch_size
  parallel.check_batch_size(tb, mesh)
  tx_opt = make_optimizer(cfg.train)
  # The parts of an Experiment the train step reads (a pixel model conditioned on ids: no VAE, no text).
  exp = SimpleNamespace(config=cfg, model=model, sched=sched, null_id=model.null_id, image_size=side, channels=ch,
                        model_size=side, model_channels=ch, vae=None, text=None, prediction_type="epsilon")
  state, shardings = create_state(exp, mesh, tx_opt, jax.random.key(0))
  step = jit_train_step(exp, mesh, tx_opt, shardings)
  images = rs.uniform(-1, 1, (tb, side, side, ch)).astype(np.float32)
  labels = rs.randint(0, max(num_cond, 1), tb).astype(np.int32)
  batch = parallel.global_batch(mesh, {"image": images, "condition": labels})
  frozen = {}  # pixel models with condition ids have no frozen parameters
  train_compiled = step.lower(state, batch, jax.random.key(2), frozen).compile()
  train_flops = flops_of(train_compiled)
  holder = {"state": state}

  def jax_step():
    holder["state"], metrics = step(holder["state"], batch, jax.random.key(2), frozen)
    jax.block_until_ready(metrics)

  fns = {"jax": jax_step}
  if with_torch:
    pt_step = torch_train_step(pt, embed, np.asarray(sched.abar), cfg.train, model.null_id)
    timg = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    tlab = torch.from_numpy(labels).long()
    fns["torch"] = lambda: pt_step(timg, tlab)
  ts = alternate(fns, args.repeats)
  result["train"] = {"batch": tb, "times_s": ts, "images_per_s": {k: tb / med(v) for k, v in ts.items()},
                     "jax_flops_per_step": train_flops, "jax_gflops": train_flops / med(ts["jax"]) / 1e9}
  print(f"train step, batch {tb}: " + ", ".join(f"{k} {v:.1f} img/s" for k, v in result["train"]["images_per_s"].items())
        + f"; ours {result['train']['jax_gflops']:.0f} GFLOP/s", flush=True)
  if args.trace:
    jax_step()  # compiled already: the trace holds one step's execution only
    with jax.profiler.trace(args.trace, create_perfetto_trace=True):
      jax_step()
    result["train"]["trace_dir"] = args.trace
    times = trace_op_times(args.trace, train_compiled.as_text())
    result["train"]["trace_ops"], result["train"]["trace_sources"] = times["by_kind"], times["by_source"]
    print(f"wrote a jax.profiler trace of one train step to {args.trace}; where its time went, by XLA op kind:",
          flush=True)
    for row in result["train"]["trace_ops"][:12]:
      print(f"  {row['op']:32s} {row['ms']:9.2f} ms  {100 * row['share']:5.1f}%  ({row['count']} ops)")
    print("by the JAX operation each op computes (its root's), forward / backward (transposed) / update:")
    for row in result["train"]["trace_sources"][:16]:
      print(f"  {row['op']:48s} {row['ms']:9.2f} ms  {100 * row['share']:5.1f}%  ({row['count']} ops)")
  if args.profile:
    result["train_phases"] = profile_train_step(
        model, sched, params, images, labels, mesh, args.repeats,
        (pt, embed, timg, tlab, np.asarray(sched.abar)) if with_torch else None)

  # -- summary ----------------------------------------------------------------------------------
  r = {"forward_jax_over_torch": None, "outpaint_jax_over_torch_batched": None,
       "outpaint_jax_over_torch_one_image": None, "train_jax_over_torch": None}
  if with_torch:
    r["forward_jax_over_torch"] = result["forward"]["images_per_s"]["jax"] / result["forward"]["images_per_s"]["torch"]
    r["outpaint_jax_over_torch_batched"] = keys_s["jax"] / keys_s["torch_batched"]
    r["outpaint_jax_over_torch_one_image"] = keys_s["jax"] / keys_s["torch_one_image"]
    r["train_jax_over_torch"] = result["train"]["images_per_s"]["jax"] / result["train"]["images_per_s"]["torch"]
  r["forward_fraction_of_xla_peak"] = result["forward"]["jax_gflops"] / peak
  r["outpaint_fraction_of_xla_peak"] = result["outpaint"]["jax_gflops"] / peak
  r["train_fraction_of_xla_peak"] = result["train"]["jax_gflops"] / peak
  if with_torch:
    tpeak = result["matmul_peak_gflops"]["torch"]
    r["outpaint_fraction_of_torch_peak"] = result["outpaint"]["jax_gflops"] / tpeak
    r["train_fraction_of_torch_peak"] = result["train"]["jax_gflops"] / tpeak
  result["ratios"] = r
  result["machine"]["loadavg_end"] = list(os.getloadavg())
  print("\nratios (medians):")
  for k, v in r.items():
    if v is not None:
      print(f"  {k:38s} {v:6.2f}")
  name = args.name or f"{config_name}_{len(jax.devices())}dev"
  _write(args.out_dir, name, result)
  return result


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


def trace_op_times(trace_dir: str, hlo_text: str) -> dict[str, list[dict]]:
  """The XLA ops of a jax.profiler trace (its Perfetto JSON), their time summed two ways, largest first,
  as [{"op", "ms", "share", "count"}]. Times of ops that ran on several devices or threads at once add
  up, so a share is of the ops' summed time, not of the wall; a collective's time includes waiting for
  the other devices.

  "by_kind": by op kind ("fusion.12" and "fusion.3" are one kind). "by_source": by the JAX operation
  their metadata in `hlo_text` (the compiled program the trace ran) names ("backward
  conv_general_dilated": a fusion whose root is a convolution of the transposed, i.e. backward, pass;
  "forward", "update" for the optimizer's work after the gradient; a collective by its own kind, "backward
  all-reduce"), and ops without one by kind ("(no source) ynn_fusion": on XLA:CPU, among others the
  convolutions that give the kernels' gradients).
  """
  import collections  # pylint: disable=g-import-not-at-top
  import glob  # pylint: disable=g-import-not-at-top
  import gzip  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  from bench_remat import op_names  # pylint: disable=g-import-not-at-top

  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))
  if not paths:
    return {"by_kind": [], "by_source": []}
  with gzip.open(paths[-1], "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  source = {}
  for name, op_name in op_names(hlo_text).items():
    # the name's last part, without its parameters ("[...]") or the scopes it closes ("reduce_sum)")
    primitive = re.sub(r"[\[)].*$", "", op_name.rsplit("/", 1)[-1])
    if name.startswith(COLLECTIVES):  # the gradients' all-reduce is named for the reduce_sum it implements
      primitive = re.sub(r"\.\d+$", "", name)
    phase = ("backward" if "transpose(" in op_name else "forward" if "jvp(" in op_name else "update")
    source[name] = f"{phase} {primitive}"
  totals = {"by_kind": collections.Counter(), "by_source": collections.Counter()}
  counts = {"by_kind": collections.Counter(), "by_source": collections.Counter()}
  for e in events:
    op = (e.get("args") or {}).get("hlo_op")  # XLA's executor marks its ops; Python and runtime events lack it
    if e.get("ph") == "X" and op:
      kind, ms = re.sub(r"\.\d+$", "", op), e.get("dur", 0) / 1e3
      # ops XLA made without a source (layout copies, some fusions) by their kind
      for way, key in (("by_kind", kind), ("by_source", source.get(op, f"(no source) {kind}"))):
        totals[way][key] += ms
        counts[way][key] += 1
  out = {}
  for way, total in totals.items():
    whole = sum(total.values()) or 1.0
    out[way] = [{"op": k, "ms": v, "share": v / whole, "count": counts[way][k]} for k, v in total.most_common()]
  return out


def profile_train_step(model, sched, params, images, labels, mesh, repeats, peer=None) -> dict:
  """Seconds (medians) of a train step's phases, each jitted / run on its own, both frameworks.

  Phases: "forward" (the eps-MSE loss), "forward_backward" (the loss and its gradient), and the
  whole step is the "train" section's time. backward = forward_backward - forward.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  from solidmark_jax import parallel
  from solidmark_jax.diffusion import q_sample

  rep, bsh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  b = images.shape[0]
  rs = np.random.RandomState(3)
  t = rs.randint(0, sched.num_steps, b).astype(np.int32)
  eps = rs.randn(*images.shape).astype(np.float32)
  x_t = np.asarray(q_sample(sched, jnp.asarray(images), jnp.asarray(t), jnp.asarray(eps)))
  xs = parallel.global_batch(mesh, (x_t, t, labels, eps))

  def loss(p, x, t, c, e):
    return jnp.mean(jnp.square(model.apply({"params": p}, x, t, c) - e))

  fwd = jax.jit(loss, in_shardings=(rep, bsh, bsh, bsh, bsh))
  fwd_bwd = jax.jit(jax.value_and_grad(loss), in_shardings=(rep, bsh, bsh, bsh, bsh))
  fns = {"jax_forward": lambda: jax.block_until_ready(fwd(params, *xs)),
         "jax_forward_backward": lambda: jax.block_until_ready(fwd_bwd(params, *xs))}
  if peer is not None:
    import torch
    import torch.nn.functional as F
    pt, embed, timg, tlab, _ = peer
    tx_t = torch.from_numpy(x_t).permute(0, 3, 1, 2).contiguous()
    teps = torch.from_numpy(eps).permute(0, 3, 1, 2).contiguous()
    tt = torch.from_numpy(t).long()

    def pt_loss():
      return F.mse_loss(pt(tx_t, tt, embed(tlab)[:, None]).sample, teps)

    def pt_fwd():
      with torch.no_grad():
        pt_loss()

    def pt_fwd_bwd():
      pt.zero_grad(set_to_none=True)
      embed.zero_grad(set_to_none=True)
      pt_loss().backward()

    pt.train()
    fns["torch_forward"] = pt_fwd
    fns["torch_forward_backward"] = pt_fwd_bwd
  ts = alternate(fns, repeats)
  out = {k: med(v) for k, v in ts.items()}
  for fw in ("jax", "torch"):
    if f"{fw}_forward" in out:
      out[f"{fw}_backward"] = out[f"{fw}_forward_backward"] - out[f"{fw}_forward"]
  print("train-step phases, median s: " + ", ".join(f"{k} {v:.3f}" for k, v in out.items()), flush=True)
  return {"batch": b, "median_s": out, "times_s": ts}


def _write(out_dir, name, result):
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{name}.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1, default=float)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
