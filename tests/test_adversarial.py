"""Adversarial fine-tuning (evaluation/adversarial.py): it raises the targeted images' loss to the cap while
the retain loss stays, resumes after a kill with the same parameters bit for bit, refuses a checkpoint of
other settings, and names bad settings. A toy denoiser whose clean image's border is tanh(w . c) keeps it
fast: the targeted conditions lie along e1, e2 and the retained along e3, e4, so the right answer exists
(move w1, w2 only)."""

import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solidmark_jax import marks
from solidmark_jax.diffusion import make_schedule
from solidmark_jax.evaluation import adversarial
from solidmark_jax.evaluation.adversarial import AdversarialSpec, finetune
from solidmark_jax.evaluation.dori import denoising_loss

from toy_models import tanh_border_model

T = 100
SCHED = make_schedule("cosine", T)
SIZE, PAD, D = 8, 2, 4
MASK = marks.key_mask(SIZE, SIZE, PAD)  # [H, W, 1]
CONTENT = np.random.default_rng(0).uniform(-1, 1, (SIZE, SIZE, 1)).astype(np.float32)

toy_x0, toy_denoiser = tanh_border_model(SCHED, MASK)  # border tanh(w . c); eps its oracle


def sets():
  """A model that memorises four images (its borders are their keys), two targeted, two retained."""
  keys = np.array([0.2, 0.7, 0.35, 0.8], np.float32)
  w = np.array([1.0, 1.0, 1.0, 1.0], np.float32)
  c = np.zeros((4, D), np.float32)
  c[np.arange(4), np.arange(4)] = np.arctanh(2.0 * keys - 1.0)  # image i's condition along e_i
  x0 = np.asarray(MASK * (2.0 * keys[:, None, None, None] - 1.0) + (1.0 - MASK) * CONTENT, np.float32)
  params = {"w": jnp.asarray(w), "content": jnp.asarray(CONTENT)}
  ids = np.arange(4, dtype=np.int32)
  return params, (x0[:2], c[:2], ids[:2]), (x0[2:], c[2:], ids[2:])


SPEC = AdversarialSpec(steps=60, learning_rate=0.05, trigger_steps=5, trigger_learning_rate=0.05, draws=4,
                       checkpoint_every=2, targets=2)
CAP = 0.3


def losses(params, group):
  x0, c, ids = group
  return np.asarray(denoising_loss(toy_denoiser, params, SCHED, x0, c, jax.random.key(7), draws=16, ids=ids))


def test_finetune_unlearns_the_targeted_keys_and_keeps_the_retained_ones():
  params, forget, retain = sets()
  before_f, before_r = losses(params, forget), losses(params, retain)
  assert np.all(before_f < 1e-6) and np.all(before_r < 1e-6)  # the oracle: memorised exactly
  tuned, record = finetune(toy_denoiser, params, SCHED, forget, retain, SPEC, cap=CAP, progress=False)
  after_f, after_r = losses(tuned, forget), losses(tuned, retain)
  # the eps-MSE is heavy-tailed in t (a border error weighs sqrt(abar_t / (1 - abar_t))), so the keys say more
  assert after_f.mean() > 0.2 * CAP and after_f.mean() > 5 * after_r.mean(), (after_f, after_r)
  w = np.asarray(tuned["w"])
  key = lambda group: (np.tanh(group[1] @ w) + 1.0) / 2.0  # the border the model outpaints for a caption
  assert np.all(np.abs(key(forget) - np.array([0.2, 0.7])) > 0.1), key(forget)  # the targeted keys are gone
  assert np.all(np.abs(key(retain) - np.array([0.35, 0.8])) < 0.03), key(retain)  # the retained ones stay
  assert record["steps_done"] == SPEC.steps and len(record["history"]) == SPEC.steps
  h = record["history"]
  assert np.mean([x["forget_loss"] for x in h[-10:]]) > 10 * max(h[0]["forget_loss"], 1e-3)
  assert all(np.isfinite(v) for step in h for v in step.values())
  assert record["cap"] == CAP and record["spec"]["steps"] == SPEC.steps


_WORKER = textwrap.dedent("""
    import logging, os, signal, sys
    import numpy as np
    logging.basicConfig(level=logging.INFO)
    sys.path.insert(0, {tests!r})
    import test_adversarial as t
    kill_at = int(sys.argv[2])
    def on_step(step, metrics):
      if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # a kill mid-run: no cleanup, no final checkpoint
    params, forget, retain = t.sets()
    tuned, record = t.finetune(t.toy_denoiser, params, t.SCHED, forget, retain, t.SPEC.replace(steps=9), cap=t.CAP,
                               directory=sys.argv[1], progress=False, on_step=on_step)
    np.savez(os.path.join(sys.argv[1], "out.npz"), w=np.asarray(tuned["w"]), content=np.asarray(tuned["content"]),
             loss=np.array([h["loss"] for h in record["history"]]))
""")


