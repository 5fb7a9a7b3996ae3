"""Where the train step's time goes on CPU: a 3x3 convolution's forward pass and its two gradients
(input and kernel) under XLA and PyTorch, same shapes, fp32, alternating calls.

  python benchmarks/bench_conv_grad.py

Prints GFLOP/s of each and writes benchmarks/results/conv_grad.json.
"""

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


def _time(fn, n=REPEATS):
  fn()
  out = []
  for _ in range(n):
    t = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t)
  return statistics.median(out)


def main():
  import torch
  rows = []
  for b, h, w, c in SHAPES:
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
    jt = {"forward": _time(lambda: fwd(xj, kj).block_until_ready()),
          "grad_input": _time(lambda: dx(xj, kj).block_until_ready()),
          "grad_kernel": _time(lambda: dk(xj, kj).block_until_ready())}
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(memory_format=torch.channels_last)
    kt = torch.from_numpy(k).permute(3, 2, 0, 1).contiguous()
    f = lambda xx, kk: torch.nn.functional.conv2d(xx, kk, padding=1)

    def tgrad(which):
      xx = xt.clone().requires_grad_(which == "x")
      kk = kt.clone().requires_grad_(which == "k")
      y = f(xx, kk)
      (y.square().sum() / 2).backward()

    with torch.inference_mode():
      tf = _time(lambda: f(xt, kt))
    tt = {"forward": tf, "grad_input": _time(lambda: tgrad("x")), "grad_kernel": _time(lambda: tgrad("k"))}
    # a gradient call = forward + one backward convolution
    row = {"shape": [b, h, w, c], "flops_per_conv": flops, "jax_s": jt, "torch_s": tt}
    for name, t in (("jax", jt), ("torch", tt)):
      row[f"{name}_gflops"] = {
          "forward": flops / t["forward"] / 1e9,
          "grad_input_backward_only": flops / max(t["grad_input"] - t["forward"], 1e-9) / 1e9,
          "grad_kernel_backward_only": flops / max(t["grad_kernel"] - t["forward"], 1e-9) / 1e9,
      }
    rows.append(row)
    print(f"[{b},{h},{w},{c}] GFLOP/s  forward jax {row['jax_gflops']['forward']:6.1f} torch "
          f"{row['torch_gflops']['forward']:6.1f} | d/dx jax {row['jax_gflops']['grad_input_backward_only']:6.1f} "
          f"torch {row['torch_gflops']['grad_input_backward_only']:6.1f} | d/dk jax "
          f"{row['jax_gflops']['grad_kernel_backward_only']:6.1f} torch {row['torch_gflops']['grad_kernel_backward_only']:6.1f}",
          flush=True)
  out = {"rows": rows, "loadavg": os.getloadavg(), "torch_threads": torch.get_num_threads(),
         "jax": jax.__version__, "torch": torch.__version__}
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "conv_grad.json")
  with open(path, "w") as fh:
    json.dump(out, fh, indent=1)
  print("wrote", path, "load", os.getloadavg())


if __name__ == "__main__":
  sys.exit(main())
