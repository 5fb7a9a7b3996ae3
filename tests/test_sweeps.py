"""Sweeps (evaluation/sweeps.py): settings parsing, one process over several GNI strengths (trains first, compiles
the outpainter once per shape, a report per setting, resumes after an interruption without redoing
finished work, GNI rows differ from sigma = 0), and duplication scoring end to end.

In-process on configs/tiny.py with one UNet block, trained 2 steps (8 fake CPU devices, conftest.py).
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from configs import paper_table3_mitigations, tiny
from solidmark_jax import marks, report
from solidmark_jax.evaluation import dori, mitigations
from solidmark_jax.evaluation.evaluator import build_evaluator
from solidmark_jax.metrics import chance, memorisation
from solidmark_jax.evaluation import sweeps

ONE_BLOCK = {"model.block_out_channels": (32,), "model.down_block_types": ("CrossAttnDownBlock2D",),
             "model.up_block_types": ("CrossAttnUpBlock2D",)}
SIGMAS = (0.0, 0.5, 2.0)


def _config(fashion_dir, **extra):
  c = tiny.get_config()
  c.update_from_flattened_dict({
      **ONE_BLOCK, "data.data_dir": fashion_dir, "train.num_steps": 2, "train.checkpoint_every": 2,
      "eval.num_members": 8, "eval.num_nonmembers": 8, "eval.batch_size": 8, "eval.repeats": 2,
      "eval.num_steps": 4, "eval.num_grid": 0, "sweep.kind": "mitigation", "sweep.name": "gni",
      "sweep.values": SIGMAS})
  c.update_from_flattened_dict({k.replace("__", "."): v for k, v in extra.items()})
  return c


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """A persistent XLA cache for this module: the second evaluator of one model compiles from it."""
  old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  yield
  jax.config.update("jax_compilation_cache_dir", old[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])


def _rows(path) -> list[dict]:
  return [json.loads(line) for line in open(path).read().splitlines()[1:]]


class _Interrupt(Exception):
  pass


def _count_appends(monkeypatch, fail_at: int | None = None) -> list:
  """Counts ResultStore.append calls; raises _Interrupt at call `fail_at` (before it writes)."""
  calls = []
  original = report.ResultStore.append

  def append(self, group, ids, keys, k_pred, *rest):
    calls.append((os.path.basename(os.path.dirname(self.path)), group, len(ids)))
    if fail_at is not None and len(calls) == fail_at:
      raise _Interrupt("interrupted")
    return original(self, group, ids, keys, k_pred, *rest)

  monkeypatch.setattr(report.ResultStore, "append", append)
  return calls


# ---------------------------------------------------------------------------------------------
# Settings: parsed from the config, bad input named.


def test_settings_from_config_orders_the_baseline_first():
  c = paper_table3_mitigations.get_config()
  names = [s.name for s in sweeps.settings_from_config(c)]
  assert names[0] == "none" and "gni_0.1" in names and "rna_8" in names
  c.sweep.settings = ("gni:0.5", "rt:2")  # no identity: "none" is added in front
  got = sweeps.settings_from_config(c)
  assert [s.name for s in got] == ["none", "gni_0.5", "rt_2"]
  assert got[1].mitigation.sigma == 0.5 and got[2].mitigation.iterations == 2
  c.sweep.settings, c.sweep.name, c.sweep.values = (), "gni", (0.5, 0.0)  # the identity row moves first
  assert [s.name for s in sweeps.settings_from_config(c)] == ["gni_0", "gni_0.5"]
  c.sweep.kind, c.sweep.name, c.sweep.values = "augment", "", ()
  c.sweep.settings = ("crop:2", "blur:4", "rotate:30")
  got = sweeps.settings_from_config(c)
  assert [s.name for s in got] == ["none", "crop_2", "blur_4", "rotate_30"]
  assert got[1].augmentation.crop_size == pytest.approx(0.6) and got[2].augmentation.kernel_size == 17


@pytest.mark.parametrize("sweep, match", [
    ({"kind": "noise"}, r"sweep.kind must be one of \('mitigation', 'augment', 'pruning'\), got 'noise'"),
    ({"settings": ("gni=0.1",)}, r"sweep.settings\[0\]: expected \"name:value\""),
    ({"settings": ("none", "gni:x")}, r"sweep.settings\[1\]: 'x' is not a number"),
    ({"settings": ("gni:-1",)}, r"sweep.settings\[0\] \(gni:-1\): .*strength must be >= 0"),
    ({"settings": ("rt:1.5",)}, r"sweep.settings\[0\] \(rt:1.5\): .*non-negative integer"),
    ({"settings": ("blurr:1",)}, r"unknown mitigation 'blurr'"),
    ({"kind": "augment", "settings": ("crop:5",)}, r"sweep.settings\[0\] \(crop:5\): .*level must be in 0..4"),
    ({"settings": ("gni:0.1", "gni:0.1")}, r"settings listed twice: \['gni_0.1'\]"),
    ({"name": "gni", "values": (0.1,), "settings": ("none",)}, r"either sweep.settings .* not both"),
    ({"name": "gni"}, r"sweep.values: give the strengths"),
    ({}, r"sweep: no settings"),
])
def test_bad_sweep_settings_are_named(sweep, match):
  c = tiny.get_config()
  c.sweep.update(sweep)
  with pytest.raises(ValueError, match=match):
    sweeps.settings_from_config(c)


def test_table_reports_chance_and_the_paired_effect_against_the_baseline():
  rs = np.random.default_rng(0)
  n = 40
  keys = marks.keys_for(0, np.arange(n))

  def results(k_pred):
    return report.Results.from_records([{"group": "members", "instance_id": i, "key": float(keys[i]),
                                         "k_pred": k_pred[i].tolist()} for i in range(n)])

  memorised = np.clip(keys[:, None] + rs.normal(0, 0.002, (n, 2)), 0, 1)
  half = memorised.copy()
  half[::2] = rs.random((n // 2, 2))  # the setting hides every other image's key
  res = [results(memorised), results(half)]
  summaries = [report.summarize_results(r, (0.1, 0.05), num_permutations=20) for r in res]
  c = tiny.get_config()
  c.sweep.settings = ("none", "gni:0.5")
  settings = sweeps.settings_from_config(c)
  table = sweeps.sweep_table(settings, summaries, res, name="t", kind="mitigation")
  base, gni = table["rows"]
  assert base["effect"]["reduction"] == [0.0, 0.0] and base["effect"]["discordant"] == [[0, 0], [0, 0]]
  # Half the images lose their key: about half of the excess over chance goes.
  assert 0.35 < gni["effect"]["reduction"][1] < 0.65
  assert gni["effect"]["mcnemar_p"][1] < 1e-4
  assert gni["chance"]["expected"] == summaries[1]["groups"]["members"]["chance"]["expected"]
  text = report.sweep_markdown(table)
  assert "| gni_0.5 | " in text and "reduction of the excess over chance" in text and "McNemar" in text
  fewer = report.Results.from_records([{"group": "members", "instance_id": i, "key": float(keys[i]),
                                        "k_pred": half[i].tolist()} for i in range(n // 2)])
  with pytest.raises(ValueError, match="other members"):
    sweeps.sweep_table(settings, summaries, [res[0], fewer], name="t")


def test_compare_runs_pairs_the_same_members(tmp_path):
  rs = np.random.default_rng(1)
  n = 30
  keys = marks.keys_for(0, np.arange(n))
  dirs = []
  for name, k_pred in (("border", rs.random((n, 2))), ("centre", np.clip(keys[:, None] + 0.001, 0, 1))):
    d = str(tmp_path / name)
    store = report.ResultStore(os.path.join(d, "results.jsonl"), {"run": name})
    store.append("members", np.arange(n), keys, k_pred)
    report.write_report(d, store.results(), (0.1, 0.05), plots_enabled=False, num_permutations=10)
    dirs.append(d)
  out = sweeps.compare_runs(dirs[0], dirs[1], str(tmp_path / "cmp"), labels=("border", "centre"))
  assert out["effect"]["reduction"][1] is None or out["effect"]["reduction"][1] < 0  # centre recovers more keys
  assert out["effect"]["discordant"][1][1] > 20 and out["effect"]["mcnemar_p"][1] < 1e-5
  md = open(tmp_path / "cmp" / "comparison.md").read()
  assert "centre against border on the same 30 members" in md


# ---------------------------------------------------------------------------------------------
# A GNI sweep end to end: trains first, interrupted mid-sweep, resumed.


@pytest.fixture(scope="module")
def interrupted(fashion_dir, tmp_path_factory):
  """run_sweep on an empty workdir (so it trains), interrupted on the 4th stored batch, then resumed.

  Each setting is 8 members + 8 non-members = 2 batches of 8: the interruption leaves gni_0 finished,
  gni_0.5 with its members only, gni_2 untouched.
  """
  mp = pytest.MonkeyPatch()
  workdir = str(tmp_path_factory.mktemp("sweep") / "wd")
  config = _config(fashion_dir)
  first = _count_appends(mp, fail_at=4)
  with pytest.raises(_Interrupt):
    sweeps.run_sweep(config, workdir, name="gni")
  root = os.path.join(workdir, "sweeps", "settings")
  before = {s: {f: os.stat(os.path.join(root, s, f)).st_mtime_ns for f in os.listdir(os.path.join(root, s))}
            for s in os.listdir(root)}
  lines = {s: len(_rows(os.path.join(root, s, "results.jsonl"))) for s in os.listdir(root)}
  mp.undo()
  second = _count_appends(mp)
  out = sweeps.run_sweep(config, workdir, name="gni")
  mp.undo()
  assert out == os.path.join(workdir, "sweeps", "gni")
  table = json.load(open(os.path.join(out, "sweep.json")))
  return {"workdir": workdir, "config": config, "first": first, "second": second, "before": before,
          "lines": lines, "table": table}


def test_sweep_trains_first_and_writes_a_report_per_setting(interrupted):
  workdir, table = interrupted["workdir"], interrupted["table"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]  # trained by the sweep itself
  names = ["gni_0", "gni_0.5", "gni_2"]
  assert [r["setting"] for r in table["rows"]] == names and table["baseline"] == "gni_0"
  for name in names:
    d = os.path.join(workdir, "sweeps", "settings", name)
    assert {"results.jsonl", "summary.json", "summary.md", "per_image.csv"} <= set(os.listdir(d))
    summary = json.load(open(os.path.join(d, "summary.json")))
    assert summary["metadata"]["eval"]["mitigation"]["strength"] == float(name.split("_")[1])
    assert [summary["groups"][g]["n"] for g in ("members", "non_members")] == [8, 8]
  out = os.path.join(workdir, "sweeps", "gni")
  text = open(os.path.join(out, "table.md")).read()
  assert all(f"| {n} | " in text for n in names) and "reduction of the excess over chance" in text
  assert os.path.getsize(os.path.join(out, "sweep.png")) > 1000  # the GNI figure
  for r in table["rows"]:
    assert r["n"] == 8 and r["repeats"] == 2 and len(r["counts"]) == 4
    assert len(r["chance"]["expected"]) == 4 and len(r["effect"]["mcnemar_p"]) == 4
  base = table["rows"][0]["effect"]  # the baseline against itself: no discordant image, no change
  assert base["discordant"] == [[0, 0]] * 4 and all(x in (0.0, None) for x in base["reduction"])


def test_sweep_resumes_without_redoing_finished_work(interrupted):
  first, second, before, lines = (interrupted[k] for k in ("first", "second", "before", "lines"))
  assert first[:3] == [("gni_0", "members", 8), ("gni_0", "non_members", 8), ("gni_0.5", "members", 8)]
  assert lines == {"gni_0": 16, "gni_0.5": 8, "gni_2": 0}
  # resumed: only gni_0.5's non-members and gni_2, nothing of the finished gni_0
  assert second == [("gni_0.5", "non_members", 8), ("gni_2", "members", 8), ("gni_2", "non_members", 8)]
  root = os.path.join(interrupted["workdir"], "sweeps", "settings")
  assert {f: os.stat(os.path.join(root, "gni_0", f)).st_mtime_ns for f in before["gni_0"]} == before["gni_0"]
  assert interrupted["table"]["outpainter_traces"] == 1  # only the GNI (embedding) outpainter ran, once


def test_sweep_compiles_once_per_shape_and_matches_the_resumed_run(interrupted, tmp_path):
  """An uninterrupted sweep on a copy of the checkpoint: one trace per condition shape, same results."""
  workdir = str(tmp_path / "wd")
  shutil.copytree(interrupted["workdir"], workdir, ignore=shutil.ignore_patterns("sweeps"))
  config = interrupted["config"]
  ev = build_evaluator(config, workdir)
  table = json.load(open(os.path.join(sweeps.run_sweep(config, workdir, name="gni", evaluator=ev), "sweep.json")))
  # sigma = 0 passes class ids [8]; sigma > 0 noised condition rows [8, D]: two shapes, each traced once by
  # the one outpainter (the null condition is an argument), for 3 settings x 2 groups x 1 batch
  assert ev.op.trace_count == 2
  assert table["outpainter_traces"] == 2
  resumed = os.path.join(interrupted["workdir"], "sweeps", "settings")
  fresh = os.path.join(workdir, "sweeps", "settings")
  for name in ("gni_0", "gni_0.5", "gni_2"):
    a = open(os.path.join(resumed, name, "per_image.csv"), "rb").read()
    assert a == open(os.path.join(fresh, name, "per_image.csv"), "rb").read(), name
  assert table["rows"] == interrupted["table"]["rows"]


def test_gni_rows_differ_from_sigma_zero(interrupted):
  root = os.path.join(interrupted["workdir"], "sweeps", "settings")
  k = {}
  for name in ("gni_0", "gni_0.5", "gni_2"):
    rows = report.Results.from_records(_rows(os.path.join(root, name, "results.jsonl")))
    members = rows.select("members")
    assert list(members.instance_id) == sorted(members.instance_id)
    k[name] = members.k_pred  # [8, 2]
  # The same noise for every setting (seeded by instance id): only the noised condition differs.
  assert np.max(np.abs(k["gni_0.5"] - k["gni_0"])) > 1e-4
  assert np.max(np.abs(k["gni_2"] - k["gni_0"])) > np.max(np.abs(k["gni_0.5"] - k["gni_0"]))


# ---------------------------------------------------------------------------------------------
# Duplication: every copy evaluated, any evaluation x any key, per level with exact chance.


def test_duplication_scoring_end_to_end(fashion_dir, tmp_path):
  # 4 images: seen once, twice, three and four times = 10 instances; every distinct image evaluated
  # twice whatever its copies. The class-conditional model of the GNI sweep (copies share their class):
  # its compilations are cached.
  config = _config(fashion_dir, data__subset_size=4, eval__num_members=4,
                   eval__num_nonmembers=8, sweep__name="", sweep__values=(), sweep__settings=("none",))
  config.data.duplicates = {2: 1, 3: 1, 4: 1}
  workdir = str(tmp_path / "wd")
  table = json.load(open(os.path.join(sweeps.run_sweep(config, workdir, name="dup"), "sweep.json")))
  d = os.path.join(workdir, "sweeps", "settings", "none")
  summary = json.load(open(os.path.join(d, "duplication.json")))
  assert list(summary["levels"]) == ["1x", "2x", "3x", "4x"]
  for level in summary["levels"].values():
    assert level["n"] == 1 and level["evaluations"] == [2]  # the same evaluations whatever the copies
  # Recompute from the stored results: one query per image, best over evaluations x all its keys.
  rows = _rows(os.path.join(d, "results.jsonl"))
  members = [r for r in rows if r["group"] == "members"]
  assert len(members) == 4
  from solidmark_jax.experiment import build_experiment
  exp = build_experiment(config)
  image_of = exp.instances.image_id
  assert len({int(image_of[r["instance_id"]]) for r in members}) == 4  # distinct images
  keys = exp.keymap.lookup(np.arange(10))
  copies = np.bincount(image_of)
  for t, delta in enumerate(summary["thresholds"]):
    for c in (1, 2, 3, 4):
      count, expected = 0, 0.0
      for img in np.flatnonzero(copies == c):
        preds = np.concatenate([r["k_pred"] for r in members if image_of[r["instance_id"]] == img])
        ks = keys[image_of == img]
        l = np.abs(memorisation.snap_to_key_grid(preds)[:, None] - ks[None]).min()
        count += int(l <= delta)
        expected += float(chance.hit_probability(preds[None], delta, copies=c)[0])
      level = summary["levels"][f"{c}x"]
      assert level["counts"][t] == count, (delta, c)
      assert level["chance"]["expected"][t] == pytest.approx(expected)
  assert len(summary["trend"]) == len(summary["thresholds"])
  text = open(os.path.join(workdir, "sweeps", "dup", "table.md")).read()
  assert "Memorisation by duplication level" in text and "| 4x | 1 | 2 |" in text
  assert table["rows"][0]["duplication"]["4x"]["n"] == 1


def test_rt_sweeps_use_the_configured_probability():
  c = tiny.get_config()
  c.sweep.settings = ("none", "rt:2", "gni:0.1")
  c.eval.mitigation.probability = 0.3
  settings = sweeps.settings_from_config(c)
  assert settings[1].mitigation.probability == 0.3
  assert settings[2].mitigation.probability == mitigations.RT_PROBABILITY  # only RT takes it


# ---------------------------------------------------------------------------------------------
# Pruning sweeps: a pruned model per setting, scored like any setting, with its denoising loss.


def _text_config(fashion_dir, settings, **extra):
  # DoRI: 2 draws per step, not the paper's 8 (the draws' effect is tested in test_dori; here the sweep's
  # plumbing, 45 s less of it)
  c = _config(fashion_dir, **{"sweep__name": "", "sweep__values": (), "sweep__kind": "pruning",
                              "sweep__settings": settings, "eval__repeats": 1, "eval__dori__steps": 3,
                              "eval__dori__draws": 2, "eval__dori__learning_rate": 0.05, **extra})
  c.update_from_flattened_dict({
      "data.name": "captioned_fashion_mnist", "data.train_split": "train[:32]", "data.eval_split": "test[:16]",
      "model.condition": "text", "text.hidden_size": 32, "text.num_layers": 1, "text.num_heads": 2,
      "text.intermediate_size": 64, "text.max_length": 32})
  return c


@pytest.fixture(scope="module")
def pruning_sweep(fashion_dir, tmp_path_factory):
  """A text model trained 2 steps, swept over Wanda, NeMo, Wanda + DoRI (3 Adam steps), Wanda + GNI and
  adversarial fine-tuning (2 outer steps against 2-step triggers for 4 targeted members), plain and with
  the key-targeted search (2 Adam steps through 2 DDIM steps)."""
  config = _text_config(fashion_dir, ("none", "wanda:0.5", "nemo:0.5", "wanda:0.5+dori", "wanda:0.5+gni:0.5",
                                      "adversarial:2", "adversarial:2+keysearch"),
                        eval__key_search__steps=2, eval__key_search__inner_steps=2,
                        eval__key_search__learning_rate=0.05, eval__adversarial__trigger_steps=2,
                        eval__adversarial__targets=4, eval__adversarial__checkpoint_every=1,
                        eval__adversarial__learning_rate=1e-3)
  workdir = str(tmp_path_factory.mktemp("pruning") / "wd")
  table = json.load(open(os.path.join(sweeps.run_sweep(config, workdir, name="prune"), "sweep.json")))
  return config, workdir, table


def test_pruning_sweep_prunes_each_setting_and_reports_its_loss(pruning_sweep):
  config, workdir, table = pruning_sweep
  rows = {r["setting"]: r for r in table["rows"]}
  assert list(rows) == ["none", "wanda_0.5", "nemo_0.5", "wanda_0.5+dori", "wanda_0.5+gni_0.5", "adversarial_2",
                        "adversarial_2+keysearch"]
  assert rows["none"]["pruning"]["pruned"] == 0
  wanda = rows["wanda_0.5"]["pruning"]
  assert wanda["unit"] == "weights" and 0 < wanda["pruned"] < wanda["of"]
  assert rows["nemo_0.5"]["pruning"]["unit"] == "value neurons"
  root = os.path.join(workdir, "sweeps", "settings")
  k = {}
  for name, r in rows.items():
    loss = r["denoising_loss"]
    assert set(loss) == {"members", "non_members", "targeted", "rest"} and len(loss["members"]["per_image"]) == 8
    assert json.load(open(os.path.join(root, name, sweeps.PRUNING_FILE)))["pruning"] == r["pruning"]
    k[name] = report.Results.from_records(_rows(os.path.join(root, name, "results.jsonl"))).select("members").k_pred
  meta = json.load(open(os.path.join(root, "wanda_0.5", "summary.json")))["metadata"]
  assert meta["pruning"] == wanda  # a store of another pruning is an error, not reused
  # the same noise for every setting: the pruned models differ from the plain one (half the K/V weights gone)
  assert np.max(np.abs(k["wanda_0.5"] - k["none"])) > 1e-4
  assert rows["wanda_0.5"]["denoising_loss"]["members"]["mean"] != rows["none"]["denoising_loss"]["members"]["mean"]
  # DoRI on the pruned model: a perturbation found per image, recorded with its settings, and queried
  found = rows["wanda_0.5+dori"]["dori"]
  assert found["spec"]["steps"] == 3 and found["members"]["delta_norm"] > 0
  assert rows["wanda_0.5+dori"]["pruning"] == wanda  # the same pruned model
  meta = json.load(open(os.path.join(root, "wanda_0.5+dori", "summary.json")))["metadata"]
  assert meta["dori"]["learning_rate"] == 0.05 and "dori" not in meta["eval"]
  k["wanda_0.5+dori"] = report.Results.from_records(
      _rows(os.path.join(root, "wanda_0.5+dori", "results.jsonl"))).select("members").k_pred
  assert np.max(np.abs(k["wanda_0.5+dori"] - k["wanda_0.5"])) > 1e-6
  header = open(os.path.join(root, "wanda_0.5+dori", "per_image.csv")).readline()
  assert "dori_delta_norm" in header and "dori_loss_final" in header
  # GNI on the pruned model's caption embeddings: the same pruned model, another query
  assert rows["wanda_0.5+gni_0.5"]["pruning"] == wanda and rows["wanda_0.5+gni_0.5"]["method"] == "wanda+gni"
  k["wanda_0.5+gni_0.5"] = report.Results.from_records(
      _rows(os.path.join(root, "wanda_0.5+gni_0.5", "results.jsonl"))).select("members").k_pred
  assert np.max(np.abs(k["wanda_0.5+gni_0.5"] - k["wanda_0.5"])) > 1e-6
  text = open(os.path.join(workdir, "sweeps", "prune", "table.md")).read()
  assert "Searches (docs/dori.md)" in text and "| wanda_0.5+dori | DoRI, 3 steps x 2 draws" in text
  assert "Mitigated models" in text and f"| wanda_0.5 | {wanda['pruned']} of {wanda['of']} weights pruned |" in text
  # a re-run reads the finished settings back, pruning records and losses included
  again = json.load(open(os.path.join(sweeps.run_sweep(config, workdir, name="prune"), "sweep.json")))
  assert again["rows"] == table["rows"]


def test_adversarial_rows_split_the_targeted_members_and_keep_their_checkpoints(pruning_sweep):
  config, workdir, table = pruning_sweep
  rows = {r["setting"]: r for r in table["rows"]}
  tuned = rows["adversarial_2"]["pruning"]
  assert tuned["name"] == "adversarial" and tuned["steps_done"] == 2 and len(tuned["targets"]) == 4
  assert tuned["spec"]["trigger_steps"] == 2 and tuned["cap"] > 0
  assert tuned["targets"] == sorted(tuned["targets"])  # the first members by id
  assert rows["adversarial_2+keysearch"]["pruning"] == tuned  # one fine-tuning, queried twice
  assert rows["adversarial_2+keysearch"]["method"] == "adversarial+keysearch"
  ckpts = os.path.join(workdir, "sweeps", sweeps.FINETUNE_DIR, "adversarial_2")
  assert os.path.isdir(ckpts) and os.listdir(ckpts)
  for r in rows.values():  # every row scores the targeted members and the rest apart
    sub = r["subsets"]
    assert sub["targeted"]["n"] == 4 and sub["rest"]["n"] == 4
    assert [a + b for a, b in zip(sub["targeted"]["counts"], sub["rest"]["counts"])] == r["counts"]
  loss = rows["adversarial_2"]["denoising_loss"]
  assert np.isclose((loss["targeted"]["mean"] + loss["rest"]["mean"]) / 2, loss["members"]["mean"])
  assert loss["members"]["mean"] != rows["none"]["denoising_loss"]["members"]["mean"]  # the UNet moved
  found = rows["adversarial_2+keysearch"]["dori"]
  assert found["spec"]["objective"] == "key" and found["spec"]["inner_steps"] == 2
  assert found["members"]["delta_norm"] > 0
  text = open(os.path.join(workdir, "sweeps", "prune", "table.md")).read()
  assert "Mitigation x query" in text and "key-targeted search" in text and "GNI sigma 0.5" in text
  assert "| adversarial_2 |" in text and "Targeted members" in text and "fine-tuned 2 steps" in text


def test_setting_suffixes_are_parsed_and_bad_ones_named(fashion_dir):
  settings = sweeps.settings_from_config(_text_config(
      fashion_dir, ("none", "none+gni:0.2", "nemo:2+keysearch", "adversarial:3+dori", "wanda:0.1+dori:blind")))
  assert [s.name for s in settings] == ["none", "none+gni_0.2", "nemo_2+keysearch", "adversarial_3+dori",
                                        "wanda_0.1+dori_blind"]
  assert settings[4].dori.key_blind and not settings[3].dori.key_blind and settings[4].method == "wanda+dori_blind"
  assert settings[1].mitigation.name == "gni" and settings[1].mitigation.strength == 0.2
  assert settings[1].is_model_identity and not settings[1].is_identity
  assert settings[2].dori.objective == "key" and settings[3].dori.objective == "loss"
  assert settings[3].finetune.steps == 3 and settings[3].method == "adversarial+dori"
  for bad, match in (("wanda:0.1+gni", "gni:<sigma>"), ("wanda:0.1+keysearch:2", "keysearch"),
                     ("wanda:0.1+gni:-1", "gni"), ("adversarial:1.5", "integer"), ("adversarial:0", "integer"),
                     ("none+dori:open", "dori:blind")):
    with pytest.raises(ValueError, match=match):
      sweeps.settings_from_config(_text_config(fashion_dir, ("none", bad)))


def test_dori_with_learning_rate_zero_reproduces_the_plain_query(pruning_sweep, fashion_dir):
  config, workdir, _ = pruning_sweep
  config = _text_config(fashion_dir, ("none", "none+dori"), eval__dori__learning_rate=0.0)
  sweeps.run_sweep(config, workdir, name="dori_lr0")
  root = os.path.join(workdir, "sweeps", "settings")
  read = lambda name: report.Results.from_records(_rows(os.path.join(root, name, "results.jsonl")))
  plain, searched = read("none"), read("none+dori")
  assert np.array_equal(plain.k_pred, searched.k_pred)  # delta is exactly 0: bit for bit
  assert np.all(searched.extras["dori_delta_norm"] == 0)


def test_the_key_blind_search_runs_in_a_sweep_and_says_so(pruning_sweep, fashion_dir):
  config, workdir, _ = pruning_sweep
  # the fixture's settings as they are ("wanda_0.5+dori" is read back), beside the key-blind search
  config = _text_config(fashion_dir, ("none", "wanda:0.5+dori", "wanda:0.5+dori:blind"))
  table = json.load(open(os.path.join(sweeps.run_sweep(config, workdir, name="blind"), "sweep.json")))
  rows = {r["setting"]: r for r in table["rows"]}
  blind_row = rows["wanda_0.5+dori_blind"]
  assert blind_row["method"] == "wanda+dori_blind" and blind_row["dori"]["spec"]["key_blind"]
  assert blind_row["pruning"] == rows["wanda_0.5+dori"]["pruning"]  # the same pruned model
  assert "key_blind" not in rows["wanda_0.5+dori"]["dori"]["spec"]  # a plain search's record is as before
  root = os.path.join(workdir, "sweeps", "settings")
  meta = json.load(open(os.path.join(root, "wanda_0.5+dori_blind", "summary.json")))["metadata"]
  assert meta["dori"]["key_blind"] is True
  read = lambda name: report.Results.from_records(_rows(os.path.join(root, name, "results.jsonl")))
  blind, plain = read("wanda_0.5+dori_blind"), read("wanda_0.5+dori")
  assert np.all(blind.extras["dori_delta_norm"] > 0)
  assert not np.allclose(blind.extras["dori_delta_norm"], plain.extras["dori_delta_norm"])  # another search
  text = open(os.path.join(workdir, "sweeps", "blind", "table.md")).read()
  assert "DoRI search, key hidden" in text and "| wanda_0.5+dori_blind | DoRI, key-blind, 3 steps" in text


def test_pruning_sweeps_need_a_text_model_and_valid_values(fashion_dir, interrupted):
  class_model = build_evaluator(interrupted["config"], interrupted["workdir"])
  with pytest.raises(ValueError, match="text-conditioned model"):
    sweeps.pruned_evaluator(class_model, sweeps.make_setting("pruning", "wanda", 0.1).pruning)
  with pytest.raises(ValueError, match="sparsity"):
    sweeps.settings_from_config(_text_config(fashion_dir, ("none", "wanda:1.0")))
  with pytest.raises(ValueError, match="threshold"):
    sweeps.settings_from_config(_text_config(fashion_dir, ("none", "nemo:0")))
  with pytest.raises(ValueError, match="unknown pruning method"):
    sweeps.settings_from_config(_text_config(fashion_dir, ("none", "gni:0.1")))
  with pytest.raises(ValueError, match=r"\+dori"):
    sweeps.settings_from_config(_text_config(fashion_dir, ("none", "wanda:0.1+attack")))
  with pytest.raises(ValueError, match="eval.dori.steps"):
    sweeps.settings_from_config(_text_config(fashion_dir, ("none", "wanda:0.1+dori"), eval__dori__steps=-1))
  dori_on_classes = interrupted["config"].copy_and_resolve_references()
  dori_on_classes.sweep.settings, dori_on_classes.sweep.name, dori_on_classes.sweep.values = ("none+dori",), "", ()
  with pytest.raises(ValueError, match="DoRI query"):
    sweeps.run_sweep(dori_on_classes, interrupted["workdir"], name="dori", evaluator=class_model)


def test_both_dori_searches_read_the_training_image_not_the_augmented_query(pruning_sweep, fashion_dir, monkeypatch):
  """Under an augmentation setting the query's known region is augmented; DoRI's searches, plain and
  key-blind, both search on the bordered training image (the blind one with its key region hidden)."""
  config, workdir, _ = pruning_sweep
  config = _text_config(fashion_dir, ("none", "crop:2+dori", "crop:2+dori:blind"), sweep__kind="augment",
                        eval__dori__steps=1)
  searched, real = {}, dori.dori_search

  def recording(denoiser, params, sched, x0, c0, rng, spec, **kwargs):
    searched.setdefault(spec.key_blind, []).append(np.asarray(jax.device_get(x0)))
    return real(denoiser, params, sched, x0, c0, rng, spec, **kwargs)

  monkeypatch.setattr(dori, "dori_search", recording)
  ev = build_evaluator(config, workdir)
  sweeps.run_sweep(config, workdir, name="augmented_dori", evaluator=ev)
  assert len(searched[False]) == len(searched[True]) == 2  # members and non-members, a batch each
  for plain, blind in zip(searched[False], searched[True]):
    np.testing.assert_array_equal(blind, plain)
  members = ev.groups[0]
  assert members.name == "members"
  np.testing.assert_array_equal(searched[True][0][:len(members.ids)], members.read(members.ids))
