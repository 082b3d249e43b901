"""Tests of the bundled digits set and the shared splits (compressjax/datasets/{digits,splits,
registry}.py)."""

import numpy as np
import pytest
from sklearn.datasets import load_digits as sklearn_digits

from compressjax import datasets
from compressjax.datasets import digits
from compressjax.datasets import splits


@pytest.fixture(scope="module")
def reference():
  bunch = sklearn_digits()
  return bunch.images, bunch.target


def test_images_are_nearest_upsampled_digits(reference):
  grey, target = reference
  images, labels = digits.digits_images(size=32, channels=3)
  assert images.shape == (1797, 32, 32, 3) and images.dtype == np.uint8
  # Each source pixel v in 0..16 becomes a 4x4 block of round(v * 255 / 16) in every channel.
  expected = np.kron(np.round(grey * 255 / 16), np.ones((1, 4, 4)))
  for c in range(3):
    np.testing.assert_array_equal(images[..., c], expected)
  np.testing.assert_array_equal(labels, target)
  assert images[..., 0].max() == 255 and images.min() == 0
  small, _ = digits.digits_images(size=16, channels=1)
  np.testing.assert_array_equal(small[..., 0], np.kron(np.round(grey * 255 / 16),
                                                       np.ones((1, 2, 2))))


def test_load_digits_splits_and_is_deterministic(reference):
  _, target = reference
  data = digits.load_digits(num_val=180, num_test=360, seed=0)
  assert [len(y) for y in (data.train_labels, data.val_labels, data.test_labels)] == [
      1257, 180, 360]
  # The three splits partition the set: class counts add up to the full set's.
  counts = sum(np.bincount(y, minlength=10)
               for y in (data.train_labels, data.val_labels, data.test_labels))
  np.testing.assert_array_equal(counts, np.bincount(target, minlength=10))
  assert data.num_classes == 10 and data.class_names[7] == "7"
  np.testing.assert_allclose(data.mean, (data.train_images / 255.0).mean(axis=(0, 1, 2)),
                             rtol=1e-6)
  again = digits.load_digits(seed=0)
  np.testing.assert_array_equal(again.test_images, data.test_images)
  np.testing.assert_array_equal(again.val_labels, data.val_labels)
  other = digits.load_digits(seed=1)
  assert not np.array_equal(other.val_labels, data.val_labels)


def test_split_indices_partition_and_seed():
  train, val = splits.split_indices(50, 7, seed=5)
  assert len(val) == 7 and len(train) == 43
  np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(50))
  np.testing.assert_array_equal(splits.split_indices(50, 7, seed=5)[1], val)
  assert not np.array_equal(splits.split_indices(50, 7, seed=6)[1], val)
  with pytest.raises(ValueError, match="num_val must be in"):
    splits.split_indices(50, 50, seed=0)


def test_channel_stats_match_numpy():
  x = np.random.default_rng(0).integers(0, 256, (5000, 4, 3, 2), dtype=np.uint8)
  x[..., 1] = 17  # a constant channel gets std 1, not 0
  mean, std = splits.channel_stats(x)
  np.testing.assert_allclose(mean, (x / 255.0).mean(axis=(0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(std[0], (x[..., 0] / 255.0).std(), rtol=1e-5)
  assert std[1] == 1.0


def test_registry_and_bad_arguments():
  data = datasets.load_dataset("digits", size=8, channels=1, num_val=100, num_test=200)
  assert data.train_images.shape == (1497, 8, 8, 1)
  with pytest.raises(ValueError, match="dataset must be one of"):
    datasets.load_dataset("mnist")
  with pytest.raises(ValueError, match="data_dir"):
    datasets.load_dataset("cifar10")
  with pytest.raises(ValueError, match="size must be"):
    digits.digits_images(size=12)
  with pytest.raises(ValueError, match="channels must be"):
    digits.digits_images(channels=2)
  with pytest.raises(ValueError, match="num_test"):
    digits.load_digits(num_test=0)
