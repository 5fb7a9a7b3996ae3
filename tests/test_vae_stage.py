"""Stage 1 (VAE training): the loss, a run on configs/tiny.py's marked Fashion-MNIST images that
writes a diffusers VAE with a measured scaling factor, resuming, not redoing a finished stage,
refusing a workdir of another config, and clear errors for bad batch sizes and a missing VAE."""

import json
import logging
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from solidmark_jax.experiment import build_experiment
from solidmark_jax.models._diffusers import FlaxAutoencoderKL
from solidmark_jax.models.vae import build_vae, init_vae_params, load_vae
from solidmark_jax.training import vae_stage
from solidmark_jax.training.preemption import Preempted
from solidmark_jax.workdir import Workdir


def stage_config(fashion_dir, **vae):
  c = tiny.get_config()
  c.data.data_dir = fashion_dir
  c.model.space = "latent"
  c.vae.block_out_channels = (8, 8)
  c.vae.norm_num_groups = 8
  c.vae.latent_channels = 4
  c.vae.batch_size = 8
  c.vae.train_steps = 2
  c.vae.learning_rate = 1e-3
  c.train.checkpoint_every = 2
  c.train.log_every = 1
  for k, v in vae.items():
    c.vae[k] = v
  return c


class Recorder:
  """The experiment, recording which instance rows stage 1 reads."""

  def __init__(self, exp):
    self.exp, self.reads = exp, []

  def __getattr__(self, name):
    return getattr(self.exp, name)

  def read_marked(self, ids):
    self.reads.append(np.asarray(ids))
    return self.exp.read_marked(ids)


@pytest.fixture(scope="module")
def exp(fashion_dir):
  config = stage_config(fashion_dir)
  config.model.space = "pixel"  # the stage needs the data only; a pixel experiment builds without a VAE
  return build_experiment(config)


def test_loss_kl_matches_diffusers_and_reconstruction_kinds():
  import ml_collections
  vae = build_vae(ml_collections.ConfigDict(dict(block_out_channels=(8,), layers_per_block=1, latent_channels=2,
                                                 norm_num_groups=8)), 1)
  params = init_vae_params(vae, 0, 8)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 1)).astype(np.float32)
  loss, parts = jax.jit(lambda p: vae_stage.vae_loss(vae, p, x, jax.random.key(0), kl_weight=0.5))(params)
  dist = vae.module.apply({"params": params}, jnp.transpose(x, (0, 3, 1, 2)), method=FlaxAutoencoderKL.encode)
  np.testing.assert_allclose(parts["kl"], np.mean(dist.latent_dist.kl()), rtol=1e-5)
  np.testing.assert_allclose(loss, parts["reconstruction"] + 0.5 * parts["kl"], rtol=1e-6)
  _, l2 = vae_stage.vae_loss(vae, params, x, jax.random.key(0), kl_weight=0.5, reconstruction="l2")
  assert l2["reconstruction"] != parts["reconstruction"]
  with pytest.raises(ValueError, match="vae.reconstruction"):
    vae_stage.make_vae_train_step(vae, vae_stage.make_vae_optimizer(ml_collections.ConfigDict(
        {"learning_rate": 1e-3})), kl_weight=0.0, reconstruction="lpips")


