"""Compiled memory of the train step per rematerialisation policy (`train.remat`) and batch size.

  python benchmarks/bench_remat.py                 # writes benchmarks/results/remat_memory.json
  python benchmarks/bench_remat.py --smoke --out /tmp/remat.json

The UNet is SD 2.1-shaped (its four block types in its order, linear-projection transformers, text
conditioning of 77 tokens, 32 x 32 x 4 latents: 256 px images) at reduced widths, so that it compiles
on a CPU in seconds. For each policy and batch the whole train step (`training.step.make_train_step`:
eps-MSE, AdamW, EMA) is lowered from ShapeDtypeStructs (nothing allocated) and compiled, and XLA's
`compiled.memory_analysis()` gives its temporaries (activations kept for the backward pass and
scratch), arguments (the state and the batch) and outputs. Remat is applied per down / up block
(models/fast_layers.py).

Beside the compiled figures, each row has what the policy itself decides, independent of any backend:
the activations autodiff keeps for the backward pass (`residual_bytes`: the UNet's saved residuals,
parameters and inputs left out) and the convolutions of the lowered and of the compiled program (the
recomputed ones are extra convolutions; a backend that merges them back with the forward ones, or
schedules them before the backward pass needs them, keeps the memory of no remat). On XLA:CPU the
compiled temporaries do not fall (docs/performance.md); the residuals say what a backend that follows
the policy keeps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# SD 2.1's UNet layout (configs/sd21_pretrain.py) at reduced widths
REDUCED = dict(block_out_channels=(32, 64, 64, 64), layers_per_block=2, attention_head_dim=(2, 4, 4, 4),
               cross_attention_dim=64, latent=32, tokens=77)
# One level (a cross-attention block, as SD's outermost): the smoke runs only check the scripts end to end
SMOKE = dict(block_out_channels=(32,), layers_per_block=1, attention_head_dim=(2,), cross_attention_dim=32,
             latent=8, tokens=8)


def model_config(shape: dict):
  sys.path.insert(0, ROOT)
  import ml_collections  # pylint: disable=g-import-not-at-top
  from configs import sd21_pretrain  # pylint: disable=g-import-not-at-top
  cfg = sd21_pretrain.get_config()
  levels = len(shape["block_out_channels"])
  model = cfg.model.to_dict()
  model.update(block_out_channels=shape["block_out_channels"], layers_per_block=shape["layers_per_block"],
               attention_head_dim=shape["attention_head_dim"], cross_attention_dim=shape["cross_attention_dim"],
               down_block_types=tuple(model["down_block_types"][-levels:]) if levels < 4 else model["down_block_types"],
               up_block_types=tuple(model["up_block_types"][:levels]) if levels < 4 else model["up_block_types"])
  if levels < 4:  # keep a cross-attention block and a plain block at either end, as SD's outermost levels
    model.update(down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (levels - 1),
                 up_block_types=("UpBlock2D",) * (levels - 1) + ("CrossAttnUpBlock2D",))
  return cfg, ml_collections.ConfigDict(model)


def op_names(hlo_text: str) -> dict[str, str]:
  """The JAX op name (metadata op_name) of each HLO instruction that has one, in the text's order: a
  fusion carries its root's."""
  return dict(re.findall(r'^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*op_name="([^"]*)"', hlo_text, re.M))


def recompute_schedule(compiled_text: str) -> dict:
  """Where XLA placed the recomputation: of the convolutions JAX marks as recomputed
  ("rematted_computation" in their op name), how many run before the first backward convolution."""
  entry = compiled_text[compiled_text.index("ENTRY"):]  # its instructions in the order they run
  names = [n for n in op_names(entry).values() if "conv_general_dilated" in n]  # incl. fusions
  recomputed = [i for i, n in enumerate(names) if "rematted_computation" in n]
  backward = [i for i, n in enumerate(names) if "transpose(" in n and "rematted_computation" not in n]
  first = backward[0] if backward else len(names)
  return {"recomputed_convolutions": len(recomputed),
          "recomputed_before_backward": sum(i < first for i in recomputed)}


