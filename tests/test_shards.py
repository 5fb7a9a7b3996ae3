"""Tests for solidmark_jax.data.shards: webdataset tars and parquet files of captioned images."""

import gzip
import io
import json
import re
import tarfile

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from solidmark_jax.data.images import to_square
from solidmark_jax.data.instances import BatchPlan, make_instances
from solidmark_jax.data.shards import ShardSource, expand_shards
from solidmark_jax.data.sources import Source, open_source


def cfg(**kw) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(kw)


def encode(seed: int, fmt: str = "PNG", size=(10, 12)) -> bytes:
  """A small random RGB image (w x h = `size`) encoded as `fmt`."""
  a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
  return buf.getvalue()


def expect(data: bytes, size: int = 8, channels: int = 3) -> np.ndarray:
  return to_square(Image.open(io.BytesIO(data)), size, channels)


def write_tar(path, members: list[tuple[str, bytes]]) -> str:
  with tarfile.open(path, "w") as tf:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tf.addfile(info, io.BytesIO(data))
  return str(path)


def write_parquet(path, columns: dict, row_group_size: int = 2) -> str:
  pq.write_table(pa.table(columns), str(path), row_group_size=row_group_size)
  return str(path)


# ----------------------------------------------------------------------------------------------
# Reading back what the test wrote


def test_tars_read_back_in_order(tmp_path):
  imgs = [encode(i, fmt) for i, fmt in enumerate(["PNG", "JPEG", "WEBP", "PNG", "PNG"])]
  # written as b.tar then a.tar: records follow the sorted paths, then the member order inside
  write_tar(tmp_path / "b.tar", [("x/k3.png", imgs[3]), ("x/k3.txt", b"  fourth caption \n"),
                                 ("k4.json", json.dumps({"caption": "fifth", "url": "u"}).encode()),
                                 ("k4.png", imgs[4])])
  write_tar(tmp_path / "a.tar", [("s0.png", imgs[0]), ("s0.txt", "first: caf\u00e9".encode()),
                                 ("s1.jpg", imgs[1]), ("s1.json", b'{"caption": "second"}'),
                                 ("s1.txt", b"second (txt wins)"),
                                 ("d.v1/s2.webp", imgs[2]), ("d.v1/s2.txt", b"third")])
  src = ShardSource(expand_shards(str(tmp_path / "*.tar")), image_size=8, channels=3)
  assert isinstance(src, Source)
  assert len(src) == 5 and src.num_classes == 0 and src.skipped == []
  assert src.captions == ["first: caf\u00e9", "second (txt wins)", "third", "fourth caption", "fifth"]
  assert src.locations[0] == f"{tmp_path}/a.tar:s0.png" and src.locations[3] == f"{tmp_path}/b.tar:x/k3.png"
  assert src.name == f"shards:{tmp_path} (2 files)"
  idx = np.array([4, 0, 2, 2, 1, 3])
  got = src.read(idx)
  assert got["image"].shape == (6, 8, 8, 3) and got["image"].dtype == np.uint8
  for j, i in enumerate(idx):
    np.testing.assert_array_equal(got["image"][j], expect(imgs[i]))
  assert got["caption"] == [src.captions[i] for i in idx]
  np.testing.assert_array_equal(got["label"], -1)
  np.testing.assert_array_equal(src.labels(), np.full(5, -1))
  grey = ShardSource([str(tmp_path / "a.tar")], image_size=5, channels=1)
  np.testing.assert_array_equal(grey.read(np.array([1]))["image"][0], expect(imgs[1], 5, 1))
  assert grey.name == f"shards:{tmp_path}/a.tar"


