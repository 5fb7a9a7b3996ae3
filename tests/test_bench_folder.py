"""benchmarks/bench_folder.py --smoke runs (so the benchmark cannot drift until it crashes)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_folder_smoke(tmp_path):
  out = tmp_path / "folder.json"
  done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_folder.py"), "--smoke",
                         "--workdir", str(tmp_path), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(out.read_text())
  assert [r["size"] for r in result["rows"]] == [40, 80]
  for row in result["rows"]:
    assert row["images"] == row["size"] and row["batches"] == row["size"] // 8
    assert row["open_s"] > 0 and row["images_per_s"] > 0
    assert row["peak_rss_mb"] >= row["peak_rss_mb_after_open"] >= row["peak_rss_mb_after_import"] > 0
  assert sorted(os.listdir(tmp_path)) == ["folder.json"]  # the folders are removed
