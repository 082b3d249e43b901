"""CIFAR-10 and CIFAR-100 from the official python-format archives, checked member by member.

The archives come from https://www.cs.toronto.edu/~kriz/cifar.html (Krizhevsky, "Learning
Multiple Layers of Features from Tiny Images", 2009): ``cifar-10-python.tar.gz`` holds
``cifar-10-batches-py/data_batch_1`` ... ``data_batch_5``, ``test_batch`` and
``batches.meta``; ``cifar-100-python.tar.gz`` holds ``cifar-100-python/train``, ``test`` and
``meta``. Each member is a pickled dict whose ``b"data"`` is uint8 ``[N, 3072]`` (1024 red,
then 1024 green, then 1024 blue values, each a row-major 32x32 plane) with ``b"labels"``
(CIFAR-10) or ``b"fine_labels"``/``b"coarse_labels"`` (CIFAR-100).

``path`` may be the archive itself, a directory holding it, or a directory holding its
extracted folder (as torchvision leaves it). Nothing is downloaded. Pickles are read with an
unpickler that only admits NumPy arrays and bytes, so a tampered archive cannot run code.
"""

import io
import os
import pickle
import tarfile
from typing import Any

import numpy as np

from compressjax.datasets import splits

_LAYOUTS = {
    # name: (archive file, folder, train members, test member, meta member, label key, classes)
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py",
                tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta",
                b"labels", b"label_names", 10),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", ("train",), "test", "meta",
                 b"fine_labels", b"fine_label_names", 100),
    "cifar100_coarse": ("cifar-100-python.tar.gz", "cifar-100-python", ("train",), "test",
                        "meta", b"coarse_labels", b"coarse_label_names", 20),
}
_SOURCE = "https://www.cs.toronto.edu/~kriz/cifar.html"
_ALLOWED = {("_codecs", "encode"), ("numpy", "ndarray"), ("numpy", "dtype"),
            ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
            ("numpy._core.numeric", "_frombuffer")}


class _SafeUnpickler(pickle.Unpickler):

  def find_class(self, module: str, name: str) -> Any:
    # The 2009 archives were pickled by Python 2 with the pre-2.0 NumPy module names.
    module = module.replace("numpy.core.", "numpy._core.")
    if (module, name) not in _ALLOWED:
      raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
    return super().find_class(module, name)


def _open_members(path: str, archive: str, folder: str, names: tuple[str, ...]) -> dict:
  """Reads ``folder/name`` for every name, from a tar archive or an extracted folder."""
  if os.path.isdir(path):
    if os.path.isdir(os.path.join(path, folder)):
      base = os.path.join(path, folder)
      missing = [n for n in names if not os.path.isfile(os.path.join(base, n))]
      if missing:
        raise ValueError(f"{base} lacks member(s) {missing} of the official layout")
      out = {}
      for n in names:
        with open(os.path.join(base, n), "rb") as f:
          out[n] = f.read()
      return out
    if not os.path.isfile(os.path.join(path, archive)):
      raise FileNotFoundError(
          f"neither {archive} nor its extracted folder {folder}/ is in directory {path}; "
          f"download {archive} (python version) from {_SOURCE}")
    path = os.path.join(path, archive)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"CIFAR archive not found at {path}; download {archive} "
                            f"(python version) from {_SOURCE}")
  try:
    tar = tarfile.open(path, "r:*")
  except tarfile.TarError as e:
    raise ValueError(f"{path} is not a readable tar archive ({e}); expected {archive}") from e
  with tar:
    present = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}
    missing = [f"{folder}/{n}" for n in names if f"{folder}/{n}" not in present]
    if missing:
      shown = sorted(present)[:10]
      raise ValueError(f"{path} lacks member(s) {missing}; it holds {shown}")
    return {n: tar.extractfile(present[f"{folder}/{n}"]).read() for n in names}


def _unpickle(raw: bytes, member: str) -> dict:
  try:
    obj = _SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"member {member} is not a CIFAR python pickle: {e}") from e
  if not isinstance(obj, dict):
    raise ValueError(f"member {member} must hold a dict, got {type(obj).__name__}")
  return obj


def _images_labels(batch: dict, member: str, label_key: bytes,
                   num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  for key in (b"data", label_key):
    if key not in batch:
      raise ValueError(f"member {member} lacks key {key!r}; it has {sorted(batch)}")
  data = np.asarray(batch[b"data"])
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
    raise ValueError(f"member {member}: b'data' must be uint8 [N, 3072] (3x32x32 images), "
                     f"got {data.dtype} {data.shape}")
  labels = np.asarray(batch[label_key])
  if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"member {member}: {label_key!r} must be {data.shape[0]} integers (one "
                     f"per image), got {labels.dtype} {labels.shape}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"member {member}: {label_key!r} must be in [0, {num_classes}), got "
                     f"range [{labels.min()}, {labels.max()}]")
  # Channel planes to NHWC: [N, 3, 32, 32] -> [N, 32, 32, 3].
  return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int32)


def read_cifar(path: str, name: str = "cifar10") -> tuple[np.ndarray, ...]:
  """Reads and checks an official CIFAR python-format archive.

  Args:
    path: the archive file, a directory holding it, or a directory holding its extracted
      folder (``cifar-10-batches-py`` / ``cifar-100-python``).
    name: ``"cifar10"``, ``"cifar100"`` (100 fine labels) or ``"cifar100_coarse"`` (20
      superclasses).

  Returns:
    ``(train_images, train_labels, test_images, test_labels, class_names)``: uint8 NHWC
    images, int32 labels, and a tuple of class-name strings.

  Raises:
    FileNotFoundError: if the archive is not at ``path``.
    ValueError: if ``name`` is unknown, or a member, key, shape, dtype or label range differs
      from the official format (the message names which).
  """
  if name not in _LAYOUTS:
    raise ValueError(f"name must be one of {sorted(_LAYOUTS)}, got {name!r}")
  archive, folder, train, test, meta, label_key, names_key, classes = _LAYOUTS[name]
  raw = _open_members(os.fspath(path), archive, folder, train + (test, meta))
  meta_dict = _unpickle(raw[meta], meta)
  if names_key not in meta_dict or len(meta_dict[names_key]) != classes:
    raise ValueError(f"member {meta} must hold {names_key!r} with {classes} class names")
  class_names = tuple(n.decode() if isinstance(n, bytes) else str(n)
                      for n in meta_dict[names_key])
  parts = [_images_labels(_unpickle(raw[m], m), m, label_key, classes) for m in train]
  test_images, test_labels = _images_labels(_unpickle(raw[test], test), test, label_key,
                                            classes)
  return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
          test_images, test_labels, class_names)


def load_cifar(path: str, name: str = "cifar10", num_val: int = 5000,
               seed: int = 0) -> splits.VisionData:
  """Loads CIFAR-10/100 with a seeded train/validation split of the official training set.

  Args:
    path: where the archive is (see `read_cifar`).
    name: ``"cifar10"``, ``"cifar100"`` or ``"cifar100_coarse"``.
    num_val: validation images taken from the 50,000 training images.
    seed: seed of the split (see `compressjax.datasets.splits.split_indices`).

  Returns:
    A `VisionData` of uint8 32x32x3 images; mean/std from the training split.
  """
  train_x, train_y, test_x, test_y, class_names = read_cifar(path, name)
  return splits.make_vision_data(train_x, train_y, test_x, test_y,
                                 num_classes=len(class_names), class_names=class_names,
                                 num_val=num_val, seed=seed)