def test_parquet_read_back_with_default_and_custom_columns(tmp_path):
  imgs = [encode(10 + i) for i in range(5)]
  write_parquet(tmp_path / "p1.parquet", {"jpg": imgs[:3], "text": ["one", "two", "three"],
                                         "label": pa.array([2, 0, 1], pa.int64())})
  write_parquet(tmp_path / "p2.parquet", {"jpg": imgs[3:], "text": ["four", "five"], "label": [1, 1]})
  src = ShardSource(expand_shards(str(tmp_path)), image_size=8)  # a folder: all its shards
  assert len(src) == 5 and src.captions == ["one", "two", "three", "four", "five"]
  assert src.num_classes == 3 and src.labels().tolist() == [2, 0, 1, 1, 1]
  assert src.locations[2] == f"{tmp_path}/p1.parquet row 2"
  got = src.read(np.array([3, 2, 0, 4, 1, 2]))  # across row groups and files
  for j, i in enumerate([3, 2, 0, 4, 1, 2]):
    np.testing.assert_array_equal(got["image"][j], expect(imgs[i]))
  assert got["label"].tolist() == [1, 1, 2, 1, 0, 1]
  # a Hugging Face Image struct column and custom column names
  write_parquet(tmp_path / "hf.parquet", {"img": [{"bytes": b, "path": None} for b in imgs[:2]], "alt": ["a", "b"]})
  hf = ShardSource([str(tmp_path / "hf.parquet")], 8, image_column="img", caption_column="alt")
  np.testing.assert_array_equal(hf.read(np.array([1]))["image"][0], expect(imgs[1]))
  assert hf.labels().tolist() == [-1, -1] and hf.num_classes == 0
  with pytest.raises(ValueError, match=r"hf.parquet: no image column among \['image', 'jpg', 'png', 'webp'\].*"
                                       r"Set data.image_column"):
    ShardSource([str(tmp_path / "hf.parquet")], 8)
  with pytest.raises(ValueError, match=r"hf.parquet: no column 'caption' \(data.caption_column\)"):
    ShardSource([str(tmp_path / "hf.parquet")], 8, image_column="img", caption_column="caption")


def test_mixed_formats_and_open_source_config(tmp_path):
  imgs = [encode(20 + i) for i in range(4)]
  write_tar(tmp_path / "train-0.tar", [("a.png", imgs[0]), ("a.txt", b"tar one"), ("b.png", imgs[1]),
                                      ("b.txt", b"tar two")])
  write_parquet(tmp_path / "train-1.parquet", {"image": imgs[2:3], "caption": ["parquet three"]})
  write_parquet(tmp_path / "eval.parquet", {"image": imgs[3:], "caption": ["held out"]})
  data = cfg(name="shards", shards=[str(tmp_path / "train-*")], eval_shards=str(tmp_path / "eval.parquet"),
             image_size=8, channels=3)
  train, test = open_source(data, "train"), open_source(data, "test")
  assert train.captions == ["tar one", "tar two", "parquet three"] and test.captions == ["held out"]
  np.testing.assert_array_equal(train.read(np.array([2]))["image"][0], expect(imgs[2]))
  with pytest.raises(ValueError, match="reads data.eval_shards, which is not set"):
    open_source(cfg(name="shards", shards=str(tmp_path / "train-*"), image_size=8), "test")
  with pytest.raises(FileNotFoundError, match=r"data.shards: .*nope-\*.tar' matches no shard file"):
    open_source(cfg(name="shards", shards=str(tmp_path / "nope-*.tar"), image_size=8), "train")
  with pytest.raises(ValueError, match="data.image_size is required for shards"):
    open_source(cfg(name="shards", shards=str(tmp_path / "train-*")), "train")
  with pytest.raises(ValueError, match="no split slicing"):
    open_source(data, "train[:2]")
  (tmp_path / "notes.csv").write_text("x")
  with pytest.raises(ValueError, match="notes.csv: unknown format"):
    ShardSource([str(tmp_path / "notes.csv")], 8)


# ----------------------------------------------------------------------------------------------
# Bad records


def bad_tar(tmp_path) -> str:
  ok = encode(1)
  return write_tar(tmp_path / "bad.tar", [
      ("r0.png", ok), ("r0.txt", b"fine"),
      ("r1.png", b"this is no image at all"), ("r1.txt", b"broken image"),
      ("r2.png", ok),  # no caption
      ("r3.png", ok), ("r3.txt", b"   \n"),  # empty caption
      ("r4.png", ok), ("r4.txt", b"\xff\xfe bad utf-8"),  # not text
      ("r5.png", ok), ("r5.json", b'{"caption": 123}'),  # not a str
      ("r6.txt", b"caption without image"),
      ("r7.jpg", encode(7, "JPEG")), ("r7.json", b'{"caption": "also fine"}'),
  ])