def test_train_resume_and_finished_stage(exp, fashion_dir, tmp_path):
  wd = str(tmp_path / "wd")
  config = stage_config(fashion_dir)
  rec = Recorder(exp)
  rec.config = config
  vae, params = vae_stage.train_vae(rec, wd)
  folder = os.path.join(wd, "vae")
  record = json.load(open(os.path.join(folder, vae_stage.STAGE_FILE)))
  assert record["steps"] == 2 and record["scaling_factor_measured"] and record["keymap_hash"] == exp.keymap.hash
  assert len(rec.reads) == 2 + 4  # 2 training batches, then 4 batches (one epoch of 32) for the latent std
  # The scaling factor is 1 / std of the posterior samples of those 4 batches.
  enc = jax.jit(lambda p, x, r: vae.with_scaling_factor(1.0).encode(p, x, r))
  z = np.concatenate([np.asarray(enc(params, exp.read_marked(ids)["image"], jax.random.fold_in(
      jax.random.key(config.seed + 13), b))).ravel() for b, ids in enumerate(rec.reads[2:])])
  np.testing.assert_allclose(vae.scaling_factor, 1.0 / z.std(), rtol=1e-4)
  module, loaded = FlaxAutoencoderKL.from_pretrained(folder)
  assert module.config.scaling_factor == pytest.approx(vae.scaling_factor)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(a, np.asarray(b))

  # A larger vae.train_steps continues from the checkpoint at step 2: it reads batches 2 and 3 first.
  config4 = stage_config(fashion_dir, train_steps=4)
  rec4 = Recorder(exp)
  rec4.config = config4
  vae4, params4 = vae_stage.train_vae(rec4, wd)
  assert len(rec4.reads) == 2 + 4
  from solidmark_jax.data.instances import BatchPlan
  plan = BatchPlan(len(exp.instances), 8, config.seed + 11)
  np.testing.assert_array_equal(rec4.reads[0], plan.global_rows(2))
  np.testing.assert_array_equal(rec4.reads[1], plan.global_rows(3))
  assert json.load(open(os.path.join(folder, vae_stage.STAGE_FILE)))["steps"] == 4
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params4)))

  # Finished: nothing is read or trained again; the VAE comes from vae/.
  again = Recorder(exp)
  again.config = config4
  vae_again, params_again = vae_stage.train_vae(again, wd)
  assert again.reads == [] and vae_again.scaling_factor == pytest.approx(vae4.scaling_factor)
  for a, b in zip(jax.tree.leaves(params4), jax.tree.leaves(params_again)):
    np.testing.assert_array_equal(a, np.asarray(b))
  vae_e, _ = vae_stage.load_trained_vae(config4, wd)
  assert vae_e.scaling_factor == pytest.approx(vae4.scaling_factor)

  # Another config over the same workdir is refused, naming the field.
  other = Recorder(exp)
  other.config = stage_config(fashion_dir, train_steps=4, kl_weight=1e-3)
  with pytest.raises(ValueError, match=r"vae.kl_weight: workdir 1e-06 vs config 0.001"):
    vae_stage.train_vae(other, wd)
  with pytest.raises(ValueError, match="vae.kl_weight"):
    vae_stage.load_trained_vae(other.config, wd)

  # A stage record written before marks.num_keys / marks.key_layout existed stays valid while the config
  # holds their defaults (what the older code did); another key count is refused, naming the field.
  path = os.path.join(folder, vae_stage.STAGE_FILE)
  record = json.load(open(path))
  for field in ("num_keys", "key_layout"):
    del record["fingerprint_fields"]["marks"][field]
  json.dump(record, open(path, "w"))
  vae_stage.load_trained_vae(config4, wd)
  four = stage_config(fashion_dir, train_steps=4)
  four.marks.num_keys = 4
  with pytest.raises(ValueError, match=r"marks.num_keys: workdir None vs config 4"):
    vae_stage.load_trained_vae(four, wd)

  # vae.pretrained: loaded as it is, nothing trained.
  pre = Recorder(exp)
  pre.config = stage_config(fashion_dir, pretrained=folder, scaling_factor=0.3)
  vae_p, _ = vae_stage.train_vae(pre, str(tmp_path / "other_wd"))
  assert pre.reads == [] and vae_p.scaling_factor == 0.3 and not os.path.exists(tmp_path / "other_wd")


def test_bad_batch_sizes_and_missing_vae(exp, fashion_dir, tmp_path):
  for size, message in ((64, r"vae.batch_size=64 is larger than the 32 training instances"),
                        (12, r"vae.batch_size=12 must be divisible by the 8 devices")):
    rec = Recorder(exp)
    rec.config = stage_config(fashion_dir, batch_size=size)
    with pytest.raises(ValueError, match=message):
      vae_stage.train_vae(rec, str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"no finished stage-1 VAE .*train first"):
    vae_stage.load_trained_vae(stage_config(fashion_dir), str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no such folder"):
    load_vae(str(tmp_path / "vae"))


class _SignalOnLog(logging.Handler):
  """Sends this process `signum` when a log message containing `text` is emitted (then once only)."""

  def __init__(self, text: str, signum: int):
    super().__init__()
    self.text, self.signum, self.sent = text, signum, False

  def emit(self, record):
    if not self.sent and self.text in record.getMessage():
      self.sent = True
      signal.raise_signal(self.signum)


def test_sigint_stops_at_a_step_with_a_checkpoint_and_resumes_bit_for_bit(exp, fashion_dir, tmp_path):
  """SIGINT as the stage starts: step 1 is finished and checkpointed, Preempted raised, no vae/ written;
  the re-run continues from step 1 and ends with the uninterrupted run's parameters, bit for bit."""
  config = stage_config(fashion_dir, train_steps=4)
  ref = Recorder(exp)
  ref.config = config
  _, params_ref = vae_stage.train_vae(ref, str(tmp_path / "ref"))

  wd = str(tmp_path / "wd")
  trigger = _SignalOnLog("stage 1: training the VAE, steps 1 to 4", signal.SIGINT)
  stage_log = logging.getLogger(vae_stage.__name__)
  stage_log.addHandler(trigger)
  level = stage_log.level
  stage_log.setLevel(logging.INFO)
  handler_before = signal.getsignal(signal.SIGINT)
  rec = Recorder(exp)
  rec.config = config
  try:
    with pytest.raises(Preempted) as e:
      vae_stage.train_vae(rec, wd)
  finally:
    stage_log.removeHandler(trigger)
    stage_log.setLevel(level)
  assert trigger.sent and signal.getsignal(signal.SIGINT) is handler_before  # handlers restored
  assert (e.value.step, e.value.signal_name, e.value.stage) == (1, "SIGINT", "stage 1 (VAE)")
  assert str(e.value).startswith("stage 1 (VAE) preempted by SIGINT after step 1: checkpoint 1 written in "
                                 f"{Workdir(wd).vae_checkpoints}")
  assert len(rec.reads) == 1 and not os.path.exists(Workdir(wd).vae)
  assert sorted(d for d in os.listdir(Workdir(wd).vae_checkpoints) if d.isdigit()) == ["1"]

  again = Recorder(exp)
  again.config = config
  _, params = vae_stage.train_vae(again, wd)
  from solidmark_jax.data.instances import BatchPlan
  np.testing.assert_array_equal(again.reads[0], BatchPlan(len(exp.instances), 8, config.seed + 11).global_rows(1))
  for a, b in zip(jax.tree.leaves(params_ref), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
