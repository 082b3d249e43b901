"""compressjax: compression transforms over Flax parameter pytrees, and their data.

Subpackages are imported lazily by name (``compressjax.pruning``, ...), so importing
the top level stays cheap.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "allocation",
    "channels",
    "console",
    "datasets",
    "distillation",
    "factorization",
    "lora",
    "models",
    "pruning",
    "quantization",
    "reporting",
    "selection",
    "stages",
    "studies",
    "training",
)


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_SUBMODULES))