TAR_REASONS = [("r1.png", "not an image"), ("r2.png", "no caption: expected a r2.txt or r2.json member"),
               ("r3.png", "empty caption"), ("r4.png", "caption is not UTF-8 text"),
               ("r5.png", r"caption is not text \(a int\)"), ("r6", "no image member")]


def test_tar_bad_records_error_or_skip(tmp_path):
  path = bad_tar(tmp_path)
  with pytest.raises(ValueError, match=f"{path}:r1.png: not an image"):
    ShardSource([path], 8)
  src = ShardSource([path], 8, on_bad_image="skip")
  assert src.captions == ["fine", "also fine"] and len(src) == 2
  assert len(src.skipped) == len(TAR_REASONS)
  for (where, reason), (member, want) in zip(src.skipped, TAR_REASONS):
    assert where == f"{path}:{member}"
    assert re.search(want, reason), (where, reason)
  # each bad record alone is an error naming the member
  for member, want in TAR_REASONS[1:]:
    key = member.split(".")[0]
    with tarfile.open(path) as tf:
      kept = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.name.split(".")[0] in ("r0", key)]
    one = write_tar(tmp_path / f"one_{key}.tar", kept)
    with pytest.raises(ValueError, match=f"{one}:{member}: {want}"):
      ShardSource([one], 8)
  # without the header check the broken image passes the index and fails when read, named
  lazy = ShardSource([path], 8, on_bad_image="skip", verify_images="none")
  assert lazy.captions[:2] == ["fine", "broken image"]
  with pytest.raises(ValueError, match=f"{path}:r1.png: cannot decode image.*verify_images='full'"):
    lazy.read(np.array([0, 1]))


def test_parquet_bad_rows_error_or_skip(tmp_path):
  ok = encode(2)
  path = write_parquet(tmp_path / "bad.parquet", {
      "image": pa.array([ok, b"garbage!", ok, ok, ok, None], pa.binary()),
      "caption": pa.array([b"fine", b"broken", None, b"  ", b"\xc3\x28 bad", b"no image"], pa.binary()),
  })
  with pytest.raises(ValueError, match=f"{path} row 1: not an image"):
    ShardSource([path], 8)
  src = ShardSource([path], 8, on_bad_image="skip")
  assert src.captions == ["fine"]
  reasons = [(w, r.split(" (")[0]) for w, r in src.skipped]
  assert reasons == [(f"{path} row 1", "not an image"), (f"{path} row 2", "no caption"),
                     (f"{path} row 3", "empty caption"), (f"{path} row 4", "caption is not UTF-8 text"),
                     (f"{path} row 5", "no image")]
  ints = write_parquet(tmp_path / "ints.parquet", {"image": [ok], "caption": [7]})
  with pytest.raises(ValueError, match=rf"{ints} row 0: caption is not text \(a int\)"):
    ShardSource([ints], 8)


