"""Tests of the CIFAR archive reader (compressjax/datasets/cifar.py) on generated archives."""

import io
import os
import pickle
import tarfile

import numpy as np
import pytest

from compressjax.datasets import cifar

PER_BATCH = 3
NAMES10 = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
           b"ship", b"truck"]


def _flat(images):
  # Official layout, written independently of the reader: per image the 1024 red values of
  # the 32x32 plane in row-major order, then green, then blue.
  return np.stack([np.concatenate([im[:, :, c].ravel() for c in range(3)]) for im in images])


def _legacy_pickle(obj):
  # The 2009 archives are Python-2 protocol-2 pickles naming numpy.core.multiarray.
  return pickle.dumps(obj, protocol=2).replace(b"numpy._core.multiarray",
                                               b"numpy.core.multiarray")


def _write_tar(path, folder, members):
  with tarfile.open(path, "w:gz") as tar:
    for name, obj in members.items():
      raw = obj if isinstance(obj, bytes) else _legacy_pickle(obj)
      info = tarfile.TarInfo(f"{folder}/{name}")
      info.size = len(raw)
      tar.addfile(info, io.BytesIO(raw))


def _cifar10_members(rng):
  images = rng.integers(0, 256, (6 * PER_BATCH, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, 6 * PER_BATCH)
  members = {"batches.meta": {b"label_names": NAMES10, b"num_vis": 3072}}
  for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
    sl = slice(i * PER_BATCH, (i + 1) * PER_BATCH)
    members[name] = {b"batch_label": name.encode(), b"data": _flat(images[sl]),
                     b"labels": [int(v) for v in labels[sl]]}
  return members, images, labels


@pytest.fixture
def cifar10(tmp_path):
  members, images, labels = _cifar10_members(np.random.default_rng(0))
  path = tmp_path / "cifar-10-python.tar.gz"
  _write_tar(path, "cifar-10-batches-py", members)
  return path, members, images, labels


def test_reads_cifar10_archive_exactly(cifar10):
  path, _, images, labels = cifar10
  train_x, train_y, test_x, test_y, names = cifar.read_cifar(str(path), "cifar10")
  n = 5 * PER_BATCH
  np.testing.assert_array_equal(train_x, images[:n])
  np.testing.assert_array_equal(train_y, labels[:n])
  np.testing.assert_array_equal(test_x, images[n:])
  np.testing.assert_array_equal(test_y, labels[n:])
  assert train_x.dtype == np.uint8 and train_y.dtype == np.int32
  assert names[0] == "airplane" and len(names) == 10


def test_pixel_layout_on_a_hand_made_image(tmp_path):
  members, _, _ = _cifar10_members(np.random.default_rng(1))
  flat = np.zeros((1, 3072), np.uint8)
  flat[0, 0] = 10  # red, row 0, column 0
  flat[0, 1024 + 1] = 20  # green, row 0, column 1
  flat[0, 2048 + 32] = 30  # blue, row 1, column 0
  members["test_batch"] = {b"data": flat, b"labels": [7]}
  _write_tar(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", members)
  _, _, test_x, test_y, _ = cifar.read_cifar(str(tmp_path), "cifar10")
  expected = np.zeros((1, 32, 32, 3), np.uint8)
  expected[0, 0, 0, 0], expected[0, 0, 1, 1], expected[0, 1, 0, 2] = 10, 20, 30
  np.testing.assert_array_equal(test_x, expected)
  np.testing.assert_array_equal(test_y, [7])


def test_accepts_directory_and_extracted_folder(cifar10, tmp_path):
  path, members, images, _ = cifar10
  from_dir = cifar.read_cifar(str(tmp_path), "cifar10")
  extracted = tmp_path / "x" / "cifar-10-batches-py"
  extracted.mkdir(parents=True)
  for name, obj in members.items():
    (extracted / name).write_bytes(_legacy_pickle(obj))
  from_folder = cifar.read_cifar(str(tmp_path / "x"), "cifar10")
  for a, b in zip(from_dir[:4], from_folder[:4]):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(from_folder[0], images[:5 * PER_BATCH])


def test_reads_cifar100_fine_and_coarse(tmp_path):
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
  fine, coarse = rng.integers(0, 100, 7), rng.integers(0, 20, 7)
  meta = {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
          b"coarse_label_names": [f"c{i}".encode() for i in range(20)]}
  part = lambda sl: {b"data": _flat(images[sl]), b"fine_labels": list(map(int, fine[sl])),
                     b"coarse_labels": list(map(int, coarse[sl]))}
  _write_tar(tmp_path / "cifar-100-python.tar.gz", "cifar-100-python",
             {"train": part(slice(0, 5)), "test": part(slice(5, 7)), "meta": meta})
  tx, ty, sx, sy, names = cifar.read_cifar(str(tmp_path), "cifar100")
  np.testing.assert_array_equal(tx, images[:5])
  np.testing.assert_array_equal(sx, images[5:])
  np.testing.assert_array_equal(ty, fine[:5])
  np.testing.assert_array_equal(sy, fine[5:])
  assert len(names) == 100 and names[3] == "f3"
  _, ty, _, sy, names = cifar.read_cifar(str(tmp_path), "cifar100_coarse")
  np.testing.assert_array_equal(np.concatenate([ty, sy]), coarse)
  assert len(names) == 20


def test_load_cifar_splits_train_into_train_and_validation(cifar10):
  path, _, images, labels = cifar10
  data = cifar.load_cifar(str(path), "cifar10", num_val=4, seed=3)
  n = 5 * PER_BATCH
  assert data.train_images.shape == (n - 4, 32, 32, 3) and data.val_images.shape[0] == 4
  # Every training image lands in exactly one split, with its label (images are distinct).
  joined = np.concatenate([data.train_images, data.val_images]).reshape(n, -1)
  order = [int(np.flatnonzero((images[:n].reshape(n, -1) == row).all(1))[0]) for row in joined]
  assert sorted(order) == list(range(n))
  np.testing.assert_array_equal(np.concatenate([data.train_labels, data.val_labels]),
                                labels[order])
  np.testing.assert_array_equal(data.test_images, images[n:])
  x = data.train_images.astype(np.float64) / 255
  np.testing.assert_allclose(data.mean, x.mean(axis=(0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(data.std, x.std(axis=(0, 1, 2)), rtol=1e-5)
  again = cifar.load_cifar(str(path), "cifar10", num_val=4, seed=3)
  np.testing.assert_array_equal(again.val_labels, data.val_labels)


def _broken(tmp_path, edit):
  members, _, _ = _cifar10_members(np.random.default_rng(4))
  edit(members)
  _write_tar(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", members)
  return str(tmp_path / "cifar-10-python.tar.gz")


def test_rejects_missing_archive(tmp_path):
  with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
    cifar.read_cifar(str(tmp_path), "cifar10")
  with pytest.raises(FileNotFoundError, match="nope.tar.gz"):
    cifar.read_cifar(str(tmp_path / "nope.tar.gz"), "cifar10")


def test_rejects_missing_member(tmp_path):
  path = _broken(tmp_path, lambda m: m.pop("data_batch_3"))
  with pytest.raises(ValueError, match="cifar-10-batches-py/data_batch_3"):
    cifar.read_cifar(path, "cifar10")


def test_rejects_wrong_shape(tmp_path):
  path = _broken(tmp_path, lambda m: m["data_batch_2"].update(
      {b"data": np.zeros((PER_BATCH, 3071), np.uint8)}))
  with pytest.raises(ValueError, match=r"data_batch_2.*3072.*\(3, 3071\)"):
    cifar.read_cifar(path, "cifar10")


def test_rejects_wrong_dtype_label_range_count_and_key(tmp_path):
  cases = [
      (lambda m: m["test_batch"].update({b"data": np.zeros((PER_BATCH, 3072), np.float32)}),
       r"test_batch.*uint8.*float32"),
      (lambda m: m["data_batch_1"].update({b"labels": [0, 10, 1]}), r"data_batch_1.*\[0, 10\)"),
      (lambda m: m["data_batch_4"].update({b"labels": [0, 1]}), r"data_batch_4.*3 integers"),
      (lambda m: m["data_batch_5"].pop(b"labels"), r"data_batch_5 lacks key b'labels'"),
      (lambda m: m["batches.meta"].update({b"label_names": NAMES10[:9]}), "batches.meta"),
  ]
  for i, (edit, message) in enumerate(cases):
    os.makedirs(tmp_path / str(i))
    with pytest.raises(ValueError, match=message):
      cifar.read_cifar(_broken(tmp_path / str(i), edit), "cifar10")


def test_rejects_non_tar_and_code_in_pickle(tmp_path):
  (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tar archive at all")
  with pytest.raises(ValueError, match="not a readable tar archive"):
    cifar.read_cifar(str(tmp_path), "cifar10")

  class Evil:
    def __reduce__(self):
      return (os.system, ("echo pwned",))

  os.makedirs(tmp_path / "sub")
  path = _broken(tmp_path / "sub",
                 lambda m: m.update({"data_batch_1": pickle.dumps(Evil(), protocol=2)}))
  with pytest.raises(ValueError, match="data_batch_1.*not allowed"):
    cifar.read_cifar(path, "cifar10")


def test_rejects_unknown_name(cifar10):
  with pytest.raises(ValueError, match="name must be one of"):
    cifar.read_cifar(str(cifar10[0]), "cifar1000")