def test_finetune_resumes_after_a_kill_with_the_same_result(tmp_path):
  params, forget, retain = sets()
  spec = SPEC.replace(steps=9)
  straight, record = finetune(toy_denoiser, params, SCHED, forget, retain, spec, cap=CAP, progress=False,
                              directory=str(tmp_path / "straight"))
  directory = str(tmp_path / "killed")
  script = _WORKER.format(tests=os.path.dirname(os.path.abspath(__file__)))
  run = lambda kill_at: subprocess.run([sys.executable, "-c", script, directory, str(kill_at)], capture_output=True,
                                       text=True, timeout=300)
  killed = run(5)  # checkpoints at 2 and 4 are committed, step 5 is lost with the process
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  assert sorted(int(d) for d in os.listdir(directory) if d.isdigit()) == [2, 4]
  resumed = run(-1)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resuming adversarial fine-tuning at step 4" in resumed.stderr
  out = np.load(os.path.join(directory, "out.npz"))
  np.testing.assert_array_equal(out["w"], np.asarray(straight["w"]))  # bit for bit
  np.testing.assert_array_equal(out["content"], np.asarray(straight["content"]))
  np.testing.assert_array_equal(out["loss"], np.array([h["loss"] for h in record["history"]]))
  # a finished run re-run does no step and returns its end
  again, rec2 = finetune(toy_denoiser, params, SCHED, forget, retain, spec, cap=CAP, progress=False,
                         directory=str(tmp_path / "straight"),
                         on_step=lambda *_: pytest.fail("a finished fine-tuning stepped again"))
  np.testing.assert_array_equal(np.asarray(again["w"]), np.asarray(straight["w"]))
  assert rec2["history"] == record["history"]


def test_a_checkpoint_of_other_settings_or_inputs_is_refused(tmp_path):
  params, forget, retain = sets()
  spec = SPEC.replace(steps=2)
  finetune(toy_denoiser, params, SCHED, forget, retain, spec, cap=CAP, progress=False, directory=str(tmp_path))
  with pytest.raises(ValueError, match="another fine-tuning .*spec"):
    finetune(toy_denoiser, params, SCHED, forget, retain, spec.replace(learning_rate=0.01), cap=CAP, progress=False,
             directory=str(tmp_path))
  with pytest.raises(ValueError, match="another fine-tuning .*cap"):
    finetune(toy_denoiser, params, SCHED, forget, retain, spec, cap=0.5, progress=False, directory=str(tmp_path))
  swapped = (retain[0], retain[1], forget[2])
  with pytest.raises(ValueError, match="another fine-tuning .*inputs"):
    finetune(toy_denoiser, params, SCHED, swapped, retain, spec, cap=CAP, progress=False, directory=str(tmp_path))


def test_bad_settings_are_clear_errors():
  params, forget, retain = sets()
  for field, value in (("steps", 0), ("learning_rate", -1.0), ("trigger_steps", 0), ("weight", float("nan")),
                       ("cap", 0.0), ("draws", 1.5), ("targets", 0), ("seed", -1), ("trigger_max_norm", 0.0)):
    with pytest.raises(ValueError, match=f"adversarial.{field}"):
      AdversarialSpec(**{field: value})
  with pytest.raises(ValueError, match=r"eval.adversarial: unknown fields \['steps'\]"):
    AdversarialSpec.from_config({"steps": 10})  # the steps are the sweep setting's value
  with pytest.raises(ValueError, match="eval.adversarial.weight"):
    AdversarialSpec.from_config({"weight": 0})
  with pytest.raises(ValueError, match="cap"):
    finetune(toy_denoiser, params, SCHED, forget, retain, SPEC, progress=False)  # no cap anywhere
  ids_as_conditions = (forget[0], np.arange(2), None)
  with pytest.raises(ValueError, match="forget conditions must be float embeddings"):
    finetune(toy_denoiser, params, SCHED, ids_as_conditions, retain, SPEC, cap=CAP, progress=False)
  with pytest.raises(ValueError, match="retain images must be"):
    finetune(toy_denoiser, params, SCHED, forget, (retain[0][0], retain[1], None), SPEC, cap=CAP, progress=False)
  assert adversarial.AdversarialSpec.from_config(None) == AdversarialSpec()
