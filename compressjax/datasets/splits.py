"""Train/validation/test splits of an image classification set, held as NumPy arrays.

Every loader (CIFAR-10/100, the bundled digits) returns the same `VisionData`: uint8 NHWC
images, int32 labels, and the per-channel mean and standard deviation of the training split
(on the [0, 1] scale) for `compressjax.datasets.augment.normalize`. The validation split is
drawn from the official training set by a seeded permutation, so the same seed gives the same
split on any machine; the test split is only read once, for the final report.
"""

from typing import NamedTuple

import numpy as np


class VisionData(NamedTuple):
  """An image classification set split three ways (host NumPy arrays).

  Attributes:
    train_images: uint8 ``[n_train, height, width, channels]``.
    train_labels: int32 ``[n_train]`` in ``[0, num_classes)``.
    val_images: uint8 ``[n_val, height, width, channels]``.
    val_labels: int32 ``[n_val]``.
    test_images: uint8 ``[n_test, height, width, channels]``.
    test_labels: int32 ``[n_test]``.
    mean: float32 ``[channels]``, per-channel mean of the training images scaled to [0, 1].
    std: float32 ``[channels]``, per-channel standard deviation of the same.
    num_classes: number of classes.
    class_names: one name per class.
  """
  train_images: np.ndarray
  train_labels: np.ndarray
  val_images: np.ndarray
  val_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  mean: np.ndarray
  std: np.ndarray
  num_classes: int
  class_names: tuple[str, ...]


def split_indices(num_examples: int, num_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Seeded train/validation split of ``range(num_examples)``.

  The validation set is the last ``num_val`` entries of a permutation drawn with
  ``np.random.default_rng(seed)``; both index sets are returned sorted.

  Args:
    num_examples: size of the set being split.
    num_val: validation examples, in ``[0, num_examples)``.
    seed: seed of the permutation.

  Returns:
    ``(train_indices, val_indices)``, disjoint int64 arrays covering ``range(num_examples)``.

  Raises:
    ValueError: if ``num_val`` is out of range.
  """
  if not 0 <= num_val < num_examples:
    raise ValueError(
        f"num_val must be in [0, {num_examples}) for {num_examples} examples, got {num_val}")
  perm = np.random.default_rng(seed).permutation(num_examples)
  return np.sort(perm[:num_examples - num_val]), np.sort(perm[num_examples - num_val:])


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and (population) standard deviation of uint8 images on the [0, 1] scale.

  Args:
    images: uint8 ``[n, height, width, channels]``.

  Returns:
    ``(mean, std)``, float32 arrays of shape ``[channels]``.
  """
  if images.ndim != 4 or images.shape[0] == 0:
    raise ValueError(f"images must be a non-empty NHWC array, got shape {images.shape}")
  channels = images.shape[-1]
  s = np.zeros(channels, np.int64)
  ss = np.zeros(channels, np.int64)
  # Integer sums in chunks: exact, and no float64 copy of a whole CIFAR set (1.1 GB).
  for start in range(0, images.shape[0], 2048):
    x = images[start:start + 2048].reshape(-1, channels).astype(np.int64)
    s += x.sum(axis=0)
    ss += (x * x).sum(axis=0)
  n = images.size // channels
  mean = s / n
  var = np.maximum(ss / n - mean * mean, 0.0)
  # A constant channel would divide by zero in normalize.
  std = np.where(var > 0, np.sqrt(var), 255.0)
  return (mean / 255.0).astype(np.float32), (std / 255.0).astype(np.float32)


def make_vision_data(train_images: np.ndarray, train_labels: np.ndarray,
                     test_images: np.ndarray, test_labels: np.ndarray, *, num_classes: int,
                     class_names: tuple[str, ...], num_val: int, seed: int) -> VisionData:
  """Splits a training set into train/validation and attaches the normalization statistics.

  Args:
    train_images: uint8 ``[n, height, width, channels]`` of the official training set.
    train_labels: integer labels ``[n]``.
    test_images: uint8 images of the official test set.
    test_labels: integer labels of the test set.
    num_classes: number of classes.
    class_names: one name per class.
    num_val: validation examples taken from the training set (see `split_indices`).
    seed: seed of the split.

  Returns:
    A `VisionData` whose mean/std come from the training split only.

  Raises:
    ValueError: if shapes or labels are inconsistent, or ``num_val`` is out of range.
  """
  for name, x, y in (("train", train_images, train_labels), ("test", test_images, test_labels)):
    if x.ndim != 4 or x.dtype != np.uint8:
      raise ValueError(f"{name}_images must be uint8 NHWC, got {x.dtype} {x.shape}")
    if y.shape != (x.shape[0],):
      raise ValueError(f"{name}_labels must have shape ({x.shape[0]},), got {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
      raise ValueError(f"{name}_labels must be in [0, {num_classes}), got range "
                       f"[{y.min()}, {y.max()}]")
  if len(class_names) != num_classes:
    raise ValueError(f"class_names must have {num_classes} entries, got {len(class_names)}")
  train_idx, val_idx = split_indices(train_images.shape[0], num_val, seed)
  mean, std = channel_stats(train_images[train_idx])
  return VisionData(
      train_images=train_images[train_idx], train_labels=train_labels[train_idx].astype(np.int32),
      val_images=train_images[val_idx], val_labels=train_labels[val_idx].astype(np.int32),
      test_images=test_images, test_labels=test_labels.astype(np.int32),
      mean=mean, std=std, num_classes=int(num_classes), class_names=tuple(class_names))
