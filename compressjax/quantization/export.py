"""Packed export: b-bit integer codes + scales (+ a bitmask of non-zeros), and its exact size.

Byte accounting (`nbytes`): the sum of the ``nbytes`` of every stored array (codes, scales,
zero points, bitmasks, float values) plus a fixed header per tensor of `header_bytes` = 8 bytes
(kind, bits, channel axis, flags, rank, reserved) and 4 bytes per dimension. Parameter names and the tree structure are not counted (every format,
float32 included, needs them alike).
"""

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from compressjax import selection
from compressjax.quantization import grids
from compressjax.quantization import quantizers
from compressjax.quantization import wrapper

Where = selection.Where


class PackedTensor(NamedTuple):
  """One quantized tensor.

  Attributes:
    codes: uint8 payload (`codes_of` reads it, `with_codes` writes it). Dense: the codes
      ``q - qmin`` of every value packed ``bits`` each, MSB first (int8: one byte each;
      int4: two per byte). With a ``mask``: only the non-zeros' codes, in C order; for a
      symmetric 2-bit grid, whose non-zero levels are -1 and +1, one bit each (0: -1, 1:
      +1), since the mask holds the zeros (`code_bits`, `skips_zero`).
    scale: float32 steps, ``[C]`` per channel or ``[]`` per tensor.
    zero_point: integer zero points (uint8, or uint16 above 8 bits), shaped as ``scale``;
      empty for symmetric specs.
    mask: ``np.packbits`` of ``value != 0`` in C order, or empty when stored dense.
    shape: the tensor's shape.
    bits: bits per code.
    symmetric: the spec's ``symmetric``.
    axis: the channel axis (non-negative), or None per tensor.
    dtype: the dtype ``load`` restores.
  """
  codes: np.ndarray
  scale: np.ndarray
  zero_point: np.ndarray
  mask: np.ndarray
  shape: tuple[int, ...]
  bits: int
  symmetric: bool
  axis: int | None
  dtype: str


class SparseTensor(NamedTuple):
  """A float tensor stored as a bitmask of non-zeros plus the non-zero values.

  Attributes:
    values: the non-zero values in C order, in the tensor's dtype.
    mask: ``np.packbits`` of ``value != 0`` in C order.
    shape: the tensor's shape.
  """
  values: np.ndarray
  mask: np.ndarray
  shape: tuple[int, ...]


class Packed(NamedTuple):
  """An exported parameter tree and the spec it was made with.

  Attributes:
    tree: `PackedTensor` for quantized leaves, `SparseTensor` for float leaves with enough
      zeros, numpy arrays otherwise.
    spec: the `Spec` of the quantized leaves; for an export with a per-path spec, a dict
      from each quantized leaf's '/'-joined path to its own `Spec`; None for a float export.
      (`load` needs none of it: each `PackedTensor` carries its bits, symmetry and axis.)
  """
  tree: Any
  spec: "quantizers.Spec | dict[str, quantizers.Spec] | None" = None


def _is_packed(x) -> bool:
  return isinstance(x, (PackedTensor, SparseTensor))


def _check_bits(bits: int) -> None:
  if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
    raise ValueError(f"bits must be an int in [1, 16], got {bits!r}")


def pack_bits(indices: Any, bits: int) -> np.ndarray:
  """Packs non-negative integers below ``2^bits`` into bytes, ``bits`` each, MSB first.

  Args:
    indices: integer array (any shape; packed in C order).
    bits: bits per value, 1..16.

  Returns:
    A uint8 array of ``ceil(size * bits / 8)`` bytes.
  """
  _check_bits(bits)
  idx = np.asarray(indices).ravel()
  if idx.size and (not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0
                   or idx.max() >= 2 ** bits):
    raise ValueError(f"indices must be integers in [0, {2 ** bits}), got dtype {idx.dtype} "
                     f"with range [{idx.min()}, {idx.max()}]")
  if bits == 8:
    return idx.astype(np.uint8)
  shifts = np.arange(bits - 1, -1, -1, dtype=np.uint32)
  bitarr = (idx.astype(np.uint32)[:, None] >> shifts) & 1
  return np.packbits(bitarr.astype(np.uint8).ravel())


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
  """Inverse of `pack_bits`: the first ``count`` values, as uint8 (bits <= 8) or uint16."""
  _check_bits(bits)
  out_dtype = np.uint8 if bits <= 8 else np.uint16
  packed = np.asarray(packed, np.uint8)
  if bits == 8:
    return packed[:count].copy()
  bitarr = np.unpackbits(packed, count=count * bits).reshape(count, bits).astype(np.uint32)
  shifts = np.arange(bits - 1, -1, -1, dtype=np.uint32)
  return (bitarr << shifts).sum(axis=1).astype(out_dtype)


