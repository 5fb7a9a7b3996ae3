"""FLOPs of a Stable-Diffusion-2.1-sized UNet (and its VAE) from XLA's cost analysis, nothing allocated.

  python benchmarks/sd21_flops.py            # writes benchmarks/results/sd21_flops.json

Parameters come from `jax.eval_shape`, so the 865M-parameter UNet is never materialised; the forward
pass is lowered for abstract inputs and XLA's HLO cost analysis counts its FLOPs. These numbers feed
the keys/s projection for TPU pods in docs/performance.md.
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


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--latent", type=int, nargs="+", default=[64, 96], help="latent sides (64: 512 px, 96: 768 px)")
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "sd21_flops.json"))
  args = p.parse_args(argv)
  os.environ.setdefault("USE_TF", "0")
  sys.path.insert(0, ROOT)
  import jax
  import jax.numpy as jnp
  from solidmark_jax.models import fast_layers
  from solidmark_jax.models._diffusers import FlaxUNet2DConditionModel
  from diffusers import FlaxAutoencoderKL

  f32 = jnp.float32
  out = {"unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in SD21_UNET.items()},
         "text_tokens": TEXT_TOKENS, "unet": {}, "vae": {}}
  unet = FlaxUNet2DConditionModel(sample_size=96, **SD21_UNET)
  vae = FlaxAutoencoderKL(sample_size=768, **SD21_VAE)
  for side in args.latent:
    x = jax.ShapeDtypeStruct((1, 4, side, side), f32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    ctx = jax.ShapeDtypeStruct((1, TEXT_TOKENS, 1024), f32)
    params = jax.eval_shape(lambda r, x, t, c: unet.init(r, x, t, c)["params"], jax.random.key(0),
                            jnp.zeros(x.shape), jnp.zeros(t.shape, jnp.int32), jnp.zeros(ctx.shape))
    n_params = sum(a.size for a in jax.tree.leaves(params))

    def fwd(p, x, t, c):
      with fast_layers.fast_layers():
        return unet.apply({"params": p}, x, t, c).sample

    t0 = time.perf_counter()
    cost = jax.jit(fwd).lower(params, x, t, ctx).cost_analysis()
    out["unet"][str(side)] = {"params": int(n_params), "flops_per_image": float(cost["flops"]),
                              "pixels": side * 8, "lowering_s": time.perf_counter() - t0}
    print(f"UNet {n_params / 1e6:.0f}M params, latent {side}x{side} ({side * 8} px): "
          f"{cost['flops'] / 1e12:.3f} TFLOP per evaluation", flush=True)

    img = jax.ShapeDtypeStruct((1, 3, side * 8, side * 8), f32)
    vparams = jax.eval_shape(lambda r, x: vae.init(r, x)["params"], jax.random.key(0), jnp.zeros(img.shape))
    lat = jax.ShapeDtypeStruct((1, 4, side, side), f32)
    enc = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode).latent_dist.mean)
    dec = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode).sample)
    e = enc.lower(vparams, img).cost_analysis()["flops"]
    d = dec.lower(vparams, lat).cost_analysis()["flops"]
    out["vae"][str(side)] = {"encode_flops": float(e), "decode_flops": float(d)}
    print(f"VAE at {side * 8} px: encode {e / 1e12:.3f} TFLOP, decode {d / 1e12:.3f} TFLOP", flush=True)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
