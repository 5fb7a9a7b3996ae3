"""A projection on paper: SolidMark keys/s for Stable Diffusion 2.1 on TPU pods, from measured FLOPs.

  python benchmarks/project_tpu.py            # reads benchmarks/results/sd21_flops.json

FLOPs per key of the latent RePaint loop (outpaint/latent.py) with classifier-free guidance:
  UNet:   steps x 2 (conditional + unconditional rows) x FLOPs of one UNet evaluation
  VAE:    1 encode of the known image + (re-masks) x (decode + encode) + 1 final decode
where the re-masks are the rows `outpaint.latent.remask_rows(steps, s, "x0")` marks (10 for 100 steps,
s = 10), and one UNet / VAE pass's FLOPs come from XLA's cost analysis (benchmarks/sd21_flops.py).
The text encoder (once per key) is left out (< 0.2% of the total).

Throughput = chips x peak x MFU / FLOPs per key. Peaks are the vendors' published dense bf16 figures;
the MFU is an assumption (a range), not a measurement: no TPU was available to this project.
`--smoke` (run by the test suite) projects one slice size at one MFU to a file given with `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# published dense bf16 peak per chip, TFLOP/s
TPU_PEAK_TFLOPS = {"v4": 275.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0}


def flops_per_key(flops: dict, latent: int, steps: int, guidance: bool, remasks: int) -> dict:
  unet = flops["unet"][str(latent)]["flops_per_image"]
  enc, dec = flops["vae"][str(latent)]["encode_flops"], flops["vae"][str(latent)]["decode_flops"]
  parts = {"unet": steps * (2 if guidance else 1) * unet, "vae": enc + remasks * (dec + enc) + dec}
  parts["total"] = parts["unet"] + parts["vae"]
  return parts


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--flops", default=os.path.join(ROOT, "benchmarks", "results", "sd21_flops.json"))
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--remask-every", type=int, default=10)
  p.add_argument("--mfu", type=float, nargs="+", default=[0.3, 0.45, 0.6])
  p.add_argument("--chips", type=int, nargs="+", default=[1, 32, 256])
  p.add_argument("--keys", type=int, default=10_000, help="evaluation size for the time column (paper: 5k-10k)")
  p.add_argument("--out", help="JSON output (default: benchmarks/results/tpu_projection.json; "
                 "with --smoke, benchmarks/results/smoke/, git-ignored)")
  p.add_argument("--smoke", action="store_true", help="one chip count at one MFU (checks the script)")
  args = p.parse_args(argv)
  args.out = args.out or os.path.join(ROOT, "benchmarks", "results", *["smoke"] * args.smoke, "tpu_projection.json")
  if args.smoke:
    args.mfu, args.chips = [0.45], [1]
  with open(args.flops) as f:
    flops = json.load(f)
  sys.path.insert(0, ROOT)
  from solidmark_jax.outpaint.latent import remask_rows  # pylint: disable=g-import-not-at-top
  remasks = int(remask_rows(args.steps, args.remask_every, "x0").sum())
  out = {"steps": args.steps, "remask_every": args.remask_every, "remasks": remasks, "rows": []}
  for latent in sorted(flops["unet"], key=int):
    fk = flops_per_key(flops, int(latent), args.steps, True, remasks)
    px = int(latent) * 8
    print(f"\n{px} px images ({latent}x{latent} latents): {fk['total'] / 1e12:.1f} TFLOP per key "
          f"(UNet {fk['unet'] / 1e12:.1f}, VAE {fk['vae'] / 1e12:.1f}; {args.steps} steps, guidance, {remasks} re-masks)")
    print(f"{'TPU':>5} {'chips':>6} " + " ".join(f"{'keys/s @' + format(m, '.0%'):>13}" for m in args.mfu)
          + f"   {args.keys} keys @ {args.mfu[len(args.mfu) // 2]:.0%}")
    for tpu, peak in TPU_PEAK_TFLOPS.items():
      for chips in args.chips:
        rates = [chips * peak * 1e12 * m / fk["total"] for m in args.mfu]
        mid = rates[len(rates) // 2]
        print(f"{tpu:>5} {chips:>6} " + " ".join(f"{r:13.1f}" for r in rates) + f"   {args.keys / mid:8.0f} s")
        out["rows"].append({"pixels": px, "latent": int(latent), "tflop_per_key": fk["total"] / 1e12, "tpu": tpu,
                            "chips": chips, "mfu": args.mfu, "keys_per_s": rates})
  path = args.out
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(out, f, indent=1)
  print("\nwrote", path)


if __name__ == "__main__":
  main()
