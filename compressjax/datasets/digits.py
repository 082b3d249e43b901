"""The embedded default image set: scikit-learn's bundled 8x8 handwritten digits.

``sklearn.datasets.load_digits`` ships 1,797 grey 8x8 images (pixel values 0..16, ten classes;
the UCI "Optical Recognition of Handwritten Digits" test set) inside the scikit-learn wheel,
so this set needs no download. Pixels are mapped to uint8 by ``round(v * 255 / 16)``, the
image is upsampled by nearest-neighbour repetition (factor ``size // 8``) and the grey plane
repeated over ``channels``, so the default 32x32x3 images feed the CIFAR models unchanged.
There is no official test split: a seeded ``num_test`` images are held out, then ``num_val``
more for validation, through the same `VisionData` API as CIFAR.
"""

import numpy as np

from compressjax.datasets import splits

NUM_DIGITS = 1797


def digits_images(size: int = 32, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
  """All 1,797 digits as uint8 NHWC images.

  Args:
    size: output height and width, a multiple of 8 (8, 16, 32, ...).
    channels: 1 (grey) or 3 (the grey plane repeated, for RGB models).

  Returns:
    ``(images, labels)``: uint8 ``[1797, size, size, channels]`` and int32 ``[1797]``.

  Raises:
    ValueError: if ``size`` or ``channels`` is not allowed.
    ImportError: if scikit-learn is not installed.
  """
  if not isinstance(size, int) or size < 8 or size % 8:
    raise ValueError(f"size must be a positive multiple of 8, got {size!r}")
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels!r}")
  # Imported here: scikit-learn is needed only for this set, and importing it costs ~1 s.
  try:
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the digits set needs scikit-learn: pip install scikit-learn") from e
  bunch = load_digits()
  grey = np.round(np.asarray(bunch.images, np.float64) * (255.0 / 16.0)).astype(np.uint8)
  factor = size // 8
  grey = np.repeat(np.repeat(grey, factor, axis=1), factor, axis=2)
  images = np.repeat(grey[..., None], channels, axis=3)
  return np.ascontiguousarray(images), np.asarray(bunch.target, np.int32)


def load_digits(size: int = 32, channels: int = 3, num_val: int = 180, num_test: int = 360,
                seed: int = 0) -> splits.VisionData:
  """The bundled digits split into train/validation/test, like `load_cifar`.

  Args:
    size: image height and width, a multiple of 8 (see `digits_images`).
    channels: 1 or 3.
    num_val: validation images (default 10%).
    num_test: test images (default 20%), held out first.
    seed: seed of both splits.

  Returns:
    A `VisionData` with class names ``"0"`` ... ``"9"``; mean/std from the training split.

  Raises:
    ValueError: if a size or split argument is out of range.
  """
  if not 0 < num_test < NUM_DIGITS:
    raise ValueError(f"num_test must be in (0, {NUM_DIGITS}), got {num_test}")
  images, labels = digits_images(size, channels)
  rest, test = splits.split_indices(NUM_DIGITS, num_test, seed)
  return splits.make_vision_data(images[rest], labels[rest], images[test], labels[test],
                                 num_classes=10, class_names=tuple(str(d) for d in range(10)),
                                 num_val=num_val, seed=seed)
