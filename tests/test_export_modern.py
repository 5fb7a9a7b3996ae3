"""Our export, loaded by today's maintained PyTorch stack (torch, diffusers >= 0.40, transformers >= 5)
with plain `from_pretrained`, computes what our model computes, within the bounds of
`export.PYTORCH_BOUNDS` (docs/export.md).

Tiny models are trained with train.py (pixel: configs/tiny.py as a v-prediction model; latent
text-to-image: configs/tiny_latent.py), exported with `python export.py`, and our
outputs on fixed inputs are handed to tests/export_check/modern_check.py, which runs in a separate
virtualenv (`bash .ci/modern_stack.sh` builds it at $SOLIDMARK_MODERN_VENV, default
${TMPDIR:-/tmp}/solidmark-modern-venv). The check then saves what it loaded with PyTorch's own
`save_pretrained` (a hub-style folder), and our import reads that back to identical parameters.
Without that venv the tests are skipped.
"""

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e2e_helpers import ROOT, _run, cli_env  # noqa: F401  (cli_env is a fixture)
from flax.traverse_util import flatten_dict

from solidmark_jax import parallel
from solidmark_jax.export import PYTORCH_BOUNDS
from solidmark_jax.models._diffusers import FlaxUNet2DConditionModel
from solidmark_jax.models.text import load_text_encoder
from solidmark_jax.models.vae import load_vae
from solidmark_jax.models.weights import load_diffusers_params

CHECK = os.path.join(ROOT, "tests", "export_check", "modern_check.py")


def modern_python() -> str:
  venv = os.environ.get("SOLIDMARK_MODERN_VENV") or os.path.join(tempfile.gettempdir(), "solidmark-modern-venv")
  return os.path.join(venv, "bin", "python")


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.isfile(modern_python()),
                       reason=f"the modern PyTorch stack venv is absent ({modern_python()}): build it with "
                              "`bash .ci/modern_stack.sh` (or point SOLIDMARK_MODERN_VENV at one)"),
]


def _train_and_export(config_file, workdir, fashion_dir, env, *overrides):
  workdir.mkdir()
  args = ["--config", os.path.join(ROOT, "configs", config_file), "--workdir", str(workdir),
          f"--config.data.data_dir={fashion_dir}", *overrides]
  _run([sys.executable, os.path.join(ROOT, "train.py"), *args], env, workdir / "train.log")
  out = workdir / "export"
  log = _run([sys.executable, os.path.join(ROOT, "export.py"), *args, "--out", str(out)], env, workdir / "export.log")
  assert "deprecated" not in log.lower(), log[-3000:]  # no diffusers / transformers Flax banner
  return out


def _config(module, fashion_dir, **diffusion):
  c = module.get_config()
  c.data.data_dir = fashion_dir
  c.diffusion.update(diffusion)
  return c


def _check(out, case, tmp_path):
  """Runs the modern check; PyTorch re-saves what it loaded to tmp_path / "resaved" (hub style)."""
  np.savez(tmp_path / "case.npz", **case)
  (tmp_path / "bounds.json").write_text(json.dumps(PYTORCH_BOUNDS))
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
  p = subprocess.run([modern_python(), CHECK, str(out), str(tmp_path / "case.npz"), str(tmp_path / "bounds.json"),
                      str(tmp_path / "report.json"), str(tmp_path / "resaved")], capture_output=True, text=True, env=env, timeout=600)
  assert os.path.isfile(tmp_path / "report.json"), p.stderr[-5000:]
  report = json.load(open(tmp_path / "report.json"))
  print(json.dumps(report["max_abs_diff"], indent=1))
  assert p.returncode == 0 and not report["failed"], json.dumps(report, indent=1) + p.stderr[-3000:]
  return report


def _assert_equal(got, want):
  flat_got, flat_want = flatten_dict(dict(got)), flatten_dict(dict(want))
  assert set(flat_got) == set(flat_want)
  for k in flat_want:
    np.testing.assert_array_equal(np.asarray(flat_got[k]), np.asarray(flat_want[k]), err_msg="/".join(k))


def exact_gelu():
  """diffusers' Flax GEGLU on the exact GELU (PyTorch's) instead of its tanh approximation, while tracing."""
  return mock.patch.object(nn, "gelu", functools.partial(jax.nn.gelu, approximate=False))


def _unet_outputs(exp, ema, x_t, t, condition):
  """Our UNet's output, and the same with the exact GELU in GEGLU."""
  t = jnp.asarray(t)  # diffusers' Flax UNet takes a jax array of timesteps as it is
  ours = np.asarray(jax.jit(lambda p: exp.model.apply({"params": p}, x_t, t, condition))(ema))
  with exact_gelu():
    exact = np.asarray(jax.jit(lambda p: exp.model.apply({"params": p}, x_t, t, condition))(ema))
  return ours, exact


