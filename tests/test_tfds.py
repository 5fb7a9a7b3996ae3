"""Tests for solidmark_jax.data.tfds (real Fashion-MNIST, tiny fake datasets) through open_source."""

import gzip
import hashlib
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from solidmark_jax.data import tfds as tfds_source
from solidmark_jax.data.images import to_square
from solidmark_jax.data.sources import Source, open_source

from data_helpers import FASHION_DIR, cfg, has_fashion


def read_idx(path: str) -> np.ndarray:
  """Decodes a .gz IDX file with numpy alone."""
  with gzip.open(path) as f:
    data = f.read()
  assert data[:2] == b"\0\0" and data[2] == 0x08  # unsigned bytes
  ndim = data[3]
  dims = np.frombuffer(data, ">u4", ndim, 4)
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


# ----------------------------------------------------------------------------------------------
# Real Fashion-MNIST, prepared offline through TFDS once per session


@has_fashion
@pytest.mark.parametrize("split,prefix,n", [("train", "train", 60000), ("test", "t10k", 10000)])
def test_fashion_mnist_matches_raw_idx(fashion_dir, split, prefix, n):
  src = open_source(cfg(name="fashion_mnist", data_dir=fashion_dir), split)
  raw_x = read_idx(os.path.join(FASHION_DIR, f"{prefix}-images-idx3-ubyte.gz"))
  raw_y = read_idx(os.path.join(FASHION_DIR, f"{prefix}-labels-idx1-ubyte.gz"))
  assert isinstance(src, Source)
  assert (len(src), src.num_classes, src.image_size, src.channels) == (n, 10, 28, 1)
  assert src.name == f"fashion_mnist:{split}"
  assert raw_x.shape == (n, 28, 28)
  labels = src.labels()
  assert labels.dtype == np.int32 and labels.shape == (n,)
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.bincount(raw_y, minlength=10))
  # TFDS stores records in its own (deterministic) order: match each read image to the raw file.
  raw = {}
  for i in range(n):
    raw.setdefault(raw_x[i].tobytes(), set()).add(int(raw_y[i]))
  got = src.read(np.arange(300))
  assert got["image"].shape == (300, 28, 28, 1) and got["image"].dtype == np.uint8
  np.testing.assert_array_equal(got["label"], labels[:300])
  for image, label in zip(got["image"], got["label"]):
    assert int(label) in raw[image[:, :, 0].tobytes()]
  assert "caption" not in got


@has_fashion
def test_fashion_mnist_resized_rgb(fashion_dir):
  src = open_source(cfg(name="fashion_mnist", data_dir=fashion_dir, image_size=32, channels=3), "test[:100]")
  native = open_source(cfg(name="fashion_mnist", data_dir=fashion_dir), "test[:100]")
  assert (len(src), src.image_size, src.channels) == (100, 32, 3)
  got, ref = src.read(np.array([7, 3])), native.read(np.array([7, 3]))
  assert got["image"].shape == (2, 32, 32, 3)
  np.testing.assert_array_equal(got["image"][..., 0], got["image"][..., 2])  # grey repeated to RGB
  expect = to_square(Image.fromarray(ref["image"][0, :, :, 0]), 32, 3)
  np.testing.assert_array_equal(got["image"][0], expect)
  assert got["image"][0].std() > 10  # a real picture, not a blank
  np.testing.assert_array_equal(got["label"], ref["label"])


@has_fashion
def test_fashion_mnist_checksums_stay_out_of_site_packages(fashion_dir):
  import tensorflow_datasets as tfds
  recorded = open(os.path.join(fashion_dir, "fashion_mnist", "manual_dir_checksums.tsv")).read()
  for fname, digest in tfds_source.DEBIAN_FASHION_MNIST_SHA256.items():
    if hashlib.sha256(open(os.path.join(FASHION_DIR, fname), "rb").read()).hexdigest() == digest:
      assert digest in recorded
  installed = os.path.join(os.path.dirname(tfds.__file__), "url_checksums", "fashion_mnist.txt")
  text = open(installed).read()
  assert "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84" in text  # upstream, untouched
  assert tfds_source.DEBIAN_FASHION_MNIST_SHA256["train-images-idx3-ubyte.gz"] not in text


def test_fashion_mnist_missing_file(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  for f in tfds_source.FASHION_MNIST_FILES[1:]:
    (manual / f).write_bytes(b"")
  with pytest.raises(FileNotFoundError) as e:
    open_source(cfg(name="fashion_mnist", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual)), "train")
  assert str(manual / tfds_source.FASHION_MNIST_FILES[0]) in str(e.value)
  assert "apt-get install dataset-fashion-mnist" in str(e.value) and "data.manual_dir" in str(e.value)


# ----------------------------------------------------------------------------------------------
# Other TFDS datasets: tiny builders prepared into a tmp data_dir


