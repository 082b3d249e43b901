"""Image sets by name, for configs: ``load_dataset(config.dataset, config.data_dir)``."""

import functools
from typing import Callable

from compressjax.datasets import cifar
from compressjax.datasets import digits
from compressjax.datasets import splits

# Loaders take (data_dir, seed) and return a VisionData; digits ignores data_dir.
DATASETS: dict[str, Callable[..., splits.VisionData]] = {
    "digits": lambda data_dir, seed, **kw: digits.load_digits(seed=seed, **kw),
    "cifar10": functools.partial(cifar.load_cifar, name="cifar10"),
    "cifar100": functools.partial(cifar.load_cifar, name="cifar100"),
    "cifar100_coarse": functools.partial(cifar.load_cifar, name="cifar100_coarse"),
}


def load_dataset(name: str, data_dir: str | None = None, seed: int = 0,
                 **kwargs) -> splits.VisionData:
  """Loads an image set by name.

  Args:
    name: a key of `DATASETS`: ``"digits"`` (bundled with scikit-learn, no download),
      ``"cifar10"``, ``"cifar100"`` or ``"cifar100_coarse"``.
    data_dir: where the CIFAR archive is (the file, or a directory holding it or its
      extracted folder); unused by ``"digits"``.
    seed: seed of the train/validation split.
    **kwargs: passed to the loader (``num_val``; for digits also ``size``, ``channels``,
      ``num_test``).

  Returns:
    A `VisionData`.

  Raises:
    ValueError: if ``name`` is unknown, or a CIFAR set is asked for without ``data_dir``.
  """
  if name not in DATASETS:
    raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
  if name != "digits" and not data_dir:
    raise ValueError(f"data_dir must name the {name} archive's location, got {data_dir!r}; "
                     f"see https://www.cs.toronto.edu/~kriz/cifar.html")
  return DATASETS[name](data_dir, seed=seed, **kwargs)
