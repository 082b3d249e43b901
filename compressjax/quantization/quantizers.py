"""Uniform affine quantizers: the spec, its grid methods, fake quantization with an STE.

A `Spec` fixes the integer grid. Symmetric specs use the narrow signed range
``q in [-(2^(b-1) - 1), 2^(b-1) - 1]`` with zero point 0 (the TFLite int8 weight spec and
TensorRT's choice): the grid is symmetric about zero, so ``-w`` is representable whenever ``w``
is, at the cost of one code (``-2^(b-1)``) of the two's-complement range. Asymmetric specs use
``q in [0, 2^b - 1]`` with an integer zero point, so 0.0 is exactly representable. In both,
``fake_quant(0) == 0`` exactly: pruned zeros stay zero.

A scale derived from a range is rounded to 20 significant bits (a relative change of at most
2^-20), and the ends of the range always take the end codes. Re-deriving the range from
quantized values then reproduces the scale and zero point bit for bit, so `fake_quant` is
idempotent: the QAT wrapper keeps params exactly on the grid, and ``load(export(p))`` equals
``fake_quant(p)`` exactly.

Grid methods. ``Spec.grid`` names how a tensor's grid is chosen: a registered range function
``method(x, spec, axes) -> (lo, hi)`` (`grids.GRIDS`, `grids.register_grid`); the grid is
``grid_from_range(lo, hi, spec)``. QAT (`wrap`), PTQ (`ptq`), activation quantization
(`calibrate`, dynamic `quantize_activations`), `fake_quant` and `export` all find grids with
`grid_range` (or `grid_of`), so a grid registered from outside the library is used by each.
Export sees only the weights, so a method must give back its grid from the values it quantized
(see `grids.register_grid`): ``"minmax"`` and ``"pow2"`` do by themselves; clipping methods
(``"percentile"``, ``"mse"``) do because their clipped ends take the end codes.

LSQ's learned step (module `lsq`) is a trained parameter, not a function of the tensor, so it
is not a registered grid (the `lsq` module says why); it enters as an explicit ``scale``.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from compressjax.quantization import grids

GRANULARITIES = ("tensor", "channel")


@dataclasses.dataclass(frozen=True, repr=False)
class Spec:
  """A uniform affine quantizer (frozen and hashable: usable as a jit static argument).

  Attributes:
    bits: bits per value, 2..16.
    symmetric: signed narrow range with zero point 0 if True, else unsigned with a zero point.
    granularity: ``"tensor"`` (one scale) or ``"channel"`` (one scale per index of ``axis``).
    axis: the channel axis for ``granularity="channel"`` (the output axis of Dense/Conv
      kernels is -1); checked against the rank when the spec is applied.
    grid: the name of the grid method in `grids.GRIDS` (``"minmax"``, ``"percentile"``,
      ``"mse"``, ``"pow2"`` or one added with `grids.register_grid`); resolved when used, so a
      spec read from a file can name a grid this process has not registered.
  """
  bits: int = 8
  symmetric: bool = True
  granularity: str = "tensor"
  axis: int = -1
  grid: str = "minmax"

  def __post_init__(self):
    if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
      raise ValueError(f"bits must be an int in [2, 16], got {self.bits!r}")
    if not isinstance(self.symmetric, bool):
      raise ValueError(f"symmetric must be a bool, got {self.symmetric!r}")
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
    if isinstance(self.axis, bool) or not isinstance(self.axis, int):
      raise ValueError(f"axis must be an int, got {self.axis!r}")
    if not isinstance(self.grid, str) or not self.grid:
      raise ValueError(f"grid must be a non-empty str naming a grid method, got {self.grid!r}")

  def __repr__(self) -> str:
    # The default grid is left out, so specs read as they did before grids had names.
    grid = "" if self.grid == "minmax" else f", grid={self.grid!r}"
    return (f"Spec(bits={self.bits}, symmetric={self.symmetric}, "
            f"granularity={self.granularity!r}, axis={self.axis}{grid})")

  @property
  def qmin(self) -> int:
    """Smallest integer code."""
    return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

  @property
  def qmax(self) -> int:
    """Largest integer code."""
    return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1

  def check(self, ndim: int, name: str = "x") -> None:
    """Raises ``ValueError`` if ``axis`` is out of range for a tensor of rank ``ndim``."""
    if self.granularity == "channel" and not -ndim <= self.axis < ndim:
      raise ValueError(f"axis must be in [{-ndim}, {ndim}) for {name} of rank {ndim}, "
                       f"got {self.axis}")


def as_spec(spec: "Spec | int") -> Spec:
  """Accepts a `Spec` or a bit width (a symmetric per-tensor spec)."""
  if isinstance(spec, Spec):
    return spec
  if isinstance(spec, int) and not isinstance(spec, bool):
    return Spec(bits=spec)
  raise ValueError(f"spec must be a Spec or an int bit width, got {spec!r}")


PerPath = Callable[[str], "Spec | int | None"]
"""A per-path spec: the '/'-joined parameter path -> a `Spec`, a bit width, or None (that leaf
stays float). ``dict.get`` of a ``{path: spec}`` dict is one."""


def is_per_path(spec) -> bool:
  """True for a per-path spec (a callable), False for a `Spec`, a bit width or None."""
  return callable(spec) and not isinstance(spec, Spec)


def check_spec(spec: "Spec | int | PerPath", name: str = "spec") -> "Spec | PerPath":
  """Validates a spec argument at the boundary: a `Spec`, a bit width or a per-path spec.

  Returns:
    The `Spec` (a bit width becomes a symmetric per-tensor one), or the per-path callable
    unchanged (its results are checked leaf by leaf, by `spec_at`).
  """
  if is_per_path(spec):
    return spec
  if isinstance(spec, Spec) or (isinstance(spec, int) and not isinstance(spec, bool)):
    return as_spec(spec)
  raise ValueError(f"{name} must be a Spec, an int bit width or a function path -> Spec | int "
                   f"| None, got {spec!r}")


def spec_at(spec: "Spec | int | PerPath", path: str) -> "Spec | None":
  """The spec of the leaf at ``path``: ``spec`` itself, or ``spec(path)`` for a per-path spec.

  Args:
    spec: a `Spec`, a bit width, or a per-path spec (`PerPath`).
    path: the leaf's '/'-joined path.

  Returns:
    A `Spec`, or None when a per-path spec leaves the leaf float.

  Raises:
    ValueError: naming the path, if a per-path spec returns something else.
  """
  if not is_per_path(spec):
    return as_spec(spec)
  value = spec(path)
  if value is None:
    return None
  if isinstance(value, Spec) or (isinstance(value, int) and not isinstance(value, bool)):
    return as_spec(value)
  raise ValueError(f"spec({path!r}) must be a Spec, an int bit width or None, got {value!r}")


def reduce_axes(ndim: int, spec: Spec) -> tuple[int, ...]:
  """Axes a range is taken over: all of them per tensor, all but ``spec.axis`` per channel."""
  if spec.granularity == "tensor":
    return tuple(range(ndim))
  spec.check(ndim)
  keep = spec.axis % ndim
  return tuple(a for a in range(ndim) if a != keep)


class Grid(NamedTuple):
  """A quantization grid: step ``scale``, integer ``zero_point`` and the range it was fit to.

  ``lo <= 0 <= hi`` bound the clipping range; values at or beyond them take the end codes, so
  a range's extremes always land on the end codes (which makes `fake_quant` idempotent).
  """
  scale: chex.Array
  zero_point: chex.Array
  lo: chex.Array
  hi: chex.Array


def minmax_range(x: chex.Array, spec: Spec, axes: tuple[int, ...] | None = None):
  """Min and max of ``x`` over ``axes`` (default: per ``spec.granularity``), kept as dims."""
  x = jnp.asarray(x, jnp.float32)
  axes = reduce_axes(x.ndim, spec) if axes is None else axes
  return jnp.min(x, axes, keepdims=True), jnp.max(x, axes, keepdims=True)


grids.register_grid("minmax", minmax_range)  # the default; the others are in `calibration`


def _trim(s: chex.Array) -> chex.Array:
  """Rounds positive float32 ``s`` to nearest with 20 significant bits (relative change at most
  2^-20), by rounding away the low 4 bits of its bit pattern (a carry moves the exponent).

  A scale re-derived from quantized values is within a few ulps of the original; on this
  coarser lattice it rounds back to the same value, so re-quantizing is exact.
  """
  bits = jax.lax.bitcast_convert_type(jnp.asarray(s, jnp.float32), jnp.uint32)
  bits = (bits + jnp.uint32(0x8)) & jnp.uint32(0xFFFFFFF0)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def grid_from_range(lo: chex.Array, hi: chex.Array, spec: Spec) -> Grid:
  """The grid covering ``[lo, hi]``, widened to hold 0.

  Symmetric: ``s = max(|lo|, |hi|) / qmax``, ``z = 0``. Asymmetric: ``s = (hi - lo) / (2^b - 1)``
  and ``z = round(-lo / s)`` (Jacob et al. 2018, "Quantization and Training of Neural Networks
  for Efficient Integer-Arithmetic-Only Inference", eq. 1). An all-zero range gets ``s = 1``.

  Args:
    lo: lower ends of the range (any broadcastable shape).
    hi: upper ends of the range.
    spec: the quantizer.

  Returns:
    A `Grid` of float32 arrays of the broadcast shape of ``lo`` and ``hi``.
  """
  lo = jnp.minimum(jnp.asarray(lo, jnp.float32), 0.0)
  hi = jnp.maximum(jnp.asarray(hi, jnp.float32), 0.0)
  if spec.symmetric:
    amax = jnp.maximum(-lo, hi)
    s = _trim(amax / spec.qmax)
    s = jnp.where(s > 0, s, 1.0)
    return Grid(s, jnp.zeros_like(s), -amax, amax)
  s = _trim((hi - lo) / spec.qmax)
  s = jnp.where(s > 0, s, 1.0)
  z = jnp.clip(jnp.round(-lo / s), 0, spec.qmax)
  return Grid(s, z, lo, hi)


def grid_from_scale(scale: chex.Array, zero_point: chex.Array | None, spec: Spec) -> Grid:
  """The grid of a given step and zero point; its range is ``[(qmin - z) s, (qmax - z) s]``."""
  s = jnp.asarray(scale, jnp.float32)
  z = jnp.zeros_like(s) if zero_point is None else jnp.asarray(zero_point, jnp.float32)
  return Grid(s, z, (spec.qmin - z) * s, (spec.qmax - z) * s)


def to_codes(x: chex.Array, spec: Spec, grid: Grid) -> chex.Array:
  """Integer codes ``clip(round(x / s) + z, qmin, qmax)`` as float32 (exact integers).

  Values at or beyond the grid's range take the end codes.
  """
  x = jnp.asarray(x, jnp.float32)
  codes = jnp.clip(jnp.round(x / grid.scale) + grid.zero_point, spec.qmin, spec.qmax)
  span = grid.hi > grid.lo  # an all-zero range has no ends to pin
  codes = jnp.where(span & (x >= grid.hi), spec.qmax, codes)
  return jnp.where(span & (x <= grid.lo), spec.qmin, codes)


def from_codes(codes: chex.Array, grid: Grid) -> chex.Array:
  """Dequantizes: ``(q - z) * s`` in float32."""
  return (codes - grid.zero_point) * grid.scale


_HOLD_ULPS = 16  # as export's: QAT can leave an entry an ulp off its grid point


def _holds(x: chex.Array, grid: Grid, spec: Spec, axes: tuple[int, ...]) -> chex.Array:
  """Per group over ``axes``: does quantizing ``x`` on ``grid`` leave every value in place?"""
  moved = jnp.abs(from_codes(to_codes(x, spec, grid), grid) - x)
  return jnp.all(moved <= _HOLD_ULPS * jnp.spacing(jnp.abs(x)), axes, keepdims=True)


def grid_range(x: chex.Array, spec: Spec, axes: tuple[int, ...] | None = None):
  """The clipping range of ``x`` under ``spec.grid``'s method, over ``axes`` (kept as dims).

  For a clipping method (``clips=True`` in `grids.register_grid`) a range beyond the data
  (its grid's range beyond ``[min(x, 0), max(x, 0)]``; for symmetric specs, ``max|range|``
  beyond ``max|x|``) is cut back to the data's, and a group already on its own min/max grid
  keeps that grid: the values of a clipped grid, quantized again, stay where they are.

  Args:
    x: the values.
    spec: the quantizer; its ``grid`` names the method.
    axes: the axes a range is shared over (default: per ``spec.granularity``).

  Returns:
    ``(lo, hi)`` float32, kept as dims over ``axes``; ``grid_from_range(lo, hi, spec)`` is the
    grid.
  """
  method = grids.get_grid(spec.grid)
  x = jnp.asarray(x, jnp.float32)
  axes = reduce_axes(x.ndim, spec) if axes is None else tuple(axes)
  lo, hi = method(x, spec, axes)
  if spec.grid not in grids.CLIPPING_GRIDS:
    return lo, hi
  xlo, xhi = minmax_range(x, spec, axes)
  # Only a range reaching beyond the data is cut back (bit for bit unchanged otherwise).
  if spec.symmetric:
    amax = jnp.maximum(-xlo, xhi)
    beyond = jnp.maximum(-lo, hi) > amax
    lo, hi = jnp.where(beyond, -amax, lo), jnp.where(beyond, amax, hi)
  else:
    lo = jnp.where(jnp.minimum(lo, 0.0) < jnp.minimum(xlo, 0.0), xlo, lo)
    hi = jnp.where(jnp.maximum(hi, 0.0) > jnp.maximum(xhi, 0.0), xhi, hi)
  held = _holds(x, grid_from_range(xlo, xhi, spec), spec, axes)
  return jnp.where(held, xlo, lo), jnp.where(held, xhi, hi)


@functools.partial(jax.jit, static_argnums=(1,))
def grid_of(x: chex.Array, spec: Spec) -> Grid:
  """The grid of ``x`` under ``spec`` (per tensor, or per channel of ``spec.axis``): the
  min/max grid by default, else that of ``spec.grid``'s method (`grid_range`)."""
  return grid_from_range(*grid_range(x, spec), spec)


def spec_fields(spec: Spec) -> dict:
  """``spec`` as a JSON-ready dict; ``grid`` only when it is not ``"minmax"`` (so files of
  min/max specs are written as before grids had names)."""
  fields = dataclasses.asdict(spec)
  if fields["grid"] == "minmax":
    del fields["grid"]
  return fields


def _grid(x, spec, scale, zero_point, grid):
  if grid is not None:
    return grid
  if scale is None:
    if zero_point is not None:
      raise ValueError("zero_point must be None when scale is None, got an array")
    return grid_of(x, spec)
  return grid_from_scale(scale, zero_point, spec)


@functools.partial(jax.jit, static_argnums=(1,))
def quantize(x: chex.Array, spec: Spec, scale=None, zero_point=None, grid=None) -> chex.Array:
  """Rounds ``x`` onto the grid (forward only); same arguments as `fake_quant`."""
  g = _grid(x, spec, scale, zero_point, grid)
  return from_codes(to_codes(x, spec, g), g).astype(jnp.result_type(x))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _ste(x, grid, spec):
  return from_codes(to_codes(x, spec, grid), grid).astype(x.dtype)


def _ste_fwd(x, grid, spec):
  return _ste(x, grid, spec), (x, grid)


def _ste_bwd(spec, res, g):
  x, grid = res
  x = jnp.asarray(x, jnp.float32)
  half = 0.5 * grid.scale
  inside = (x >= grid.lo - half) & (x <= grid.hi + half)
  return jnp.where(inside, g, 0).astype(g.dtype), jax.tree.map(jnp.zeros_like, grid)


_ste.defvjp(_ste_fwd, _ste_bwd)


@functools.partial(jax.jit, static_argnums=(1,))
def fake_quant(x: chex.Array, spec: Spec, scale=None, zero_point=None,
               grid: Grid | None = None) -> chex.Array:
  """Fake quantization with the clipped straight-through gradient.

  The forward value is exactly `quantize`. The gradient is the identity for ``x`` within half a
  step of the clipping range ``[lo, hi]`` (where the only error is rounding, at most half a
  step) and zero beyond it, as PyTorch's FakeQuantize (Bengio et al. 2013, "Estimating or
  Propagating Gradients Through Stochastic Neurons"; Jacob et al. 2018). The grid is `grid_of`
  ``x`` (``spec.grid``'s method, by default the min/max of ``x``; per channel: over every axis
  but ``spec.axis``) unless ``scale`` (and for asymmetric specs ``zero_point``) or a ``grid``
  is given; the grid gets no gradient.

  Args:
    x: a float array.
    spec: the quantizer.
    scale: optional step size broadcastable to ``x``.
    zero_point: optional integer-valued zero point broadcastable to ``x`` (with ``scale``).
    grid: optional `Grid` (from `grid_from_range`), instead of ``scale``.

  Returns:
    The fake-quantized array, of ``x``'s shape and dtype.
  """
  x = jnp.asarray(x)
  g = jax.lax.stop_gradient(_grid(x, spec, scale, zero_point, grid))
  return _ste(x, g, spec)
