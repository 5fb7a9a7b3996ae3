"""Image folders at two sizes: open time, peak memory and read rate of `data.folders.FolderSource`.

  python benchmarks/bench_folder.py --sizes 2000 20000 --out benchmarks/results/folder.json
  python benchmarks/bench_folder.py --smoke          # seconds: what the test suite runs

For each size N it writes a folder of N small RGB PNGs (`--image-size` px, random content, in 10
class subfolders, with a captions.jsonl), then measures in a fresh process per N: the time to open
the folder (list, captions, a header check of each image), and one epoch of batches of
`--batch-size` random rows read the way the training loop reads them (decoded per batch, two
batches prefetched on a worker thread): images/s and the process's peak resident memory (Linux
ru_maxrss). Memory that grows with N would show as a peak that grows with N; a folder decoded into
memory at open time would add N x S x S x 3 bytes (`decoded_mb` in the JSON, what the images
would take).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_folder(folder: str, n: int, side: int, seed: int = 0) -> float:
  """N random side x side RGB PNGs in 10 class subfolders, with captions.jsonl; returns the seconds taken."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  rng = np.random.default_rng(seed)
  with open(os.path.join(folder, "captions.jsonl"), "w", encoding="utf-8") as captions:
    for i in range(n):
      rel = f"c{i % 10}/{i:06d}.png"
      os.makedirs(os.path.join(folder, os.path.dirname(rel)), exist_ok=True)
      Image.fromarray(rng.integers(0, 256, (side, side, 3), np.uint8)).save(os.path.join(folder, rel))
      captions.write(json.dumps({"file": rel, "caption": f"image {i} of class {i % 10}"}) + "\n")
  return time.perf_counter() - t0


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def measure(folder: str, side: int, batch_size: int, seed: int = 0) -> dict:
  """Opens `folder` and reads one epoch of random batches (prefetched 2 deep); runs in its own process."""
  sys.path.insert(0, ROOT)
  from solidmark_jax.data.folders import FolderSource  # pylint: disable=g-import-not-at-top
  rss_start = _peak_rss_mb()
  t0 = time.perf_counter()
  src = FolderSource(folder, side, 3)
  open_s = time.perf_counter() - t0
  rss_open = _peak_rss_mb()
  order = np.random.default_rng(seed).permutation(len(src))
  batches = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
  checksum = 0
  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    futures = [pool.submit(src.read, b) for b in batches[:2]]
    for j in range(len(batches)):
      if j + 2 < len(batches):
        futures.append(pool.submit(src.read, batches[j + 2]))
      out = futures[j].result()
      futures[j] = None
      checksum += int(out["image"][:, 0, 0, 0].sum())
  read_s = time.perf_counter() - t0
  images = len(batches) * batch_size
  return {"images": len(src), "open_s": round(open_s, 3), "read_s": round(read_s, 3),
          "images_per_s": round(images / max(read_s, 1e-9), 1), "batches": len(batches),
          "peak_rss_mb_after_import": round(rss_start, 1), "peak_rss_mb_after_open": round(rss_open, 1),
          "peak_rss_mb": round(_peak_rss_mb(), 1), "decoded_mb": round(len(src) * side * side * 3 / 2**20, 1),
          "checksum": checksum}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
  p.add_argument("--image-size", type=int, default=64)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--workdir", default=None, help="where the folders are written (default: a temporary dir)")
  p.add_argument("--out", default=None, help="JSON output (default: print only)")
  p.add_argument("--smoke", action="store_true", help="tiny sizes (40, 80) at 16 px: seconds")
  p.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: measure one folder
  args = p.parse_args(argv)
  if args.measure:
    print(json.dumps(measure(args.measure, args.image_size, args.batch_size)))
    return {}
  if args.smoke:
    args.sizes, args.image_size, args.batch_size = [40, 80], 16, 8
  root = tempfile.mkdtemp(prefix="bench_folder.", dir=args.workdir)
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(x for x in (ROOT, os.environ.get("PYTHONPATH")) if x)}
  rows = []
  try:
    for n in args.sizes:
      folder = os.path.join(root, f"n{n}")
      os.makedirs(folder)
      write_s = write_folder(folder, n, args.image_size)
      cmd = [sys.executable, os.path.abspath(__file__), "--measure", folder, "--image-size", str(args.image_size),
             "--batch-size", str(args.batch_size)]
      done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
      if done.returncode:
        raise RuntimeError(f"measuring {folder} failed:\n{done.stderr[-3000:]}")
      row = {"size": n, "write_s": round(write_s, 2), **json.loads(done.stdout.strip().splitlines()[-1])}
      print(json.dumps(row), flush=True)
      rows.append(row)
      shutil.rmtree(folder)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  result = {"benchmark": "bench_folder", "command": " ".join(["python", "benchmarks/bench_folder.py"] + (
      argv if argv is not None else sys.argv[1:])), "image_size": args.image_size, "batch_size": args.batch_size,
            "cpus": os.cpu_count(), "python": platform.python_version(), "load_average": list(os.getloadavg()),
            "rows": rows,
            "peak_rss_growth_mb": round(rows[-1]["peak_rss_mb"] - rows[0]["peak_rss_mb"], 1) if rows else None}
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
      f.write("\n")
  return result


if __name__ == "__main__":
  main()
