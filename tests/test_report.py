"""Report: files and fields, the resumable results store, interrupt + resume == uninterrupted."""

import csv
import json
import os

import numpy as np
import pytest

from solidmark_jax import marks, metrics
from solidmark_jax.report import ResultStore, Results, write_image_grid, write_report, write_sample_grid

META = {"keymap_hash": "ab12" * 16, "checkpoint_step": 3000, "sampler": "ddim", "num_steps": 50}
R = 3


def fake_k_pred(group, ids, keys):
  """Deterministic per (group, id), like the outpainter seeded by instance id."""
  out = []
  for i, k in zip(ids, keys):
    rs = np.random.default_rng([int(i), len(group)])
    if group == "members" and i % 2 == 0:
      out.append(np.clip(k + rs.normal(0, 0.004, R), 0, 1))
    else:
      out.append(rs.random(R))
  return np.array(out, np.float32)


def groups():
  ids = {"members": np.arange(40), "non_members": np.arange(1000, 1030), "random_init": np.arange(40)}
  return {g: (i, marks.keys_for(1 if g == "non_members" else 0, i)) for g, i in ids.items()}


def run(store, batch_size=8, stop_after=None):
  """Evaluates every group batch by batch, skipping what the store has; may 'crash' after some batches."""
  done = 0
  for g, (ids, keys) in groups().items():
    todo = store.remaining(g, ids)
    for s in range(0, len(todo), batch_size):
      b = todo[s:s + batch_size]
      k = keys[np.searchsorted(ids, b)]
      if stop_after is not None and done == stop_after:
        return False
      store.append(g, b, k, fake_k_pred(g, b, k))
      done += 1
  return True