def residual_bytes(denoiser, params, image, condition) -> int:
  """Bytes of the activations autodiff keeps for the backward pass of the UNet's loss (its saved
  residuals, the parameters and inputs left out): what the remat policy sets, whatever the backend."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax._src.ad_checkpoint import saved_residuals  # pylint: disable=g-import-not-at-top
  # (jax.ad_checkpoint.print_saved_residuals prints this list; the list itself is not public API)

  t = jax.ShapeDtypeStruct((image.shape[0],), jnp.int32)
  loss = lambda p, x, t, c: jnp.mean(jnp.square(denoiser(p, x, t, c)))
  return sum(int(np.prod(aval.shape)) * aval.dtype.itemsize
             for aval, what in saved_residuals(loss, params, image, t, condition)
             if not what.startswith("from the argument"))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--policies", nargs="+", default=["none", "dots_saveable", "nothing_saveable"])
  p.add_argument("--batches", type=int, nargs="+", default=[4])
  p.add_argument("--dtype", default="float32", help="model.dtype of the UNet")
  p.add_argument("--out", help="JSON output (default: benchmarks/results/remat_memory.json; "
                 "with --smoke, benchmarks/results/smoke/, git-ignored)")
  p.add_argument("--smoke", action="store_true", help="a 1-level UNet at 8 x 8, batch 1, two policies")
  args = p.parse_args(argv)
  args.out = args.out or os.path.join(ROOT, "benchmarks", "results", *["smoke"] * args.smoke, "remat_memory.json")
  os.environ.setdefault("USE_TF", "0")
  shape = SMOKE if args.smoke else REDUCED
  if args.smoke:
    args.policies, args.batches = ["none", "nothing_saveable"], [1]
  sys.path.insert(0, ROOT)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from solidmark_jax import models  # pylint: disable=g-import-not-at-top
  from solidmark_jax.diffusion import make_schedule  # pylint: disable=g-import-not-at-top
  from solidmark_jax.training.state import init_state, make_optimizer  # pylint: disable=g-import-not-at-top
  from solidmark_jax.training.step import make_train_step  # pylint: disable=g-import-not-at-top

  cfg, model_cfg = model_config(shape)
  model_cfg.dtype = args.dtype
  side, ch, L, D = shape["latent"], 4, shape["tokens"], shape["cross_attention_dim"]
  model = models.build(model_cfg, side, ch, 0)
  tx = make_optimizer(cfg.train)
  sched = make_schedule(cfg.diffusion.schedule, cfg.diffusion.num_steps)
  params = models.abstract_params(model, side, ch)
  n_params = sum(a.size for a in jax.tree.leaves(params))
  state = jax.eval_shape(lambda p: init_state(p, tx), params)
  null = jnp.zeros((L, D), jnp.float32)

  def prepare(frozen, batch, rng):  # pylint: disable=unused-argument
    return batch["image"], batch["condition"], null

  rows = []
  out = {"unet": {k: list(v) if isinstance(v, tuple) else v for k, v in shape.items()}, "params": int(n_params),
         "dtype": args.dtype, "backend": jax.default_backend(), "jax": jax.__version__, "smoke": bool(args.smoke),
         "loadavg_start": list(os.getloadavg()), "rows": rows}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  print(f"SD 2.1-shaped UNet {n_params / 1e6:.2f}M params, widths {shape['block_out_channels']}, "
        f"{side}x{side}x{ch} latents, {L} tokens, {args.dtype}", flush=True)
  for b in args.batches:
    batch = {"image": jax.ShapeDtypeStruct((b, side, side, ch), jnp.float32),
             "condition": jax.ShapeDtypeStruct((b, L, D), jnp.float32)}
    for policy in args.policies:
      denoiser = models.as_denoiser(models.with_remat(model, policy))
      step = make_train_step(denoiser, sched, tx, ema_decay=cfg.train.ema_decay,
                             cond_dropout=cfg.train.cond_dropout, prepare=prepare)
      t0 = time.perf_counter()
      lowered = jax.jit(step, donate_argnums=(0,)).lower(state, batch, jax.random.key(0))
      compiled = lowered.compile()
      mem, text = compiled.memory_analysis(), compiled.as_text()
      row = {"batch": b, "remat": policy, "compile_s": time.perf_counter() - t0,
             "temp_bytes": int(mem.temp_size_in_bytes), "argument_bytes": int(mem.argument_size_in_bytes),
             "output_bytes": int(mem.output_size_in_bytes),
             "residual_bytes": residual_bytes(denoiser, params, batch["image"], batch["condition"]),
             "convolutions_lowered": lowered.as_text().count("stablehlo.convolution"),
             "convolutions_compiled": text.count("convolution("), **recompute_schedule(text)}
      rows.append(row)
      print(f"batch {b:3d}  remat {policy:18s} temporaries {row['temp_bytes'] / 2**20:8.1f} MiB  arguments "
            f"{row['argument_bytes'] / 2**20:7.1f} MiB  residuals {row['residual_bytes'] / 2**20:7.1f} MiB  "
            f"convolutions {row['convolutions_lowered']} lowered, {row['convolutions_compiled']} compiled, "
            f"{row['recomputed_before_backward']} of {row['recomputed_convolutions']} recomputed before the "
            f"backward pass  "
            f"compile {row['compile_s']:.1f} s", flush=True)
      out["loadavg_end"] = list(os.getloadavg())
      with open(args.out, "w") as f:  # after every row: a long run keeps what it measured
        json.dump(out, f, indent=1)
  print("wrote", args.out)
  return out


if __name__ == "__main__":
  main()