def _fake_builders(meta_dir: str):
  """Registers three tiny TFDS builders; `meta_dir` stands in for their (package) metadata folder."""
  import tensorflow_datasets as tfds
  from etils import epath

  class SolidmarkFakeFaces(tfds.core.GeneratorBasedBuilder):
    """celeb_a-like: 20x12 RGB, no label."""
    VERSION = tfds.core.Version("1.0.0")
    pkg_dir_path = epath.Path(meta_dir)

    def _info(self):
      return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(20, 12, 3)), "smiling": tfds.features.Scalar(np.bool_)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(5):
        x = np.zeros((20, 12, 3), np.uint8)
        x[4:16] = (10 * i, 100, 200)  # the centre square; the top and bottom 4 rows stay black
        yield i, {"image": x, "smiling": bool(i % 2)}

  class SolidmarkFakeDigits(tfds.core.GeneratorBasedBuilder):
    """mnist-like: 8x8 grey, 3 classes."""
    VERSION = tfds.core.Version("1.0.0")
    pkg_dir_path = epath.Path(meta_dir)

    def _info(self):
      return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(8, 8, 1)), "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(9), "test": self._generate_examples(3)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"image": np.full((8, 8, 1), 20 * i, np.uint8), "label": i % 3}

  class SolidmarkFakeStl(tfds.core.GeneratorBasedBuilder):
    """STL-10-like: 12x12 grey, 3 classes; labelled train and test, an unlabelled split (label -1)."""
    VERSION = tfds.core.Version("1.0.0")
    pkg_dir_path = epath.Path(meta_dir)

    def _info(self):
      return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(12, 12, 1)), "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(8, True), "test": self._generate_examples(6, True),
              "unlabelled": self._generate_examples(4, False)}

    def _generate_examples(self, n, labelled):
      for i in range(n):
        yield i, {"image": np.full((12, 12, 1), 10 * i, np.uint8), "label": (i + 1) % 3 if labelled else -1}

  class SolidmarkFakeOffline(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    pkg_dir_path = epath.Path(meta_dir)

    def _info(self):
      return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({"image": tfds.features.Image()}))

    def _split_generators(self, dl_manager):
      raise ConnectionError("simulated: no network")

    def _generate_examples(self):
      yield from ()

  return SolidmarkFakeFaces, SolidmarkFakeDigits, SolidmarkFakeStl, SolidmarkFakeOffline


@pytest.fixture(scope="module")
def fake_tfds(tmp_path_factory):
  _fake_builders(str(tmp_path_factory.mktemp("fake_tfds_meta")))
  return str(tmp_path_factory.mktemp("fake_tfds"))


