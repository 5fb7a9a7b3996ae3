"""End to end: a latent text-to-image model (configs/tiny_latent.py) trained, evaluated and exported
through the same train.py / evaluate.py as pixel models: VAE stage 1, UNet on latents conditioned on
captions through a fresh text encoder, latent RePaint with guidance, report, diffusers export."""

import json
import os
import sys

import numpy as np
import pytest

from e2e_helpers import ROOT, _run, _snapshot, cli_env  # noqa: F401  (cli_env is a fixture)

CONFIG = os.path.join(ROOT, "configs", "tiny_latent.py")


def _cmd(script, workdir, data_dir, *extra):
  return [sys.executable, *([os.path.join(ROOT, script)] if script.endswith(".py") else ["-m", script]),
          "--config", CONFIG, "--workdir", str(workdir), f"--config.data.data_dir={data_dir}", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fashion_dir, cli_env):  # noqa: F811
  workdir = tmp_path_factory.mktemp("latent")
  log = _run(_cmd("train.py", workdir, fashion_dir), cli_env, workdir / "train.log")
  return workdir, log


def test_train_runs_vae_stage_then_unet_on_latents(trained):
  workdir, log = trained
  assert "stage 1" in log and "the UNet sees 8x8x4" in log
  vae_cfg = json.load(open(workdir / "vae" / "config.json"))
  assert vae_cfg["latent_channels"] == 4 and vae_cfg["scaling_factor"] > 0
  assert os.path.isdir(workdir / "text" / "text_encoder") and os.path.isdir(workdir / "text" / "tokenizer")
  assert os.listdir(workdir / "checkpoints")


def test_train_again_is_a_no_op(trained, fashion_dir, cli_env, tmp_path):  # noqa: F811
  workdir, _ = trained
  before = _snapshot(workdir / "vae")
  log = _run(_cmd("train.py", workdir, fashion_dir), cli_env, tmp_path / "again.log")
  assert "nothing to do" in log and "stage 1: 4 VAE steps" not in log
  assert _snapshot(workdir / "vae") == before


def test_evaluate_writes_latent_report(trained, fashion_dir, cli_env, tmp_path):  # noqa: F811
  workdir, _ = trained
  _run(_cmd("evaluate.py", workdir, fashion_dir), cli_env, tmp_path / "eval.log")
  summary = json.load(open(workdir / "eval" / "summary.json"))
  meta = summary["metadata"]
  assert meta["model"] == {"space": "latent", "condition": "text"}
  assert meta["bad_input"]["train"] == {"skipped_records": 0, "truncated_captions": 0}
  rows = [json.loads(line) for line in open(workdir / "eval" / "results.jsonl") if '"k_pred"' in line]
  groups = {r["group"] for r in rows}
  assert groups == {"members", "non_members"}
  k_pred = np.array([k for r in rows for k in r["k_pred"]])
  assert len(k_pred) == 16 and np.all((k_pred >= 0) & (k_pred <= 1))
  assert os.path.isfile(workdir / "eval" / "outpaintings.png")


def test_export_loads_back_in_diffusers(trained, fashion_dir, cli_env, tmp_path):  # noqa: F811
  workdir, _ = trained
  out = tmp_path / "export"
  _run(_cmd("export.py", workdir, fashion_dir, "--out", str(out)), cli_env, tmp_path / "export.log")
  from solidmark_jax.models._diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel
  unet, unet_params = FlaxUNet2DConditionModel.from_pretrained(str(out / "unet"))
  assert unet.config.in_channels == 4 and unet.config.cross_attention_dim == 32
  vae, _ = FlaxAutoencoderKL.from_pretrained(str(out / "vae"))
  assert vae.config.scaling_factor == json.load(open(workdir / "vae" / "config.json"))["scaling_factor"]
  assert os.path.isdir(out / "text_encoder") and os.path.isdir(out / "tokenizer")
  assert json.load(open(out / "model_index.json"))["unet"][1] == "UNet2DConditionModel"
  assert sum(np.size(x) for x in __import__("jax").tree.leaves(unet_params)) > 0
