"""Where the train step's time goes on CPU: a 3x3 convolution's forward pass and its two gradients
(input and kernel) under XLA and PyTorch, same shapes, fp32, alternating calls.

  python benchmarks/bench_conv_grad.py

Prints GFLOP/s of each and writes benchmarks/results/conv_grad.json; a backward rate is the gradient
call's time minus the forward call's, null ("n/a") where that is not positive. Without torch installed
only the XLA columns are measured. `--smoke` (run by the test suite): one small shape, one repeat, `--out`.
"""

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = [(32, 32, 32, 32), (32, 16, 16, 64), (32, 8, 8, 64)]  # [B, H, W, C], C -> C, 3x3, SAME
REPEATS = 15


def _time(fn, n):
  fn()
  out = []
  for _ in range(n):
    t = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t)
  return statistics.median(out)


def backward_gflops(flops: float, gradient_s: float, forward_s: float) -> float | None:
  """GFLOP/s of a gradient call's backward half, timed as the gradient call minus the forward call; None
  where that difference is not positive (timing noise at tiny shapes): no rate was measured then."""
  dt = gradient_s - forward_s
  return flops / dt / 1e9 if dt > 0 else None


def _fmt(gflops: float | None) -> str:
  return "   n/a" if gflops is None else f"{gflops:6.1f}"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", help="JSON output (default: benchmarks/results/conv_grad.json; "
                 "with --smoke, benchmarks/results/smoke/, git-ignored)")
  p.add_argument("--smoke", action="store_true", help="one small shape, one repeat (checks the script)")
  args = p.parse_args(argv)
  results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
  args.out = args.out or os.path.join(results, *["smoke"] * args.smoke, "conv_grad.json")
  shapes, repeats = ([(2, 8, 8, 8)], 1) if args.smoke else (SHAPES, REPEATS)
  torch = None
  if importlib.util.find_spec("torch") is not None:
    import torch  # pylint: disable=g-import-not-at-top
  else:
    print("torch is not installed (pip install -e '.[bench]'): XLA columns only", flush=True)
  rows = []
  for b, h, w, c in shapes:
    flops = 2 * b * h * w * c * c * 9  # one convolution
    rs = np.random.default_rng(0)
    x = rs.standard_normal((b, h, w, c), np.float32)
    k = rs.standard_normal((3, 3, c, c), np.float32) * 0.1
    conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    fwd = jax.jit(conv)
    dx = jax.jit(jax.grad(lambda x, k: jnp.sum(conv(x, k) ** 2) / 2, argnums=0))
    dk = jax.jit(jax.grad(lambda x, k: jnp.sum(conv(x, k) ** 2) / 2, argnums=1))
    xj, kj = jnp.asarray(x), jnp.asarray(k)
    # the squared-sum's own cost is tiny next to the convolutions (one fwd + one transposed conv)
    jt = {"forward": _time(lambda: fwd(xj, kj).block_until_ready(), repeats),
          "grad_input": _time(lambda: dx(xj, kj).block_until_ready(), repeats),
          "grad_kernel": _time(lambda: dk(xj, kj).block_until_ready(), repeats)}
    row = {"shape": [b, h, w, c], "flops_per_conv": flops, "jax_s": jt}
    timings = [("jax", jt)]
    if torch is not None:
      row["torch_s"] = _torch_times(torch, x, k, repeats)
      timings.append(("torch", row["torch_s"]))
    for name, t in timings:
      row[f"{name}_gflops"] = {
          "forward": flops / t["forward"] / 1e9,
          "grad_input_backward_only": backward_gflops(flops, t["grad_input"], t["forward"]),
          "grad_kernel_backward_only": backward_gflops(flops, t["grad_kernel"], t["forward"]),
      }
    rows.append(row)
    print(f"[{b},{h},{w},{c}] GFLOP/s " + " | ".join(
        f"{name}: forward {_fmt(row[name + '_gflops']['forward'])} d/dx "
        f"{_fmt(row[name + '_gflops']['grad_input_backward_only'])} d/dk "
        f"{_fmt(row[name + '_gflops']['grad_kernel_backward_only'])}" for name, _ in timings), flush=True)
  out = {"rows": rows, "loadavg": os.getloadavg(), "smoke": bool(args.smoke), "jax": jax.__version__}
  if torch is not None:
    out.update({"torch_threads": torch.get_num_threads(), "torch": torch.__version__})
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as fh:
    json.dump(out, fh, indent=1)
  print("wrote", args.out, "load", os.getloadavg())


def _torch_times(torch, x, k, repeats):
  """Seconds of the forward convolution and its two gradient calls under PyTorch (channels-last)."""
  xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(memory_format=torch.channels_last)
  kt = torch.from_numpy(k).permute(3, 2, 0, 1).contiguous()
  f = lambda xx, kk: torch.nn.functional.conv2d(xx, kk, padding=1)

  def tgrad(which):
    xx = xt.clone().requires_grad_(which == "x")
    kk = kt.clone().requires_grad_(which == "k")
    y = f(xx, kk)
    (y.square().sum() / 2).backward()

  with torch.inference_mode():
    tf = _time(lambda: f(xt, kt), repeats)
  return {"forward": tf, "grad_input": _time(lambda: tgrad("x"), repeats),
          "grad_kernel": _time(lambda: tgrad("k"), repeats)}


if __name__ == "__main__":
  sys.exit(main())