def code_bits(bits: int, symmetric: bool, masked: bool) -> int:
  """Bits per stored code of a `PackedTensor`.

  Dense, ``bits``. With a mask the zero level is never stored (the mask says where the
  zeros are), so each code needs only to tell the other ``levels - 1`` levels apart:
  ``ceil(log2(levels - 1))`` bits. That saves a bit only for a symmetric 2-bit grid (levels
  {-1, 0, +1}: its non-zeros are a sign bit), whose codes then skip the zero level; every
  other grid keeps ``bits`` and the codes ``q - qmin``.
  """
  if not masked:
    return bits
  levels = 2 ** bits - 1 if symmetric else 2 ** bits
  return math.ceil(math.log2(levels - 1))


def skips_zero(t: "PackedTensor") -> bool:
  """Whether ``t``'s stored codes skip the zero level (`code_bits` below its ``bits``)."""
  return code_bits(t.bits, t.symmetric, bool(t.mask.size)) < t.bits


def _qmin(t: "PackedTensor") -> int:
  """The lowest integer level of ``t``'s grid (``-qmin`` is zero's code when symmetric)."""
  return -(2 ** (t.bits - 1) - 1) if t.symmetric else 0


def _mask_of(t: "PackedTensor") -> np.ndarray | None:
  """The bool mask of ``t``'s non-zeros (its shape), or None when ``t`` is stored dense."""
  if not t.mask.size:
    return None
  n = int(np.prod(t.shape))
  return np.unpackbits(t.mask, count=n).astype(bool).reshape(t.shape)


def codes_of(t: "PackedTensor") -> np.ndarray:
  """The int64 codes ``q - qmin`` of ``t``'s stored values (every value, or the non-zeros in
  C order when it has a mask), whatever their packed layout."""
  nonzero = _mask_of(t)
  count = int(np.prod(t.shape)) if nonzero is None else int(nonzero.sum())
  if not skips_zero(t):
    return unpack_bits(t.codes, t.bits, count).astype(np.int64)
  idx = unpack_bits(t.codes, code_bits(t.bits, t.symmetric, True), count).astype(np.int64)
  return idx + (idx >= -_qmin(t))  # the index skips the zero level


def with_codes(t: "PackedTensor", codes: Any) -> "PackedTensor":
  """``t`` with its stored values' codes ``q - qmin`` replaced by ``codes`` (`codes_of`'s
  layout), packed as `PackedTensor.codes` lays them out.

  Raises:
    ValueError: if a masked tensor's codes include its zero level, or are out of range.
  """
  codes = np.asarray(codes, np.int64).ravel()
  if not skips_zero(t):
    return t._replace(codes=pack_bits(codes, t.bits))
  zero, count = -_qmin(t), int(_mask_of(t).sum())
  if codes.size != count or np.any(codes == zero):
    raise ValueError(f"codes must be the {count} non-zero codes of a masked tensor (none at "
                     f"its zero level {zero}), got {codes.size} values")
  return t._replace(codes=pack_bits(codes - (codes > zero),
                                    code_bits(t.bits, t.symmetric, True)))


def header_bytes(ndim: int) -> int:
  """The fixed per-tensor header counted by `nbytes`: 8 bytes + 4 per dimension."""
  return 8 + 4 * ndim


def _check_finite(params: Any) -> None:
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    a = np.asarray(x)
    if np.issubdtype(a.dtype, np.inexact) and not np.all(np.isfinite(a.astype(np.float32))):
      raise ValueError(f"params must be finite to export; leaf {selection.path_str(path)} has "
                       f"{int(np.sum(~np.isfinite(a.astype(np.float32))))} non-finite values")


@functools.partial(jax.jit, static_argnums=(1,))
def _codes(x, spec: quantizers.Spec):
  grid = quantizers.grid_of(x, spec)
  return quantizers.to_codes(x, spec, grid), grid


# A value "stays" under re-quantization if it moves by at most this many float32 ulps: QAT
# can leave an entry one ulp off its grid point (see `wrapper.exact_delta`), and a scale
# re-derived for another bit width moves range ends by a few ulps; a real re-grid moves
# values by a good fraction of a step, thousands of ulps.
_STAY_ULPS = 16
_SCREEN_SAMPLES = 512


def _stays(x: np.ndarray, y: np.ndarray) -> bool:
  x = x.astype(np.float32)
  return bool(np.all(np.abs(y.astype(np.float32) - x) <= _STAY_ULPS * np.spacing(np.abs(x))))


