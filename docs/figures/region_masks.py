"""The built-in plain-background masks (`evaluation.regions.plain_background_masks`) on Fashion-MNIST and on
clip art, failure cases included: writes docs/img/region_masks.png and region_masks.json.

  python docs/figures/region_masks.py [--data_dir DIR] [--out docs/img/region_masks.png]

The clip art is drawn here, so its true foreground is known and each case gets its IoU; Fashion-MNIST
(Debian's files, prepared offline by the project's TFDS loader) has no true masks: its foreground
fractions are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from matplotlib.figure import Figure  # noqa: E402
from ml_collections import ConfigDict  # noqa: E402

from solidmark_jax import atomic  # noqa: E402
from solidmark_jax.data import open_source  # noqa: E402
from solidmark_jax.evaluation import regions  # noqa: E402

SIZE = 32


def _draw(background, shapes) -> tuple[np.ndarray, np.ndarray]:
  """An RGB image [32, 32, 3] in [0, 1] and its true foreground (every pixel a shape covers)."""
  img = Image.new("RGB", (SIZE, SIZE), background)
  truth = Image.new("L", (SIZE, SIZE), 0)
  for kind, box, colour in shapes:
    for canvas, fill in ((ImageDraw.Draw(img), colour), (ImageDraw.Draw(truth), 255)):
      getattr(canvas, kind)(box, fill=fill)
  return np.asarray(img, np.float32) / 255.0, np.asarray(truth) > 0


def clip_art() -> list[tuple[str, np.ndarray, np.ndarray]]:
  """(name, image, true foreground): easy cases first, then the documented failures."""
  cases = [
      ("disc on white", *_draw("white", [("ellipse", (6, 6, 25, 25), (200, 30, 30))])),
      ("two shapes", *_draw("white", [("rectangle", (3, 4, 12, 27), (30, 60, 200)),
                                      ("polygon", [(16, 26), (24, 5), (29, 26)], (20, 150, 40))])),
  ]
  # failure: a white part of the object touches the edge (it joins the background)
  img, truth = _draw("white", [("rectangle", (0, 8, 20, 24), (240, 240, 240)), ("ellipse", (10, 6, 28, 26),
                                                                                 (230, 120, 0))])
  cases.append(("white part at the edge", img, truth))
  # failure: a hole of background colour inside a ring (true background, called foreground)
  img, truth = _draw("white", [("ellipse", (4, 4, 27, 27), (90, 0, 140))])
  hole = _draw((0, 0, 0), [("ellipse", (11, 11, 20, 20), (255, 255, 255))])[1]
  img[hole] = 1.0
  cases.append(("ring with a hole", img, truth & ~hole))
  # failure: a gradient background (far from the edge colour inside)
  img, truth = _draw("white", [("ellipse", (9, 9, 22, 22), (20, 20, 20))])
  ramp = np.linspace(1.0, 0.55, SIZE)[None, :, None]
  img = np.where(truth[..., None], img, np.broadcast_to(ramp, img.shape))
  cases.append(("gradient background", img.astype(np.float32), truth))
  # failure: a textured background
  img, truth = _draw("white", [("rectangle", (8, 8, 23, 23), (0, 90, 160))])
  noise = np.random.default_rng(0).random((SIZE, SIZE, 1)) * 0.35 + 0.65
  img = np.where(truth[..., None], img, noise)
  cases.append(("textured background", img.astype(np.float32), truth))
  return cases


def iou(a: np.ndarray, b: np.ndarray) -> float:
  union = np.sum(a | b)
  return float(np.sum(a & b) / union) if union else 1.0


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data_dir", default=os.path.expanduser("~/tensorflow_datasets"))
  p.add_argument("--out", default=os.path.join(ROOT, "docs", "img", "region_masks.png"))
  p.add_argument("--num_fashion", type=int, default=6)
  args = p.parse_args(argv)

  src = open_source(ConfigDict({"name": "fashion_mnist", "data_dir": args.data_dir}), "train")
  fashion = np.asarray(src.read(np.arange(args.num_fashion))["image"], np.float32) / 255.0
  fashion_fg = regions.plain_background_masks(fashion)
  art = clip_art()
  art_fg = [regions.plain_background_masks(img[None])[0] for _, img, _ in art]
  result = {
      "fashion_mnist": {"foreground_fraction": [float(f) for f in fashion_fg.mean(axis=(1, 2))]},
      "clip_art": {name: {"iou": iou(fg, truth), "true_fraction": float(truth.mean()), "mask_fraction": float(fg.mean())}
                   for (name, _, truth), fg in zip(art, art_fg)},
      "tolerance": 0.1,
  }

  rows = [(f"Fashion-MNIST {i}", np.repeat(fashion[i], 3, axis=-1), fashion_fg[i], None) for i in range(len(fashion))]
  rows += [(name, img, fg, truth) for (name, img, truth), fg in zip(art, art_fg)]
  fig = Figure(figsize=(2 * 1.6, 1.6 * len(rows) / 2 + 0.4))
  cols = 4  # two cases per row: image, mask
  for k, (name, img, fg, truth) in enumerate(rows):
    ax = fig.add_subplot(-(-len(rows) // 2), cols, 2 * k + 1)
    ax.imshow(img, interpolation="nearest")
    ax.set_title(name, fontsize=6)
    ax.axis("off")
    ax = fig.add_subplot(-(-len(rows) // 2), cols, 2 * k + 2)
    ax.imshow(fg, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title("mask" + ("" if truth is None else f", IoU {iou(fg, truth):.2f}"), fontsize=6)
    ax.axis("off")
  fig.set_size_inches(cols * 1.3, 1.5 * -(-len(rows) // 2))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  fig.savefig(args.out, dpi=120, bbox_inches="tight")
  atomic.write_json(os.path.splitext(args.out)[0] + ".json", result, indent=1)
  for name, r in result["clip_art"].items():
    print(f"{name:24s} IoU {r['iou']:.3f}  (true foreground {r['true_fraction']:.2f}, mask {r['mask_fraction']:.2f})")
  print("Fashion-MNIST foreground fractions:", " ".join(f"{f:.2f}" for f in result["fashion_mnist"]["foreground_fraction"]))
  print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