def test_truncated_image_found_at_read_or_by_full_verify(tmp_path):
  good, cut = encode(3), encode(4, size=(40, 40))
  cut = cut[:len(cut) // 2]  # a valid PNG header, half the data
  path = write_tar(tmp_path / "t.tar", [("a.png", good), ("a.txt", b"ok"), ("b.png", cut), ("b.txt", b"cut")])
  src = ShardSource([path], 8)  # the header is fine: indexed
  assert len(src) == 2
  np.testing.assert_array_equal(src.read(np.array([0]))["image"][0], expect(good))
  with pytest.raises(ValueError, match=f"{path}:b.png: cannot decode image"):
    src.read(np.array([0, 1]))
  with pytest.raises(ValueError, match=f"{path}:b.png: cannot decode image"):
    ShardSource([path], 8, verify_images="full")
  full = ShardSource([path], 8, on_bad_image="skip", verify_images="full")
  assert full.captions == ["ok"] and [w for w, _ in full.skipped] == [f"{path}:b.png"]
  assert full.read(np.array([0]))["caption"] == ["ok"]


def test_compressed_tar_and_labels(tmp_path):
  plain = write_tar(tmp_path / "x.tar", [("a.png", encode(5)), ("a.txt", b"c")])
  gz = tmp_path / "gz.tar"
  gz.write_bytes(gzip.compress(open(plain, "rb").read()))
  with pytest.raises(ValueError, match=f"shard {gz}: not an uncompressed tar file"):
    ShardSource([str(gz)], 8)
  labelled = write_tar(tmp_path / "l.tar", [("a.png", encode(5)), ("a.txt", b"c"), ("a.cls", b"3\n"),
                                            ("b.png", encode(6)), ("b.txt", b"d"), ("b.cls", b"1")])
  src = ShardSource([labelled], 8)
  assert src.labels().tolist() == [3, 1] and src.num_classes == 4
  assert ShardSource([labelled], 8, num_classes=10, class_names=list("abcdefghij")).num_classes == 10
  mixed = write_tar(tmp_path / "m.tar", [("a.png", encode(5)), ("a.txt", b"c"), ("a.cls", b"0"),
                                         ("b.png", encode(6)), ("b.txt", b"d")])
  with pytest.raises(ValueError, match=f"{mixed}:b.png: has no label while other records have one"):
    ShardSource([mixed], 8)
  nolabel = write_tar(tmp_path / "n.tar", [("a.png", encode(5)), ("a.txt", b"c"), ("a.cls", b"cat")])
  with pytest.raises(ValueError, match=f"{nolabel}:a.cls: label 'cat' is not an integer"):
    ShardSource([nolabel], 8)


# ----------------------------------------------------------------------------------------------
# Duplication and per-host rows, like other sources


def test_duplication_and_per_host_rows(tmp_path):
  n = 12
  imgs = [encode(100 + i, size=(8, 8)) for i in range(n)]
  write_tar(tmp_path / "s0.tar", [m for i in range(6) for m in ((f"{i:02d}.png", imgs[i]),
                                                                (f"{i:02d}.txt", f"cap {i}".encode()))])
  write_parquet(tmp_path / "s1.parquet", {"image": imgs[6:], "caption": [f"cap {i}" for i in range(6, n)]})
  src = open_source(cfg(name="shards", shards=str(tmp_path / "s*"), image_size=8), "train")
  data = cfg(subset_size=10, subset_mode="random", duplicates={2: 3, 3: 2})
  inst = make_instances(len(src), data, seed=1)
  assert len(inst) == 10 + 3 + 2 * 2 and inst.num_images == 10
  everything = src.read(np.arange(n))
  for b in range(3):
    whole = BatchPlan(len(inst), 8, seed=1).global_rows(b)
    parts = [BatchPlan(len(inst), 8, seed=1, process_index=p, process_count=2).local_rows(b) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    for rows in parts:  # each host reads only its rows, straight from the shards
      got = src.read(inst.record_index[rows])
      records = inst.record_index[rows]
      np.testing.assert_array_equal(got["image"], everything["image"][records])
      assert got["caption"] == [f"cap {r}" for r in records]
  # copies of one image share its record, so its caption
  for img in range(inst.num_images):
    assert len(set(inst.record_index[inst.image_id == img].tolist())) == 1


def test_skipped_and_truncated_inputs_are_counted_for_the_report(tmp_path):
  """A text model on shards with bad records: skipped records and truncated captions reach
  `Experiment.bad_input`, which evaluation writes into the report's metadata."""
  from configs import tiny
  from solidmark_jax.experiment import build_experiment
  c = tiny.get_config()
  c.data.name = "shards"
  c.data.shards = bad_tar(tmp_path)
  c.data.on_bad_image = "skip"
  c.data.image_size = 8
  c.data.channels = 3
  c.data.subset_size = None
  c.model.condition = "text"
  c.text.hidden_size = 32
  c.text.num_heads = 2
  c.text.max_length = 3  # start + end + one token: "also fine" (two words) cannot fit
  exp = build_experiment(c)
  assert exp.bad_input == {"skipped_records": len(TAR_REASONS), "truncated_captions": 1}
  assert exp.captions == ["fine", "also fine"] and exp.conditions.shape == (2, 3)
  c.text.on_too_long = "error"
  with pytest.raises(ValueError, match="also fine|too long|max_length"):
    build_experiment(c)