def _candidate_groupings(shape: tuple[int, ...]):
  """(granularity, axis) pairs worth testing: per tensor, then per channel of each axis
  (last first) whose channels hold at least two values."""
  yield "tensor", -1
  n = int(np.prod(shape))
  for ax in range(len(shape) - 1, -1, -1):
    if shape[ax] > 1 and n // shape[ax] >= 2:
      yield "channel", ax - len(shape)


def detect_spec(x: Any) -> quantizers.Spec | None:
  """The `Spec` (fewest bits first) whose min/max grid already holds ``x``, or None.

  Weights from QAT (`wrap`) or `ptq` sit on such a grid, with their range ends on the end
  codes. Each (granularity, axis, symmetric, bits) is screened on up to 512 sampled values
  (are ``x / step`` integers, to a tolerance?) and a candidate that passes is confirmed on
  the whole tensor with `quantizers.quantize` (every value moves by at most 16 ulps).

  Args:
    x: an array; only float32/float64 arrays with at least two values are examined (float16
      and bfloat16 round a grid too coarsely to tell it apart).

  Returns:
    The first matching `Spec` (fewest bits first, then per tensor before per channel, then
    symmetric before asymmetric; a channel axis counted from the end, e.g. -1), or None.
  """
  a = np.asarray(x)
  if a.dtype not in (np.float32, np.float64) or a.size < 2 or not np.all(np.isfinite(a)):
    return None
  a64 = a.astype(np.float64)
  pick = np.unique(np.linspace(0, a.size - 1, min(a.size, _SCREEN_SAMPLES)).astype(np.int64))
  xs = a64.ravel()[pick]
  bits = np.arange(2, 17)
  passed = []  # (bits, grouping rank, asymmetric, spec) of the candidates the screen keeps
  for rank, (granularity, axis) in enumerate(_candidate_groupings(a.shape)):
    axes = quantizers.reduce_axes(a.ndim, quantizers.Spec(8, True, granularity, axis))
    lo = np.minimum(np.min(a64, axes, keepdims=True), 0.0)
    hi = np.maximum(np.max(a64, axes, keepdims=True), 0.0)
    lo = np.broadcast_to(lo, a.shape).ravel()[pick]
    hi = np.broadcast_to(hi, a.shape).ravel()[pick]
    for symmetric in (True, False):
      qmax = (2.0 ** (bits - 1) - 1) if symmetric else (2.0 ** bits - 1)
      span = np.maximum(-lo, hi) if symmetric else hi - lo
      base = xs if symmetric else xs - lo
      frac = np.divide(base, span, out=np.zeros_like(base), where=span > 0)
      r = frac[None, :] * qmax[:, None]
      tol = 1e-3 + qmax * 2.0 ** -19  # float32 steps and the 20-bit scale rounding
      for b in bits[np.all(np.abs(r - np.round(r)) <= tol[:, None], axis=1)]:
        passed.append((int(b), rank, not symmetric,
                       quantizers.Spec(int(b), symmetric, granularity, axis)))
  # Fewest levels first: a coarse grid can lie inside a finer one (4-bit asymmetric inside
  # 8-bit asymmetric, as 255 = 15 * 17), and the coarse one is how the weights were made.
  for *_, spec in sorted(passed, key=lambda c: c[:3]):
    if _stays(a, np.asarray(quantizers.quantize(a, spec))):
      return spec
  return None


def _most_levels(a: np.ndarray, spec: quantizers.Spec) -> int:
  """The most distinct values in one tensor or channel of ``a`` (as ``spec`` groups them)."""
  keep = [d for d in range(a.ndim) if d not in quantizers.reduce_axes(a.ndim, spec)]
  groups = np.sort(np.moveaxis(a, keep, range(len(keep))).reshape(
      int(np.prod([a.shape[d] for d in keep])), -1), axis=1)
  return int((np.diff(groups, axis=1) != 0).sum(1).max()) + 1


def _held_by(a: np.ndarray, spec: quantizers.Spec) -> quantizers.Spec | None:
  """A spec whose grid already holds ``a``: a min/max one (`detect_spec`), or ``spec`` with
  another registered grid method, or None.

  Values quantized on a clipping grid lie on their own min/max grid, which `detect_spec`
  finds; the other methods (``"pow2"``, ``clips=False`` ones) are tried at ``spec``'s bits.
  """
  found = detect_spec(a)
  if found is not None:
    return found
  # Float weights have far more distinct values than a grid has levels: nothing to look for.
  if a.size < 2 or _most_levels(a, spec) > 2 * 2 ** spec.bits:
    return None
  for name in grids.GRIDS:
    if name in (spec.grid, "minmax") or name in grids.CLIPPING_GRIDS:
      continue
    other = dataclasses.replace(spec, grid=name)
    try:
      values = np.asarray(quantizers.quantize(a, other))
    except ValueError:  # a method that does not take this spec (pow2, asymmetric)
      continue
    if _stays(a, values):
      return other
  return None


