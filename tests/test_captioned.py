"""Tests for solidmark_jax.data.captioned: the captioned set built offline from Fashion-MNIST."""

import hashlib
import os
import threading

import numpy as np
import pytest

from solidmark_jax.data import captioned
from solidmark_jax.data.folders import FolderSource
from solidmark_jax.data.shards import ShardSource, expand_shards
from solidmark_jax.data.sources import open_source

from data_helpers import cfg, has_fashion


def test_caption_words_and_item_numbers():
  assert len({captioned.item_number(i) for i in range(70000)}) == 70000  # unique over train + test
  dark = np.zeros((28, 28, 1), np.uint8)
  dark[4:24, 4:24] = 60
  assert captioned.shade_word(dark) == "dark" and captioned.size_word(dark) == "large"
  small = np.zeros((28, 28, 1), np.uint8)
  small[10:14, 10:14] = 250
  assert captioned.shade_word(small) == "bright white" and captioned.size_word(small) == "small"
  caps = [captioned.caption_for(i, dark, 9) for i in range(40)]
  assert len({c.replace(f"{captioned.item_number(i):05d}", "#") for i, c in enumerate(caps)}) >= 6  # templates vary
  assert all("ankle boot" in c and "dark" in c for c in caps)
  assert captioned.caption_for(5, dark, 9) == captioned.caption_for(5, dark, 9)
  assert captioned.parse_split("train[:64]") == ("train", 64) and captioned.parse_split("test") == ("test", None)
  with pytest.raises(ValueError, match=r"split 'train\[10:20\]' of captioned_fashion_mnist"):
    captioned.parse_split("train[10:20]")


def sha(folder: str) -> dict[str, str]:
  return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest() for f in sorted(os.listdir(folder))}


@has_fashion
def test_captioned_builder_is_deterministic_and_formats_agree(fashion_dir, tmp_path):
  n = 24
  built = {}
  for fmt in captioned.FORMATS:
    a = captioned.build_captioned_fashion_mnist(fashion_dir, f"train[:{n}]", fmt, records_per_shard=10,
                                                out_dir=str(tmp_path / "a"))
    b = captioned.build_captioned_fashion_mnist(fashion_dir, f"train[:{n}]", fmt, records_per_shard=10,
                                                out_dir=str(tmp_path / "b"))
    assert sha(a) == sha(b), fmt  # byte for byte
    built[fmt] = a
  assert sorted(os.listdir(built["tar"])) == ["00000.tar", "00001.tar", "00002.tar", "manifest.json"]
  tar = ShardSource(expand_shards(built["tar"]), 28, 1)
  par = ShardSource(expand_shards(built["parquet"]), 28, 1)
  fol = FolderSource(built["folder"], 28, 1)
  fashion = open_source(cfg(name="fashion_mnist", data_dir=fashion_dir), "train")
  ref = fashion.read(np.arange(n))
  for src in (tar, par, fol):
    got = src.read(np.arange(n))
    np.testing.assert_array_equal(got["image"], ref["image"])  # lossless, same order as TFDS
    assert got["caption"] == tar.captions
  np.testing.assert_array_equal(tar.labels(), ref["label"])
  np.testing.assert_array_equal(par.labels(), ref["label"])
  assert tar.num_classes == 10 and fol.num_classes == 0  # the folder format is unlabelled
  assert len(set(tar.captions)) == n  # every caption differs
  for caption, label in zip(tar.captions, ref["label"]):
    assert captioned.CLASS_WORDS[label] in caption
  # built once: a second call finds the manifest and writes nothing
  before = os.stat(os.path.join(built["tar"], "manifest.json")).st_mtime_ns
  captioned.build_captioned_fashion_mnist(fashion_dir, f"train[:{n}]", "tar", out_dir=str(tmp_path / "a"))
  assert os.stat(os.path.join(built["tar"], "manifest.json")).st_mtime_ns == before


@has_fashion
def test_captioned_built_once_by_concurrent_builders(fashion_dir, tmp_path, monkeypatch):
  writes = []
  real_write = captioned._write
  monkeypatch.setattr(captioned, "_write", lambda *a, **k: (writes.append(1), real_write(*a, **k)))
  out = []
  build = lambda: out.append(captioned.build_captioned_fashion_mnist(fashion_dir, "test[:8]", "parquet",
                                                                     out_dir=str(tmp_path)))
  threads = [threading.Thread(target=build) for _ in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(out) == 3 and len(set(out)) == 1 and writes == [1]
  assert [f for f in os.listdir(os.path.dirname(out[0])) if f.startswith(".")] == []  # no stray temp folder


@has_fashion
def test_open_source_captioned_fashion_mnist(fashion_dir):
  data = cfg(name="captioned_fashion_mnist", data_dir=fashion_dir, train_split="train[:16]")
  train = open_source(data, "train[:16]")
  test = open_source(data, "test[:8]")
  assert train.name == "captioned_fashion_mnist:train[:16]" and len(train) == 16 and len(test) == 8
  assert (train.image_size, train.channels, train.num_classes) == (28, 1, 10)
  assert not set(train.captions) & set(test.captions)  # item numbers differ across splits
  big = open_source(cfg(name="captioned_fashion_mnist", data_dir=fashion_dir, image_size=32, channels=3,
                        captioned_format="parquet"), "train[:16]")
  got = big.read(np.array([0, 5]))
  assert got["image"].shape == (2, 32, 32, 3) and got["caption"] == [train.captions[0], train.captions[5]]
  folder = open_source(cfg(name="captioned_fashion_mnist", data_dir=fashion_dir, captioned_format="folder"),
                       "train[:16]")
  assert folder.captions == train.captions
  with pytest.raises(ValueError, match="data.captioned_format must be one of"):
    open_source(cfg(name="captioned_fashion_mnist", data_dir=fashion_dir, captioned_format="zip"), "train[:16]")