def test_tfds_unlabelled_non_square(fake_tfds):
  with pytest.raises(ValueError, match="data.image_size is required"):
    open_source(cfg(name="solidmark_fake_faces", data_dir=fake_tfds), "train")
  src = open_source(cfg(name="solidmark_fake_faces", data_dir=fake_tfds, image_size=6), "train")
  assert (len(src), src.num_classes, src.image_size, src.channels) == (5, 0, 6, 3)
  got = src.read(np.arange(5))
  assert got["image"].shape == (5, 6, 6, 3)
  np.testing.assert_array_equal(got["label"], -1)
  np.testing.assert_array_equal(src.labels(), np.full(5, -1, np.int32))
  # centre-cropped to 12x12 (no black rows left), then resized
  colours = sorted({tuple(img.reshape(-1, 3).min(0)) for img in got["image"]})
  assert colours == [(10 * i, 100, 200) for i in range(5)]
  assert np.array_equal(got["image"].max((1, 2)), got["image"].min((1, 2)))
  grey = open_source(cfg(name="solidmark_fake_faces", data_dir=fake_tfds, image_size=4, channels=1), "train")
  y = grey.read(np.arange(5))["image"]
  assert y.shape == (5, 4, 4, 1)
  r = got["image"][:, 0, 0, 0].astype(int)  # PIL luma of (r, 100, 200)
  np.testing.assert_array_equal(y[:, 0, 0, 0], (r * 299 + 100 * 587 + 200 * 114 + 500) // 1000)


def test_tfds_labelled_split_slices(fake_tfds):
  src = open_source(cfg(name="solidmark_fake_digits", data_dir=fake_tfds, channels=3), "train")
  assert (len(src), src.num_classes, src.class_names, src.image_size, src.channels) == (9, 3, ["a", "b", "c"], 8, 3)
  got = src.read(np.arange(9))
  np.testing.assert_array_equal(src.labels(), got["label"])
  np.testing.assert_array_equal(got["label"], got["image"][:, 0, 0, 0] // 20 % 3)  # label matches image
  np.testing.assert_array_equal(got["image"][..., 0], got["image"][..., 1])
  assert sorted(got["image"][:, 0, 0, 0]) == [20 * i for i in range(9)]
  assert len(open_source(cfg(name="solidmark_fake_digits", data_dir=fake_tfds), "train[:4]")) == 4
  assert len(open_source(cfg(name="solidmark_fake_digits", data_dir=fake_tfds), "test")) == 3
  with pytest.raises(IndexError):
    src.read(np.array([9]))


def test_class_model_refuses_unlabelled_records(fake_tfds):
  """STL-10's 'unlabelled' records have label -1, which the condition table would read as the null
  class: a class-conditional model refuses them (train or eval split), naming the field and the fix;
  the labelled test split gives non-members their own classes."""
  from configs import tiny
  from solidmark_jax.evaluation import evaluator
  from solidmark_jax.experiment import build_experiment

  def config(train_split, eval_split):
    c = tiny.get_config()
    c.data.update(dict(name="solidmark_fake_stl", data_dir=fake_tfds, subset_size=None, train_split=train_split,
                       eval_split=eval_split))
    c.eval.num_members = c.eval.num_nonmembers = 4
    return c

  unlabelled = open_source(cfg(name="solidmark_fake_stl", data_dir=fake_tfds, channels=1), "unlabelled")
  np.testing.assert_array_equal(unlabelled.labels(), -1)
  with pytest.raises(ValueError, match=r"data\.train_split='train\+unlabelled': 4 of the 12 records used have no "
                                       r"label \(-1\), and model\.condition='class' would silently condition them on "
                                       r"the null class; use a labelled split \(e\.g\. STL-10's 'test', not "
                                       r"'unlabelled'\), or model\.condition='none'"):
    build_experiment(config("train+unlabelled", "test"))
  c = config("train", "unlabelled[:2]")
  c.eval.num_nonmembers = 2
  exp = build_experiment(c)
  own_class = lambda source, rows: (source.read(rows)["image"][:, 0, 0, 0] // 10 + 1) % 3  # as generated
  np.testing.assert_array_equal(exp.conditions, own_class(exp.source, exp.instances.record_index))  # members
  with pytest.raises(ValueError, match=r"data\.eval_split='unlabelled\[:2\]': 2 of the 2 records used have no label"):
    evaluator.nonmember_group(exp, c)
  c = config("train", "test")
  group = evaluator.nonmember_group(build_experiment(c), c)
  test = open_source(c.data, "test")
  np.testing.assert_array_equal(group.conditions, own_class(test, group.ids))  # non-members: their own classes
  assert exp.null_id == 3 and not np.any(group.conditions == exp.null_id)
  c.model.condition = "none"  # an unconditional model may use unlabelled records
  c.data.train_split = "train+unlabelled"
  unconditional = build_experiment(c)
  assert len(unconditional.conditions) == 12 and np.all(unconditional.conditions == unconditional.null_id)


def test_tfds_not_prepared_errors(fake_tfds, tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    open_source(cfg(name="solidmark_fake_digits", data_dir=str(tmp_path), download=False), "train")
  assert "not prepared" in str(e.value) and str(tmp_path) in str(e.value) and "tfds build" in str(e.value)
  with pytest.raises(RuntimeError) as e:
    open_source(cfg(name="solidmark_fake_offline", data_dir=str(tmp_path), image_size=8), "train")
  msg = str(e.value)
  assert "not prepared" in msg and "simulated: no network" in msg and "data.data_dir" in msg
  assert "--file_format=array_record" in msg


def test_tfds_split_and_format_errors(fake_tfds, tmp_path):
  with pytest.raises(ValueError, match=r"'solidmark_fake_digits', split 'validation'.*Unknown split"):
    open_source(cfg(name="solidmark_fake_digits", data_dir=fake_tfds), "validation")
  import tensorflow_datasets as tfds
  tfds.builder("solidmark_fake_digits", data_dir=str(tmp_path), file_format="tfrecord").download_and_prepare()
  with pytest.raises(RuntimeError, match="tfds convert_format .*--out_file_format=array_record"):
    open_source(cfg(name="solidmark_fake_digits", data_dir=str(tmp_path)), "train")


def test_prepare_lock_excludes_other_processes(tmp_path):
  lock, marker = str(tmp_path / "x.lock"), tmp_path / "marker"
  child = ("import sys, time; from solidmark_jax.data.tfds import file_lock\n"
           "with file_lock(sys.argv[1]):\n"
           "  open(sys.argv[2], 'w').write('held'); time.sleep(0.5); open(sys.argv[2], 'w').write('released')\n")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.Popen([sys.executable, "-c", child, lock, str(marker)], cwd=root)
  while not marker.exists() and proc.poll() is None:
    time.sleep(0.01)
  with tfds_source.file_lock(lock):  # blocks until the child lets go
    assert marker.read_text() == "released"
  assert proc.wait() == 0


def test_unknown_dataset():
  with pytest.raises(ValueError) as e:
    open_source(cfg(name="no_such_dataset_xyz"), "train")
  assert "no_such_dataset_xyz" in str(e.value)
  assert all(s in str(e.value) for s in ("'folder'", "'fashion_mnist'", "TFDS builder"))


def test_import_stays_light():
  code = "import sys, solidmark_jax.data; print('tensorflow' in sys.modules or 'tensorflow_datasets' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.stdout.strip() == "False"