def _check_not_regridded(path: str, x: Any, values: np.ndarray, spec: quantizers.Spec) -> None:
  """Raises if export moves ``x`` (dequantized ``values``) off the grid it already sits on."""
  a = np.asarray(x)
  if a.dtype not in (np.float32, np.float64) or _stays(a, values):
    return
  found = _held_by(a, spec)
  if found is not None:
    raise ValueError(
        f"export: leaf {path} is already on the grid of {found}, and export with spec={spec} "
        f"would re-quantize it (moving its values); export with spec={found}, the spec it was "
        f"trained or calibrated with, or pass regrid=True to re-quantize on purpose")


def _pack_leaf(x, spec: quantizers.Spec, path: str = "", regrid: bool = True) -> PackedTensor:
  codes, grid = _codes(x, spec)
  if not regrid:
    _check_not_regridded(path, x, np.asarray(quantizers.from_codes(codes, grid)), spec)
  codes = np.asarray(codes).astype(np.int64)
  shape = tuple(np.shape(x))
  axis = None if spec.granularity == "tensor" else spec.axis % len(shape)
  zp_b = np.broadcast_to(np.asarray(grid.zero_point, np.int64), shape)
  nonzero = codes != zp_b
  n, nnz = codes.size, int(nonzero.sum())
  masked_bits = code_bits(spec.bits, spec.symmetric, True)
  sparse = -(-n // 8) + -(-nnz * masked_bits // 8) < -(-n * spec.bits // 8)
  payload = codes[nonzero] if sparse else codes.ravel()
  zp_dtype = np.uint8 if spec.bits <= 8 else np.uint16
  zp = np.asarray(grid.zero_point).reshape(-1 if axis is not None else ()).astype(zp_dtype)
  t = PackedTensor(
      codes=np.zeros((0,), np.uint8),
      scale=np.asarray(grid.scale, np.float32).reshape(-1 if axis is not None else ()),
      zero_point=np.zeros((0,), zp_dtype) if spec.symmetric else zp,
      mask=np.packbits(nonzero.ravel()) if sparse else np.zeros((0,), np.uint8),
      shape=shape, bits=spec.bits, symmetric=spec.symmetric, axis=axis,
      dtype=str(jnp.result_type(x)))
  return with_codes(t, payload - spec.qmin)


def _store_float(x) -> "np.ndarray | SparseTensor":
  """A float leaf as it is, or as a `SparseTensor` when that is smaller."""
  a = np.asarray(x)
  if a.ndim == 0 or not np.issubdtype(a.dtype, np.inexact):
    return a
  nonzero = a != 0
  nnz = int(nonzero.sum())
  if -(-a.size // 8) + nnz * a.itemsize >= a.nbytes:
    return a
  return SparseTensor(a[nonzero], np.packbits(nonzero.ravel()), a.shape)


def export(params: Any, spec: "quantizers.Spec | int | quantizers.PerPath | None" = 8,
           where: Where | None = None, regrid: bool = False) -> Packed:
  """Packs the leaves ``where`` selects as ``spec``-bit codes on their grid (``spec.grid``).

  Each selected tensor is stored dense, or as a bitmask of non-zeros plus the non-zero codes
  when that is smaller (about ``1/8 + density * bits/8`` bytes per value; the non-zeros of a
  symmetric 2-bit grid are -1 or +1, stored as one bit each: `code_bits`). The other float
  leaves (and every leaf when ``spec`` is None: the float baseline of a pruned model) are
  stored as they are, or as a `SparseTensor` (bitmask + non-zero values) when that is smaller.

  One grid: export the params of QAT (`wrap`) or `ptq` with the spec they were made with, grid
  method included; they are on its grid already (`quantizers.grid_of` finds it again from
  them), so nothing moves. Float weights on no grid are quantized here (post-training
  quantization at export). Weights already on the grid of another spec (a min/max one found
  by `detect_spec`, or ``spec`` with another registered grid method; float32/float64 leaves)
  are never silently re-quantized: export raises, naming the leaf and the spec it is on,
  unless ``regrid=True`` asks for it.

  Per-layer precision: a per-path spec (``path -> Spec | int | None``, as `wrap` takes) packs
  each selected leaf with its own spec (mixed bits and granularities in one tree) and stores
  a leaf given None as a float leaf. Each leaf is packed alone, so `nbytes` of the export is
  the sum of the `nbytes` of each leaf exported by itself.

  Args:
    params: a parameter pytree (finite values).
    spec: a `Spec`; a bit width for a symmetric per-tensor min/max one; a per-path spec
      (`quantizers.PerPath`); None to store floats.
    where: predicate on the parameter path (default: Dense/Conv kernels).
    regrid: allow moving selected leaves that are already on another spec's grid onto
      ``spec``'s grid (lossy); default False raises instead.

  Returns:
    A `Packed` tree carrying ``spec`` (for a per-path spec, the dict of each quantized leaf's
    spec by path); `load` gives back ``fake_quant`` of each quantized leaf under its spec,
    exactly, and the other leaves unchanged.

  Raises:
    ValueError: if a leaf is not finite (naming its path), ``where`` selects nothing (or a
      per-path spec gives every selected leaf None), a spec (its grid method included) does
      not fit a quantized leaf, or (``regrid=False``) a quantized leaf is already on the grid
      of another spec.
  """
  _check_finite(params)
  if spec is None:
    return Packed(jax.tree.map(_store_float, params))
  spec = quantizers.check_spec(spec)
  if not isinstance(regrid, bool):
    raise ValueError(f"regrid must be True or False, got {regrid!r}")
  specs = wrapper.leaf_specs(params, spec, where, "export")
  tree = jax.tree_util.tree_map_with_path(
      lambda path, x, s: _store_float(x) if s is None
      else _pack_leaf(x, s, selection.path_str(path), regrid), params, specs)
  if quantizers.is_per_path(spec):
    spec = {selection.path_str(path): s
            for path, s in jax.tree_util.tree_leaves_with_path(specs) if s is not None}
  return Packed(tree, spec)


def _unpack_leaf(t: "PackedTensor | SparseTensor") -> np.ndarray:
  n = int(np.prod(t.shape))
  if isinstance(t, SparseTensor):
    out = np.zeros(n, t.values.dtype)
    out[np.unpackbits(t.mask, count=n).astype(bool)] = t.values
    return out.reshape(t.shape)
  ch_shape = [1] * len(t.shape)
  if t.axis is not None:
    ch_shape[t.axis] = t.shape[t.axis]
  scale = np.broadcast_to(t.scale.astype(np.float32).reshape(ch_shape), t.shape)
  zp = np.zeros(t.scale.shape, np.float32) if t.symmetric else t.zero_point.astype(np.float32)
  zp = np.broadcast_to(zp.reshape(ch_shape), t.shape)
  codes = codes_of(t).astype(np.float32) + _qmin(t)
  nonzero = _mask_of(t)
  if nonzero is not None:  # the zeros sit at the zero point
    codes, stored = zp.copy(), codes
    codes[nonzero] = stored
  values = (codes.reshape(t.shape) - zp) * scale
  return np.asarray(jnp.asarray(values, jnp.float32).astype(t.dtype))


def load(packed: Packed) -> Any:
  """Restores params from `export`: the fake-quantized selected leaves, bit for bit (each
  leaf from its own bits, symmetry, axis and scales, so mixed-precision trees load exactly)."""
  return jax.tree.map(lambda t: _unpack_leaf(t) if _is_packed(t) else t, packed.tree,
                      is_leaf=_is_packed)


def cast(params: Any, dtype: Any = jnp.bfloat16, where: Where | None = None) -> Any:
  """The float16/bfloat16 baseline: casts floating leaves (those ``where`` selects if given)."""
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"dtype must be a floating dtype, got {dtype}")
  flags = (jax.tree.map(lambda _: True, params) if where is None
           else selection.select(params, where))
  return jax.tree.map(
      lambda x, on: jnp.asarray(x).astype(dtype)
      if on and jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, params, flags)


def nbytes(packed: Any) -> int:
  """Serialized size in bytes of a `Packed` export or of any tree of arrays (see module doc)."""
  tree = packed.tree if isinstance(packed, Packed) else packed
  total = 0
  for leaf in jax.tree.leaves(tree, is_leaf=_is_packed):
    if isinstance(leaf, PackedTensor):
      arrays = (leaf.codes, leaf.scale, leaf.zero_point, leaf.mask)
      total += sum(a.nbytes for a in arrays) + header_bytes(len(leaf.shape))
    elif isinstance(leaf, SparseTensor):
      total += leaf.values.nbytes + leaf.mask.nbytes + header_bytes(len(leaf.shape))
    else:
      total += int(np.asarray(leaf).nbytes) + header_bytes(np.ndim(leaf))
  return total