def test_report_files_and_fields(tmp_path):
  store = ResultStore(str(tmp_path / "results.jsonl"), META)
  assert run(store)
  out = str(tmp_path / "report")
  summary = write_report(out, store.results(), metadata=META)
  for name in ("summary.json", "per_image.csv", "summary.md", "l_sm_hist.png", "eidetic_rates.png", "roc.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  with open(os.path.join(out, "summary.json")) as f:
    s = json.load(f)
  assert s == json.loads(json.dumps(summary))
  assert s["thresholds"] == list(metrics.DEFAULT_THRESHOLDS)
  assert s["statistic"] == "best" and s["keymap_hash"] == META["keymap_hash"] and s["checkpoint_step"] == 3000
  assert list(s["groups"]) == ["members", "non_members", "random_init"]
  m = s["groups"]["members"]
  for field in ("n", "repeats", "counts", "rates", "ci", "chance", "permutation", "reference_chance", "l_sm"):
    assert field in m
  for field in ("expected", "rate", "band", "p_value", "excess", "corrected", "corrected_ci"):
    assert len(m["chance"][field]) == 4, field
  assert m["chance"]["p_value"][1] < 1e-6  # 20 of the 40 members are memorised
  assert s["groups"]["non_members"]["chance"]["p_value"][0] > 0.01  # guesses
  mi = s["comparisons"]["members_vs_non_members"]["membership_inference"]
  assert 0.5 < mi["auc"] <= 1.0 and set(mi["tpr_at_fpr"]) == {"0.01", "0.001"}
  assert m["n"] == 40 and m["repeats"] == R and s["groups"]["non_members"]["n"] == 30
  assert m["counts"][0] >= 20  # the even ids are memorised
  assert set(m["l_sm"]) == {"mean", "median"}
  assert set(s["comparisons"]) == {"members_vs_non_members", "members_vs_random_init"}
  assert s["comparisons"]["members_vs_non_members"]["fisher_p"][1] < 0.01
  with open(os.path.join(out, "per_image.csv")) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 40 + 30 + 40
  assert list(rows[0]) == ["instance_id", "group", "member", "key", "k_pred_0", "k_pred_1", "k_pred_2",
                           "l_sm_best", "l_sm_mean", *[f"chance_{d:g}" for d in metrics.DEFAULT_THRESHOLDS]]
  row = rows[0]
  kp = np.array([float(row[f"k_pred_{j}"]) for j in range(R)])
  l = metrics.l_sm(kp[None], np.array([float(row["key"])]))[0]
  assert float(row["l_sm_best"]) == l.min() and float(row["l_sm_mean"]) == l.mean()
  assert {r["member"] for r in rows if r["group"] == "members"} == {"1"}
  md = open(os.path.join(out, "summary.md")).read()
  assert "| threshold | group |" in md and "(l_SM, 0.005)" in md and "chance expected" in md
  assert md.count("\n| (l_SM,") == 4 * 3 + 4  # a row per threshold and group, then the Fisher table
  assert "members vs non members" in md and "AUC" in md


def test_store_resume_skips_done_and_drops_torn_line(tmp_path):
  path = str(tmp_path / "results.jsonl")
  store = ResultStore(path, META)
  assert not run(store, stop_after=3)  # 3 batches of 8 members stored, then a "crash"
  with open(path, "a") as f:
    f.write('{"group": "members", "instance_id": 24, "ke')  # torn write of the 4th batch
  resumed = ResultStore(path, META)
  assert resumed.done("members") == set(range(24))
  np.testing.assert_array_equal(resumed.remaining("members", np.arange(40)), np.arange(24, 40))
  assert resumed.remaining("non_members", np.arange(1000, 1030)).size == 30
  with open(path) as f:
    assert f.read().endswith("\n")
  with pytest.raises(ValueError, match="checkpoint_step"):
    ResultStore(path, {**META, "checkpoint_step": 4000})


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
  full = ResultStore(str(tmp_path / "a.jsonl"), META)
  assert run(full, batch_size=8)
  path = str(tmp_path / "b.jsonl")
  assert not run(ResultStore(path, META), batch_size=5, stop_after=4)
  assert not run(ResultStore(path, META), batch_size=7, stop_after=6)
  assert run(ResultStore(path, META), batch_size=16)
  a_dir, b_dir = str(tmp_path / "ra"), str(tmp_path / "rb")
  sa = write_report(a_dir, full.results(), metadata=META, plots_enabled=False)
  sb = write_report(b_dir, ResultStore(path, META).results(), metadata=META, plots_enabled=False)
  assert sa == sb
  for name in ("summary.json", "per_image.csv", "summary.md"):
    assert open(os.path.join(a_dir, name)).read() == open(os.path.join(b_dir, name)).read(), name


def test_results_and_statistic_choice(tmp_path):
  res = Results.from_records([
      {"group": "non_members", "instance_id": 5, "key": 0.5, "k_pred": [0.9]},
      {"group": "members", "instance_id": 2, "key": 0.25, "k_pred": [0.25, 0.75]},
      {"group": "members", "instance_id": 1, "key": 0.75, "k_pred": [0.7, 0.7]},
  ])
  np.testing.assert_array_equal(res.instance_id, [1, 2, 5])
  assert res.select("non_members").k_pred.shape == (1, 1)
  best = write_report(str(tmp_path / "best"), res, (0.1, 0.01), statistic="best", key_bits=None,
                      plots_enabled=False)
  mean = write_report(str(tmp_path / "mean"), res, (0.1, 0.01), statistic="mean", key_bits=None,
                      plots_enabled=False)
  assert best["groups"]["members"]["counts"] == [2, 1]
  assert mean["groups"]["members"]["counts"] == [1, 0]
  assert mean["statistic"] == "mean" and "mean" in mean["statistic_doc"]
  assert best["groups"]["non_members"]["repeats"] == 1
  with pytest.raises(ValueError, match=r"\(0, 1\)"):
    write_report(str(tmp_path / "bad"), res, (0.1, 1.5))


def test_image_grids(tmp_path):
  size, pad, n, r = 12, 2, 3, 2
  mask = marks.key_mask(size, size, pad)
  rs = np.random.default_rng(0)
  known = rs.uniform(-1, 1, (n, size, size, 3)).astype(np.float32)
  outs = rs.uniform(-1, 1, (n, r, size, size, 3)).astype(np.float32)
  keys, k_pred = rs.random(n), rs.random((n, r))
  p = write_image_grid(str(tmp_path / "grid.png"), known, mask, outs, keys, k_pred,
                       row_labels=[f"member {i}" for i in range(n)])
  assert os.path.getsize(p) > 0
  p = write_image_grid(str(tmp_path / "grid4.png"), known, mask, outs, rs.random((n, 4)), rs.random((n, r, 4)))
  assert os.path.getsize(p) > 0  # m = 4 keys per image: labelled k=a/b/c/d, l_SM the largest distance
  p = write_sample_grid(str(tmp_path / "samples.png"), outs[..., :1])
  assert os.path.getsize(p) > 0


def test_store_with_four_keys_per_image_roundtrip(tmp_path):
  """m keys per image: key [m] and k_pred [r, m] per record, resumed and read back as [N, m], [N, r, m]."""
  m, r = 4, 2
  ids = np.arange(10)
  keys = marks.keys_for(0, ids, m)  # [10, 4]
  k_pred = np.random.default_rng(0).random((10, r, m))
  path = str(tmp_path / "results.jsonl")
  store = ResultStore(path, META)
  store.append("members", ids[:6], keys[:6], k_pred[:6])
  store.append("non_members", [100], keys[6:7], k_pred[6, 0][None])  # [n, m]: one repeat
  rec = json.loads(open(path).read().splitlines()[1])
  assert rec["key"] == [float(v) for v in keys[0]] and np.shape(rec["k_pred"]) == (r, m)
  resumed = ResultStore(path, META)
  np.testing.assert_array_equal(resumed.remaining("members", ids), ids[6:])
  resumed.append("members", ids[6:], keys[6:], k_pred[6:])
  res = ResultStore(path, META).results()
  assert res.num_keys == m and res.key.shape == (11, m) and res.k_pred.shape == (11, r, m)
  members = res.select("members")
  np.testing.assert_array_equal(members.instance_id, ids)
  np.testing.assert_array_equal(members.key, keys)
  np.testing.assert_array_equal(members.k_pred, k_pred)  # float64 through JSON: exact
  non = res.select("non_members")
  assert non.k_pred.shape == (1, 1, m)  # the all-NaN second repeat column dropped
  np.testing.assert_array_equal(non.k_pred[0, 0], k_pred[6, 0])
  np.testing.assert_array_equal(metrics.l_sm(members.k_pred, members.key, key_bits=None),
                                np.abs(k_pred - keys[:, None]).max(-1))
  with pytest.raises(ValueError, match=r"keys \[n, m\] = \(2, 4\) need k_pred \[n, m\] or \[n, r, m\]"):
    store.append("members", [1, 2], keys[:2], k_pred[:2, :, :3])
  with pytest.raises(ValueError, match="different numbers of keys per image"):
    Results.from_records([{"group": "members", "instance_id": 1, "key": 0.5, "k_pred": [0.5]},
                          {"group": "members", "instance_id": 2, "key": [0.5, 0.1], "k_pred": [[0.5, 0.1]]}])


def test_store_with_one_key_writes_the_same_lines_as_before(tmp_path):
  """One key per image: the record lines are exactly those the store wrote before several keys existed."""
  store = ResultStore(str(tmp_path / "results.jsonl"), META)
  store.append("members", [3, 1], np.array([0.25, 0.5]), np.array([[0.2, 0.3], [0.5, 0.625]], np.float32))
  lines = open(tmp_path / "results.jsonl").read().splitlines()[1:]
  assert lines == ['{"group": "members", "instance_id": 3, "key": 0.25, "k_pred": [0.20000000298023224, '
                   '0.30000001192092896]}',
                   '{"group": "members", "instance_id": 1, "key": 0.5, "k_pred": [0.5, 0.625]}']
  res = store.results()
  assert res.num_keys == 1 and res.key.shape == (2,) and res.k_pred.shape == (2, 2)


@pytest.mark.parametrize("fail", ["write_partial", "fsync_eio"])
def test_failed_append_is_an_error_and_keeps_the_batches_before(tmp_path, monkeypatch, fail):
  """ENOSPC half-way through a batch's write, or EIO at its fsync: a clear error naming the store, the
  file cut back to the batches before, and a re-run resumes from the last complete batch."""
  path = str(tmp_path / "results.jsonl")
  store = ResultStore(path, META)
  assert not run(store, stop_after=2)
  size = os.path.getsize(path)
  real_write, real_fsync = os.write, os.fsync
  if fail == "write_partial":
    calls = []

    def write(fd, data):  # the first chunk gets through, then the disk is full
      if calls:
        raise OSError(28, "No space left on device")
      calls.append(1)
      return real_write(fd, bytes(data)[:50])

    monkeypatch.setattr(os, "write", write)
  else:
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "Input/output error")))
  with pytest.raises(OSError) as e:
    run(store)  # the third batch fails
  msg = str(e.value)
  assert e.value.errno == (28 if fail == "write_partial" else 5)
  assert msg.startswith(f"[Errno {e.value.errno}] {path}: writing 8 result line(s) failed (")
  assert ("No space left on device" if fail == "write_partial" else "Input/output error") in msg
  assert "it keeps the results stored before (16 images)" in msg and "re-run to resume" in msg
  monkeypatch.setattr(os, "write", real_write)
  monkeypatch.setattr(os, "fsync", real_fsync)
  assert os.path.getsize(path) == size  # cut back: no partial batch left
  resumed = ResultStore(path, META)
  assert resumed.done("members") == set(range(16))
  assert run(resumed)
  full = ResultStore(str(tmp_path / "full.jsonl"), META)
  assert run(full)
  assert write_report(str(tmp_path / "a"), resumed.results(), metadata=META, plots_enabled=False) == write_report(
      str(tmp_path / "b"), full.results(), metadata=META, plots_enabled=False)


def test_one_percent_and_p_value_format_for_every_page():
  from solidmark_jax.report import p_value, percent
  assert percent(0.12345) == "12.3%" and percent(0.12345, 2) == "12.35%" and percent(None) == "-"
  assert p_value(0.31234) == "0.312" and p_value(2e-4) == "2.00e-04"
  assert p_value(None) == "-" and p_value(float("nan")) == "-"
