"""The registry of grid methods: how ``Spec.grid`` names the way a tensor's grid is chosen.

A grid method is one small function ``method(x, spec, axes) -> (lo, hi)`` giving the clipping
range of ``x`` over ``axes``; the grid is ``quantizers.grid_from_range(lo, hi, spec)``.
`register_grid` adds one under a name, as pruning scores are named in `pruning.scores.SCORES`;
QAT, PTQ, activation quantization and export all look the name up here (through
`quantizers.grid_range`), so a method registered from outside the library reaches every one.
"""

from typing import Any, Callable

import jax

# ``method(x, spec, axes) -> (lo, hi)``: float32 ``x``, a `quantizers.Spec`, the axes a range is
# shared over; the range kept as dims over them.
RangeFn = Callable[[Any, Any, tuple[int, ...]], tuple[Any, Any]]

# Grid methods by name, in registration order: "minmax" (`quantizers`), then "percentile",
# "mse" and "pow2" (`calibration`); the package imports both.
GRIDS: dict[str, RangeFn] = {}
# The names registered with ``clips=True``.
CLIPPING_GRIDS: set[str] = set()


def register_grid(name: str, method: RangeFn, clips: bool = False,
                  overwrite: bool = False) -> RangeFn:
  """Adds a grid method, usable as ``Spec(grid=name)`` by QAT, PTQ, activations and export.

  Export sees only the weights, so a method must give back the grid it chose from the values
  it quantized onto it (``fake_quant`` is then idempotent and ``load(export(p)) == p``):

  - ``clips=False``: the method itself must do so (``"minmax"``; ``"pow2"``, whose scale is the
    smallest power of two holding the range). Its range is used as it is.
  - ``clips=True``: a clipping range, which may cut off the tails of ``x`` (``"percentile"``,
    ``"mse"``, a 3-sigma range). A range reaching beyond the data's ``[min, max]`` is cut back
    to it, so the clipped extremes take the end codes and the quantized values lie on their
    own min/max grid, the grid they were made on; `quantizers.grid_range` keeps that grid for
    values already on it.

  Args:
    name: the name ``Spec.grid`` uses.
    method: ``method(x, spec, axes) -> (lo, hi)``, ``x`` float32, the range over ``axes``
      kept as dims; traceable under ``jit`` (``spec`` and ``axes`` are static).
    clips: whether the range may be narrower than the data (see above).
    overwrite: replace a method already registered under ``name`` (and clear JAX's compile
      caches, which may hold traces of the old one).

  Returns:
    ``method``.

  Raises:
    ValueError: for a bad argument, or a name already registered without ``overwrite``.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"name must be a non-empty str, got {name!r}")
  if not callable(method):
    raise ValueError(f"method must be callable as method(x, spec, axes), got {method!r}")
  for field, value in (("clips", clips), ("overwrite", overwrite)):
    if not isinstance(value, bool):
      raise ValueError(f"{field} must be True or False, got {value!r}")
  if name in GRIDS:
    if not overwrite:
      raise ValueError(f"grid {name!r} is already registered (registered: {tuple(GRIDS)}); "
                       f"pass overwrite=True to replace it")
    jax.clear_caches()
  GRIDS[name] = method
  (CLIPPING_GRIDS.add if clips else CLIPPING_GRIDS.discard)(name)
  return method


def get_grid(name: str, field: str = "grid") -> RangeFn:
  """The registered method ``name``, or ``ValueError`` naming ``field`` and the registered names."""
  if not isinstance(name, str) or name not in GRIDS:
    raise ValueError(f"{field} must be one of {tuple(GRIDS)} (add others with "
                     f"quantization.register_grid), got {name!r}")
  return GRIDS[name]
