"""FLOPs of a Stable-Diffusion-2.1-sized UNet (and its VAE) from XLA's cost analysis, nothing allocated.

  python benchmarks/sd21_flops.py            # writes benchmarks/results/sd21_flops.json

Parameters come from `jax.eval_shape`, so the 865M-parameter UNet is never materialised; the forward
pass is lowered for abstract inputs and XLA's HLO cost analysis counts its FLOPs. These numbers feed
the keys/s projection for TPU pods in docs/performance.md. `--smoke` (run by the test suite) lowers a
reduced UNet and VAE of the same block types at an 8 x 8 latent instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# stabilityai/stable-diffusion-2-1 unet/config.json (the 768 px v-model; 2-1-base is the same at 64x64).
SD21_UNET = dict(
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
)
SD21_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
)
TEXT_TOKENS = 77
# --smoke: SD 2.1's block types and linear-projection transformers at widths of 32 (GroupNorm's minimum)
SMOKE_UNET = dict(SD21_UNET, block_out_channels=(32, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=(2, 2),
                  cross_attention_dim=32)
SMOKE_VAE = dict(SD21_VAE, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 block_out_channels=(32, 32), layers_per_block=1)
SMOKE_TOKENS = 8


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--latent", type=int, nargs="+", default=[64, 96], help="latent sides (64: 512 px, 96: 768 px)")
  p.add_argument("--out", help="JSON output (default: benchmarks/results/sd21_flops.json; "
                 "with --smoke, benchmarks/results/smoke/, git-ignored)")
  p.add_argument("--smoke", action="store_true", help="a reduced UNet and VAE at an 8 x 8 latent (checks the script)")
  args = p.parse_args(argv)
  args.out = args.out or os.path.join(ROOT, "benchmarks", "results", *["smoke"] * args.smoke, "sd21_flops.json")
  unet_cfg, vae_cfg, tokens = SD21_UNET, SD21_VAE, TEXT_TOKENS
  if args.smoke:
    unet_cfg, vae_cfg, tokens, args.latent = SMOKE_UNET, SMOKE_VAE, SMOKE_TOKENS, [8]
  os.environ.setdefault("USE_TF", "0")
  sys.path.insert(0, ROOT)
  import jax
  import jax.numpy as jnp
  from solidmark_jax.models import fast_layers
  from solidmark_jax.models._diffusers import FlaxUNet2DConditionModel
  from diffusers import FlaxAutoencoderKL

  f32 = jnp.float32
  out = {"unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in unet_cfg.items()},
         "text_tokens": tokens, "smoke": bool(args.smoke), "unet": {}, "vae": {}}
  unet = FlaxUNet2DConditionModel(sample_size=96, **unet_cfg)
  vae = FlaxAutoencoderKL(sample_size=768, **vae_cfg)
  factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
  cross = unet_cfg["cross_attention_dim"]
  for side in args.latent:
    x = jax.ShapeDtypeStruct((1, 4, side, side), f32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    ctx = jax.ShapeDtypeStruct((1, tokens, cross), f32)
    params = jax.eval_shape(lambda r, x, t, c: unet.init(r, x, t, c)["params"], jax.random.key(0),
                            jnp.zeros(x.shape), jnp.zeros(t.shape, jnp.int32), jnp.zeros(ctx.shape))
    n_params = sum(a.size for a in jax.tree.leaves(params))

    def fwd(p, x, t, c):
      with fast_layers.fast_layers():
        return unet.apply({"params": p}, x, t, c).sample

    t0 = time.perf_counter()
    cost = jax.jit(fwd).lower(params, x, t, ctx).cost_analysis()
    out["unet"][str(side)] = {"params": int(n_params), "flops_per_image": float(cost["flops"]),
                              "pixels": side * factor, "lowering_s": time.perf_counter() - t0}
    print(f"UNet {n_params / 1e6:.2f}M params, latent {side}x{side} ({side * factor} px): "
          f"{cost['flops'] / 1e12:.6f} TFLOP per evaluation", flush=True)

    img = jax.ShapeDtypeStruct((1, 3, side * factor, side * factor), f32)
    vparams = jax.eval_shape(lambda r, x: vae.init(r, x)["params"], jax.random.key(0), jnp.zeros(img.shape))
    lat = jax.ShapeDtypeStruct((1, 4, side, side), f32)
    enc = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode).latent_dist.mean)
    dec = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode).sample)
    e = enc.lower(vparams, img).cost_analysis()["flops"]
    d = dec.lower(vparams, lat).cost_analysis()["flops"]
    out["vae"][str(side)] = {"encode_flops": float(e), "decode_flops": float(d)}
    print(f"VAE at {side * factor} px: encode {e / 1e12:.6f} TFLOP, decode {d / 1e12:.6f} TFLOP", flush=True)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
