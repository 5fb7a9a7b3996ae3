"""Tests for solidmark_jax.data.folders: image folders (modes, sizes, classes, captions, bad files)."""

import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from solidmark_jax.data import folders
from solidmark_jax.data.folders import FolderSource
from solidmark_jax.data.sources import open_source


def cfg(**kw) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(kw)


def save(path, img: Image.Image, **kw):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img.save(path, **kw)


def test_folder_converts_modes_and_sizes(tmp_path):
  d = str(tmp_path)
  save(f"{d}/a_grey.png", Image.new("L", (10, 10), 77))
  save(f"{d}/b_clear.png", Image.new("RGBA", (16, 16), (255, 0, 0, 0)))  # fully transparent -> white
  save(f"{d}/c_red.png", Image.new("RGBA", (16, 16), (255, 0, 0, 255)))
  odd = np.zeros((30, 20, 3), np.uint8)  # 20 wide, 30 high: the centre 20x20 is rows 5..24
  odd[5:25] = (0, 200, 0)
  save(f"{d}/d_odd.bmp", Image.fromarray(odd))
  save(f"{d}/e_pal.gif", Image.new("RGB", (8, 8), (0, 0, 255)).convert("P"))
  save(f"{d}/f_16bit.png", Image.fromarray(np.full((16, 16), 65535, np.uint16)))
  save(f"{d}/g.jpg", Image.new("RGB", (16, 16), (128, 128, 128)), quality=95)
  (tmp_path / "notes.md").write_text("not an image")
  src = FolderSource(d, image_size=16, channels=3)
  assert src.files == ["a_grey.png", "b_clear.png", "c_red.png", "d_odd.bmp", "e_pal.gif", "f_16bit.png", "g.jpg"]
  x = src.read(np.arange(len(src)))["image"]
  assert x.shape == (7, 16, 16, 3) and x.dtype == np.uint8
  assert src.num_classes == 0 and src.captions is None and "caption" not in src.read(np.array([0]))
  np.testing.assert_array_equal(src.labels(), -1)
  np.testing.assert_array_equal(x[0], 77)
  np.testing.assert_array_equal(x[1], 255)
  np.testing.assert_array_equal(x[2], np.broadcast_to([255, 0, 0], (16, 16, 3)))
  np.testing.assert_array_equal(x[3], np.broadcast_to([0, 200, 0], (16, 16, 3)))
  np.testing.assert_array_equal(x[4], np.broadcast_to([0, 0, 255], (16, 16, 3)))
  np.testing.assert_array_equal(x[5], 255)
  assert np.abs(x[6].astype(int) - 128).max() <= 2
  grey = FolderSource(d, image_size=4, channels=1)
  y = grey.read(np.arange(len(grey)))["image"]
  assert y.shape == (7, 4, 4, 1)
  assert int(y[2, 0, 0, 0]) == 76  # luma of pure red: 0.299 * 255
  assert int(y[0, 0, 0, 0]) == 77


