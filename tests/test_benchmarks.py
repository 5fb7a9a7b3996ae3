"""Every script in benchmarks/ runs end to end in its --smoke mode (tiny models, one repeat).

Each runs in a subprocess with 2 fake CPU devices; the PyTorch peers run where torch is installed
(the `bench` extra) and are skipped with a message otherwise, which the tests check for.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TORCH = importlib.util.find_spec("torch") is not None
SCRIPTS = sorted(f for f in os.listdir(os.path.join(ROOT, "benchmarks")) if f.endswith(".py"))


def run(script: str, *args: str, timeout: int = 1200) -> str:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu", USE_TF="0")
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--smoke", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, f"{script} --smoke failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
  return proc.stdout


def test_every_benchmark_script_has_a_smoke_test():
  tested = {"bench_unet.py", "bench_conv_grad.py", "sd21_flops.py", "project_tpu.py", "bench_remat.py",
            "accelerator_check.py",
            "bench_folder.py"}  # its smoke test: tests/test_bench_folder.py
  assert set(SCRIPTS) == tested, f"scripts without a smoke test here: {set(SCRIPTS) - tested}"


@pytest.mark.slow
def test_bench_unet_smoke(tmp_path):
  out = run("bench_unet.py", "--out-dir", str(tmp_path), "--trace", str(tmp_path / "trace"))
  result = json.loads((tmp_path / "smoke.json").read_text())
  assert result["train"]["images_per_s"]["jax"] > 0 and result["outpaint"]["keys_per_s"]["jax"] > 0
  assert result["train_phases"]["median_s"]["jax_backward"] is not None
  assert any(files for _, _, files in os.walk(tmp_path / "trace"))  # the profiler wrote a trace
  ops = result["train"]["trace_ops"]  # the trace's XLA ops, summed by kind
  assert ops and abs(sum(r["share"] for r in ops) - 1.0) < 1e-6 and all(r["ms"] > 0 for r in ops)
  sources = {r["op"] for r in result["train"]["trace_sources"]}  # the same ops by the JAX operation they compute
  assert {"forward conv_general_dilated", "backward conv_general_dilated"} <= sources, sources
  assert "backward all-reduce" in sources and not any(s.endswith(")") for s in sources), sources  # 2 devices
  if HAS_TORCH:
    assert result["with_torch"] and result["equality"]["max_abs_diff_eps"] < 1e-3
    assert "torch" in result["train"]["images_per_s"]
  else:
    assert "PyTorch peer is skipped" in out and not result["with_torch"]


@pytest.mark.slow
def test_flops_and_projection_smoke(tmp_path):
  run("sd21_flops.py", "--out", str(tmp_path / "flops.json"))
  flops = json.loads((tmp_path / "flops.json").read_text())
  assert flops["smoke"] and flops["unet"]["8"]["flops_per_image"] > 0 and flops["vae"]["8"]["decode_flops"] > 0
  run("project_tpu.py", "--flops", str(tmp_path / "flops.json"), "--out", str(tmp_path / "proj.json"))
  rows = json.loads((tmp_path / "proj.json").read_text())["rows"]
  assert rows and all(r["keys_per_s"][0] > 0 for r in rows)


def test_a_smoke_run_leaves_the_recorded_results_alone():
  """Without --out a smoke run writes under benchmarks/results/smoke/ (git-ignored), not over the file a
  full run recorded (here the committed projection, which it would otherwise replace with one row)."""
  recorded = os.path.join(ROOT, "benchmarks", "results", "tpu_projection.json")
  with open(recorded) as f:
    before = f.read()
  out = run("project_tpu.py")
  smoke = os.path.join(ROOT, "benchmarks", "results", "smoke", "tpu_projection.json")
  assert f"wrote {smoke}" in out
  with open(recorded) as f:
    assert f.read() == before
  with open(smoke) as f:
    assert len(json.load(f)["rows"]) < len(json.loads(before)["rows"])


@pytest.mark.slow
def test_conv_grad_smoke(tmp_path):
  out = run("bench_conv_grad.py", "--out", str(tmp_path / "conv.json"))
  row = json.loads((tmp_path / "conv.json").read_text())["rows"][0]
  assert row["jax_gflops"]["forward"] > 0
  for name in ("grad_input_backward_only", "grad_kernel_backward_only"):  # a rate, or null where not resolved
    assert row["jax_gflops"][name] is None or row["jax_gflops"][name] > 0
  assert ("torch_gflops" in row) == HAS_TORCH
  if not HAS_TORCH:
    assert "XLA columns only" in out


def _load(script: str):
  """benchmarks/<script> imported as a module."""
  spec = importlib.util.spec_from_file_location(script[:-3], os.path.join(ROOT, "benchmarks", script))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_conv_grad_backward_rate_is_null_where_the_gradient_call_is_not_slower():
  module = _load("bench_conv_grad.py")
  assert module.backward_gflops(3e9, 2.0, 0.5) == 2.0  # 3 GFLOP in the 1.5 s the backward half took
  assert module.backward_gflops(3e9, 0.5, 0.5) is None and module.backward_gflops(3e9, 0.4, 0.5) is None


@pytest.mark.slow
def test_remat_memory_smoke(tmp_path):
  run("bench_remat.py", "--out", str(tmp_path / "remat.json"))
  rows = json.loads((tmp_path / "remat.json").read_text())["rows"]
  assert {r["remat"] for r in rows} == {"none", "nothing_saveable"}
  assert all(r["temp_bytes"] > 0 and r["argument_bytes"] > 0 for r in rows)
  plain, remat = sorted(rows, key=lambda r: r["remat"] != "none")
  # the policy's own effect, whatever the backend does with it: fewer activations kept, convolutions recomputed
  assert 0 < remat["residual_bytes"] < 0.5 * plain["residual_bytes"], rows
  assert remat["convolutions_lowered"] > plain["convolutions_lowered"], rows
  assert remat["recomputed_convolutions"] > 0 == plain["recomputed_convolutions"], rows  # found in the schedule


@pytest.mark.slow
def test_accelerator_check_smoke(tmp_path):
  out = run("accelerator_check.py", "--out", str(tmp_path / "acc.json"), "--budget-s", "100000")
  result = json.loads((tmp_path / "acc.json").read_text())
  train, best = result["sections"]["train"], result["sections"]["outpaint_best"]
  for dtype in ("float32", "bfloat16"):
    row = train[f"jax_{dtype}"]
    assert row["images_per_s"] > 0 and row["flops_per_step"] > 0 and row["mfu_vs_bf16_matmul"] > 0
  assert best["jax"]["keys_per_s"] > 0
  if HAS_TORCH:
    assert train["torch_bfloat16"]["images_per_s"] > 0 and best["torch"]["keys_per_s"] > 0
  assert "| train step bfloat16 |" in out and not result["skipped"]
  assert "smoke mode: a 128^3 matmul" in out  # its MFU is labelled as meaningless
  for remat in ("none", "nothing_saveable"):  # compiled at two batches: memory per image
    memory = result["sections"]["memory"][f"train_bfloat16_{remat}"]
    assert memory["temp_bytes_per_image"] > 0 and set(memory["batches"]) == {"2", "4"}
    assert memory["largest_batch"] is None  # the CPU backend reports no memory limit to fit


def test_a_cut_off_accelerator_check_keeps_what_it_measured(tmp_path):
  """The JSON is written after every section, so a run stopped by its time limit keeps the rest."""
  module = _load("accelerator_check.py")
  assert module.largest_batch(16, 10e9, 32, 14e9, 80e9) == int((0.9 * 80e9 - 6e9) // 0.25e9)  # 264
  assert module.largest_batch(16, 10e9, 16, 10e9, 80e9) is None and module.largest_batch(16, 1, 32, 2, None) is None
  out = tmp_path / "acc.json"
  real = module.jax_train_memory
  module.jax_train_memory = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)  # killed in the last section
  try:
    with pytest.raises(KeyboardInterrupt):
      module.main(["--smoke", "--sections", "matmul", "memory", "--only", "jax", "--out", str(out)])
  finally:
    module.jax_train_memory = real
  kept = json.loads(out.read_text())
  assert kept["sections"]["matmul_tflops"]["jax"]["float32"] > 0 and "memory" not in kept["sections"]
