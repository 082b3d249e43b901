"""Packed export: b-bit integer codes + scales (+ a bitmask of non-zeros), and its exact size.

Byte accounting (`nbytes`): the sum of the ``nbytes`` of every stored array (codes, scales,
zero points, bitmasks, float values) plus a fixed header per tensor of `header_bytes` = 8 bytes
(kind, bits, channel axis, flags, rank, reserved) and 4 bytes per dimension. Parameter names and the tree structure are not counted (every format,
float32 included, needs them alike).
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from compressjax import selection
from compressjax.quantization import quantizers
from compressjax.quantization import wrapper

Where = selection.Where


class PackedTensor(NamedTuple):
  """One quantized tensor.

  Attributes:
    codes: uint8 payload: the codes ``q - qmin`` packed ``bits`` per value, MSB first (int8:
      one byte each; int4: two per byte), for every value, or only the non-zeros if ``mask``
      is non-empty.
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
  """An exported parameter tree: `PackedTensor` for quantized leaves, `SparseTensor` for
  float leaves with enough zeros, numpy arrays otherwise."""
  tree: Any


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


def _pack_leaf(x, spec: quantizers.Spec) -> PackedTensor:
  codes, grid = _codes(x, spec)
  codes = np.asarray(codes).astype(np.int64)
  shape = tuple(np.shape(x))
  axis = None if spec.granularity == "tensor" else spec.axis % len(shape)
  zp_b = np.broadcast_to(np.asarray(grid.zero_point, np.int64), shape)
  nonzero = codes != zp_b
  n, nnz = codes.size, int(nonzero.sum())
  sparse = -(-n // 8) + -(-nnz * spec.bits // 8) < -(-n * spec.bits // 8)
  payload = codes[nonzero] if sparse else codes.ravel()
  zp_dtype = np.uint8 if spec.bits <= 8 else np.uint16
  zp = np.asarray(grid.zero_point).reshape(-1 if axis is not None else ()).astype(zp_dtype)
  return PackedTensor(
      codes=pack_bits(payload - spec.qmin, spec.bits),
      scale=np.asarray(grid.scale, np.float32).reshape(-1 if axis is not None else ()),
      zero_point=np.zeros((0,), zp_dtype) if spec.symmetric else zp,
      mask=np.packbits(nonzero.ravel()) if sparse else np.zeros((0,), np.uint8),
      shape=shape, bits=spec.bits, symmetric=spec.symmetric, axis=axis,
      dtype=str(jnp.result_type(x)))


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


def export(params: Any, spec: quantizers.Spec | int | None = 8,
           where: Where | None = None) -> Packed:
  """Packs the leaves ``where`` selects as ``spec``-bit codes on their min/max grid.

  Each selected tensor is stored dense, or as a bitmask of non-zeros plus the non-zero codes
  when that is smaller (about ``1/8 + density * bits/8`` bytes per value). The other float
  leaves (and every leaf when ``spec`` is None: the float baseline of a pruned model) are
  stored as they are, or as a `SparseTensor` (bitmask + non-zero values) when that is smaller.
  Export the params of QAT (`wrap`) or `ptq` with the same spec: they are on this grid already,
  so nothing moves.

  Args:
    params: a parameter pytree (finite values).
    spec: a `Spec`; a bit width for a symmetric per-tensor one; None to store floats.
    where: predicate on the parameter path (default: Dense/Conv kernels).

  Returns:
    A `Packed` tree; `load` gives back ``fake_quant`` of the selected leaves, exactly, and the
    other leaves unchanged.

  Raises:
    ValueError: if a leaf is not finite (naming its path), ``where`` selects nothing, or the
      spec does not fit a selected leaf.
  """
  _check_finite(params)
  if spec is None:
    return Packed(jax.tree.map(_store_float, params))
  spec = quantizers.as_spec(spec)
  flags = wrapper.select_leaves(params, spec, where, "export")
  return Packed(jax.tree.map(lambda x, on: _pack_leaf(x, spec) if on else _store_float(x),
                             params, flags))


def _unpack_leaf(t: "PackedTensor | SparseTensor") -> np.ndarray:
  n = int(np.prod(t.shape))
  if isinstance(t, SparseTensor):
    out = np.zeros(n, t.values.dtype)
    out[np.unpackbits(t.mask, count=n).astype(bool)] = t.values
    return out.reshape(t.shape)
  qmin = -(2 ** (t.bits - 1) - 1) if t.symmetric else 0
  ch_shape = [1] * len(t.shape)
  if t.axis is not None:
    ch_shape[t.axis] = t.shape[t.axis]
  scale = np.broadcast_to(t.scale.astype(np.float32).reshape(ch_shape), t.shape)
  zp = np.zeros(t.scale.shape, np.float32) if t.symmetric else t.zero_point.astype(np.float32)
  zp = np.broadcast_to(zp.reshape(ch_shape), t.shape)
  if t.mask.size:
    nonzero = np.unpackbits(t.mask, count=n).astype(bool).reshape(t.shape)
    codes = zp.copy()
    vals = unpack_bits(t.codes, t.bits, int(nonzero.sum())).astype(np.float32) + qmin
    codes[nonzero] = vals
  else:
    codes = (unpack_bits(t.codes, t.bits, n).astype(np.float32) + qmin).reshape(t.shape)
  values = (codes - zp) * scale
  return np.asarray(jnp.asarray(values, jnp.float32).astype(t.dtype))


def load(packed: Packed) -> Any:
  """Restores params from `export`: the fake-quantized selected leaves, bit for bit."""
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