def _our_model(config, workdir):
  from solidmark_jax.training.state import restore_ema
  from solidmark_jax.experiment import build_experiment
  exp = build_experiment(config)
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
  ema, _, _ = restore_ema(exp, str(workdir), mesh)
  return exp, mesh, jax.device_get(ema)


def test_pixel_v_prediction_export_in_modern_stack(tmp_path, fashion_dir, cli_env):  # noqa: F811
  from configs import tiny
  from solidmark_jax.diffusion import v_to_eps
  wd = tmp_path / "pixel"
  out = _train_and_export("tiny.py", wd, fashion_dir, cli_env, "--config.diffusion.prediction_type=v_prediction")
  exp, _, ema = _our_model(_config(tiny, fashion_dir, prediction_type="v_prediction"), wd)
  assert exp.prediction_type == "v_prediction"
  rs = np.random.default_rng(0)
  x_t = rs.standard_normal((4, 16, 16, 1)).astype(np.float32)
  t = np.array([60, 60, 5, 99], np.int32)  # the v -> eps step check uses t[0]
  c = np.array([0, 3, 7, exp.null_id], np.int32)
  v, v_exact = _unet_outputs(exp, ema, x_t, t, c)
  case = {"x_t": x_t, "t": t, "cond_ids": c, "unet_out": v, "unet_out_exact_gelu": v_exact,
          "abar": np.asarray(exp.sched.abar),
          "eps_from_v": np.asarray(v_to_eps(exp.sched, x_t, t, v))}
  report = _check(out, case, tmp_path)
  assert report["checks"]["scheduler_prediction_type"] == "v_prediction"
  # Import: the folder PyTorch diffusers wrote itself loads into our Flax classes, identical params.
  _assert_equal(load_diffusers_params(FlaxUNet2DConditionModel, str(tmp_path / "resaved" / "unet")), ema["unet"])


def test_latent_text_export_in_modern_stack(tmp_path, fashion_dir, cli_env):  # noqa: F811
  from configs import tiny_latent
  from solidmark_jax.training.state import load_frozen
  wd = tmp_path / "latent"
  out = _train_and_export("tiny_latent.py", wd, fashion_dir, cli_env)
  exp, mesh, ema = _our_model(_config(tiny_latent, fashion_dir), wd)
  exp, frozen = load_frozen(exp, str(wd), train=False, mesh=mesh)
  frozen = jax.device_get(frozen)
  captions = exp.captions[:3] + ["a caption never seen in training"]
  ids = exp.text.tokenize(captions).ids  # [4, L]
  hidden = np.asarray(jax.jit(exp.text.encode)(frozen["text"], ids))
  rs = np.random.default_rng(1)
  z_t = rs.standard_normal((4, 8, 8, 4)).astype(np.float32)
  t = np.array([0, 30, 60, 99], np.int32)
  eps, eps_exact = _unet_outputs(exp, ema, z_t, t, hidden)
  images = exp.read_marked(np.arange(4))["image"]  # [4, 16, 16, 1]
  mean, _ = jax.jit(exp.vae.posterior)(frozen["vae"], images)
  decoded = jax.jit(exp.vae.decode_unscaled)(frozen["vae"], mean)
  case = {"x_t": z_t, "t": t, "token_ids": ids, "hidden": hidden, "unet_out": eps, "unet_out_exact_gelu": eps_exact,
          "abar": np.asarray(exp.sched.abar),
          "captions": np.array(captions), "caption_ids": ids, "images": images, "latent_mean": np.asarray(mean),
          "decoded": np.asarray(decoded)}
  report = _check(out, case, tmp_path)
  assert report["checks"]["pipeline_class"] == "StableDiffusionPipeline"
  assert report["checks"]["vae_scaling_factor"] == pytest.approx(exp.vae.scaling_factor)
  # Import: what PyTorch diffusers / transformers wrote themselves (hub style) loads into our classes.
  resaved = tmp_path / "resaved"
  shutil.copytree(out / "tokenizer", resaved / "tokenizer")
  _assert_equal(load_diffusers_params(FlaxUNet2DConditionModel, str(resaved / "unet")), ema["unet"])
  vae, vae_params = load_vae(str(resaved))
  assert vae.scaling_factor == pytest.approx(exp.vae.scaling_factor)
  _assert_equal(vae_params, frozen["vae"])
  _assert_equal(load_text_encoder(str(resaved)).params, frozen["text"])