def test_folder_bad_images(tmp_path, caplog):
  d = tmp_path / "imgs"
  save(str(d / "cat" / "1.png"), Image.new("RGB", (8, 8), (1, 2, 3)))
  save(str(d / "cat" / "2.png"), Image.new("RGB", (64, 64)))
  png = (d / "cat" / "2.png").read_bytes()
  (d / "cat" / "2.png").write_bytes(png[: len(png) // 2])  # truncated
  (d / "cat" / "3.png").write_bytes(b"this is not a png")
  save(str(d / "dog" / "4.jpg"), Image.new("RGB", (8, 8)))
  # verify_images="full": every image decoded at open time, the truncated one is found there
  with pytest.raises(ValueError) as e:
    FolderSource(str(d), image_size=8, verify_images="full")
  assert f"{d}/cat/2.png: cannot decode image (truncated or not an image)" in str(e.value)
  with caplog.at_level("WARNING"):
    src = FolderSource(str(d), image_size=8, on_bad_image="skip", verify_images="full")
  assert [p for p, _ in src.skipped] == [f"{d}/cat/2.png", f"{d}/cat/3.png"]
  assert all("cannot decode image" in r for _, r in src.skipped)
  assert "skipped 2 bad image(s)" in caplog.text
  assert src.files == ["cat/1.png", "dog/4.jpg"] and len(src) == 2
  np.testing.assert_array_equal(src.read(np.array([0]))["image"][0, 0, 0], [1, 2, 3])
  # "header" (the default): the file that is no image fails at open time, the truncated PNG (whose
  # header is fine) when a batch holding it is read, naming the file
  with pytest.raises(ValueError, match=r"cat/3\.png: cannot decode image"):
    FolderSource(str(d), image_size=8)
  src = FolderSource(str(d), image_size=8, on_bad_image="skip")
  assert [p for p, _ in src.skipped] == [f"{d}/cat/3.png"]
  assert src.files == ["cat/1.png", "cat/2.png", "dog/4.jpg"]
  np.testing.assert_array_equal(src.read(np.array([2, 0]))["image"][1, 0, 0], [1, 2, 3])
  with pytest.raises(ValueError) as e:
    src.read(np.array([0, 1, 2]))
  assert str(e.value).startswith(f"{d}/cat/2.png: cannot decode image") and "data.verify_images='full'" in str(e.value)
  # "none": only listed
  assert FolderSource(str(d), image_size=8, verify_images="none").files == ["cat/1.png", "cat/2.png", "cat/3.png",
                                                                              "dog/4.jpg"]
  with pytest.raises(ValueError, match="data.verify_images must be one of"):
    FolderSource(str(d), image_size=8, verify_images="quick")


def test_folder_decodes_per_batch_not_at_open(tmp_path, monkeypatch):
  """Opening decodes no pixels (headers only); read() decodes just the rows asked for."""
  for i in range(6):
    save(str(tmp_path / f"{i}.png"), Image.new("L", (12, 12), 40 * i))
  calls = []
  real = folders.decode_image
  monkeypatch.setattr(folders, "decode_image", lambda path, *a: calls.append(path) or real(path, *a))
  src = FolderSource(str(tmp_path), image_size=6, channels=1)
  assert calls == [] and not hasattr(src, "images")
  x = src.read(np.array([4, 1, 4]))["image"]
  assert sorted(os.path.basename(p) for p in calls) == ["1.png", "4.png", "4.png"]
  np.testing.assert_array_equal(x[:, 0, 0, 0], [160, 40, 160])
  FolderSource(str(tmp_path), image_size=6, channels=1, verify_images="full")
  assert len(calls) == 3 + 6


def test_folder_class_subfolders_and_eval_folder(tmp_path):
  train, val = tmp_path / "train", tmp_path / "val"
  for cls, n in (("zebra", 2), ("ant", 1), ("bee", 3)):
    for i in range(n):
      save(str(train / cls / f"{i}.png"), Image.new("L", (6, 6), 10 * i))
  save(str(val / "zebra" / "z.png"), Image.new("L", (6, 6)))
  src = open_source(cfg(name="folder", folder=str(train), image_size=6), "train")
  assert src.name == f"folder:{train}"
  assert (src.num_classes, src.class_names) == (3, ["ant", "bee", "zebra"])
  assert src.files[0] == "ant/0.png"
  np.testing.assert_array_equal(src.labels(), [0, 1, 1, 1, 2, 2])
  np.testing.assert_array_equal(src.read(np.array([5, 1]))["label"], [2, 1])
  with pytest.raises(ValueError, match="data.eval_folder"):
    open_source(cfg(name="folder", folder=str(train), image_size=6), "test")
  ev = open_source(cfg(name="folder", folder=str(train), eval_folder=str(val), image_size=6), "test")
  assert (len(ev), ev.num_classes) == (1, 3)
  np.testing.assert_array_equal(ev.labels(), [2])  # zebra keeps its training label
  save(str(train / "loose.png"), Image.new("L", (6, 6)))
  with pytest.raises(ValueError, match="mixes images at its root"):
    FolderSource(str(train), image_size=6)


def test_folder_captions(tmp_path):
  d = tmp_path / "cap"
  for name in ("a.png", "b.png", "sub/c.png"):
    save(str(d / name), Image.new("RGB", (8, 8)))
  with open(d / "captions.jsonl", "w") as f:
    f.write(json.dumps({"file": "a.png", "caption": "a red fox"}) + "\n\n")
    f.write(json.dumps({"file": "./b.png", "caption": "a blue bird"}) + "\n")
  (d / "sub" / "c.txt").write_text("a green frog\n")
  with pytest.raises(ValueError, match="mixes"):  # sub/c.png next to root images
    FolderSource(str(d), image_size=8)
  (d / "sub" / "c.png").rename(d / "c.png")
  (d / "sub" / "c.txt").rename(d / "c.txt")
  src = FolderSource(str(d), image_size=8)
  assert src.captions == ["a red fox", "a blue bird", "a green frog"]
  assert src.read(np.array([2, 0]))["caption"] == ["a green frog", "a red fox"]
  save(str(d / "d.png"), Image.new("RGB", (8, 8)))
  with pytest.raises(ValueError, match=r"d\.png: no caption"):
    FolderSource(str(d), image_size=8)
  skip = FolderSource(str(d), image_size=8, on_bad_image="skip")
  assert len(skip) == 3 and [p for p, _ in skip.skipped] == [f"{d}/d.png"]
  (d / "d.txt").write_text("  \n")
  with pytest.raises(ValueError, match=r"d\.png: empty caption"):
    FolderSource(str(d), image_size=8)
  with open(d / "captions.jsonl", "a") as f:
    f.write(json.dumps({"file": "nope.png", "caption": "x"}) + "\n")
  with pytest.raises(ValueError, match=r"captions.jsonl line 4: no image 'nope.png'"):
    FolderSource(str(d), image_size=8)


def test_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    FolderSource(str(tmp_path / "missing"), image_size=8)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="has no images"):
    FolderSource(str(tmp_path / "empty"), image_size=8)
  with pytest.raises(ValueError, match="data.image_size is required"):
    open_source(cfg(name="folder", folder=str(tmp_path / "empty")), "train")
  with pytest.raises(ValueError, match="data.folder"):
    open_source(cfg(name="folder"), "train")
  with pytest.raises(ValueError, match="data.on_bad_image"):
    FolderSource(str(tmp_path), image_size=8, on_bad_image="ignore")
  with pytest.raises(ValueError, match="data.channels"):
    FolderSource(str(tmp_path), image_size=8, channels=4)
