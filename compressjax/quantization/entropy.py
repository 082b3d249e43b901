"""Entropy-coded export: a `Packed` export as one byte string, its codes and masks ANS-coded.

The integer codes of each `PackedTensor` (its codes ``q - qmin``, `export.codes_of`, whatever
their packed layout) and the sparsity bitmasks (of `PackedTensor` and
`SparseTensor`) are entropy-coded with asymmetric numeral systems (Duda 2013, "Asymmetric
numeral systems"), through ``constriction`` (Bamler 2022, "Understanding Entropy Coding With
Asymmetric Numeral Systems (ANS): a Statistician's Perspective"): a static categorical model
per stream, its used symbols and their counts stored in front of it. This is the last stage of Deep
Compression (Han et al. 2016), which used Huffman codes: ANS comes within a few bytes of
``n * H / 8`` for ``n`` symbols of empirical entropy ``H`` bits, where Huffman loses up to a
bit per symbol. A stream that would not shrink is stored as it is (one mode byte more).
Masks are coded bit by bit or as bytes, whichever is smaller (bytes catch the patterns of
structured sparsity). Scales, zero points and float leaves are stored raw.

Layout: ``b"CJE1"``, a varint length and the zlib-compressed JSON of the tree structure,
names and per-leaf metadata (and the spec: ``"spec"``, or for a per-path export ``"specs"``,
each quantized leaf's spec by path), then one length-prefixed block per stored array, then the
CRC-32 of everything before it. `encoded_nbytes` is ``len(encode(packed))``: names and
structure included, which `export.nbytes` does not count.
"""

import json
import zlib
from collections.abc import Mapping

import constriction
import jax.numpy as jnp
import numpy as np

from compressjax.quantization import export as export_lib
from compressjax.quantization import quantizers

MAGIC = b"CJE1"
_RAW, _ANS, _CONSTANT = 0, 1, 2     # modes of a symbol stream
_BITS, _BYTES = 0, 1                # how a mask is coded
_KINDS = {"P": export_lib.PackedTensor, "S": export_lib.SparseTensor}


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
    n >>= 7
    if not n:
      return bytes(out)


class _Reader:
  """Reads a buffer front to back; running past its end raises ValueError."""

  def __init__(self, data: bytes):
    self.data, self.pos = data, 0

  def take(self, n: int) -> bytes:
    if n < 0 or self.pos + n > len(self.data):
      raise ValueError(f"needs {n} bytes at offset {self.pos}, has {len(self.data) - self.pos}")
    self.pos += n
    return self.data[self.pos - n:self.pos]

  def varint(self) -> int:
    n = shift = 0
    while True:
      byte = self.take(1)[0]
      n |= (byte & 0x7F) << shift
      shift += 7
      if not byte & 0x80:
        return n
      if shift > 63:
        raise ValueError("varint longer than 64 bits")

  def block(self) -> bytes:
    return self.take(self.varint())


def _model(freq: np.ndarray):
  # Both sides build it from the same integer counts, so they quantize it identically.
  return constriction.stream.model.Categorical(freq / freq.sum(), perfect=False)


def _symbol_set(used: np.ndarray) -> bytes:
  """The used symbols: gaps between them, or a bitmap over their range, whichever is shorter."""
  gaps = bytes([0]) + _varint(used.size) + b"".join(
      map(_varint, np.diff(used, prepend=0).tolist()))
  flags = np.zeros(int(used[-1] - used[0]) + 1, np.uint8)
  flags[used - used[0]] = 1
  bitmap = bytes([1]) + _varint(int(used[0])) + _varint(flags.size) + np.packbits(
      flags).tobytes()
  return min(gaps, bitmap, key=len)


def _read_symbol_set(r: _Reader) -> np.ndarray:
  kind = r.take(1)[0]
  if kind == 0:
    return np.cumsum([r.varint() for _ in range(r.varint())], dtype=np.int64)
  if kind == 1:
    lo, span = r.varint(), r.varint()
    flags = np.unpackbits(np.frombuffer(r.take(-(-span // 8)), np.uint8), count=span)
    return lo + np.flatnonzero(flags).astype(np.int64)
  raise ValueError(f"symbol set kind must be 0 or 1, got {kind}")


def _encode_symbols(symbols: np.ndarray, bits: int) -> bytes:
  """Codes integers in [0, 2^bits): ANS under their empirical distribution, or raw.

  The model's counts are stored exactly, or scaled to at most 127 (one byte each, for a
  small rate cost), whichever gives the shorter stream.
  """
  raw = bytes([_RAW]) + export_lib.pack_bits(symbols.astype(np.int64), bits).tobytes()
  if symbols.size == 0:
    return raw
  counts = np.bincount(symbols)
  used = np.flatnonzero(counts)
  if used.size == 1:
    return bytes([_CONSTANT]) + _varint(int(used[0]))
  index = np.zeros(counts.size, np.int32)
  index[used] = np.arange(used.size, dtype=np.int32)
  head = bytes([_ANS]) + _symbol_set(used)
  best, exact = raw, counts[used]
  for freq in {exact.max(): exact, 127: np.maximum(np.round(exact * 127 / exact.max()), 1)
               }.values():
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(index[symbols], _model(freq.astype(np.float64)))
    ans = head + b"".join(map(_varint, freq.astype(np.int64).tolist())) + (
        coder.get_compressed().astype("<u4").tobytes())
    best = min(best, ans, key=len)
  return best


def _decode_symbols(data: bytes, count: int, bits: int) -> np.ndarray:
  r = _Reader(data)
  mode = r.take(1)[0]
  if mode == _RAW:
    body = r.take(len(data) - 1)
    if len(body) != -(-count * bits // 8):
      raise ValueError(f"raw stream of {count} {bits}-bit codes has {len(body)} bytes")
    return export_lib.unpack_bits(np.frombuffer(body, np.uint8), bits, count).astype(np.int64)
  if mode == _CONSTANT:
    return np.full(count, r.varint(), np.int64)
  if mode != _ANS:
    raise ValueError(f"stream mode must be one of (0, 1, 2), got {mode}")
  used = _read_symbol_set(r)
  freq = np.array([r.varint() for _ in range(used.size)], np.float64)
  if used.size < 2 or used[-1] >= 2 ** bits or np.any(freq == 0):
    raise ValueError(f"symbol table does not fit {bits}-bit codes")
  words = r.take(len(data) - r.pos)
  if len(words) % 4:
    raise ValueError(f"ANS payload must be whole 32-bit words, got {len(words)} bytes")
  coder = constriction.stream.stack.AnsCoder(np.frombuffer(words, "<u4").astype(np.uint32))
  return used[coder.decode(_model(freq), count)]


def _encode_mask(mask: np.ndarray, n: int) -> bytes:
  """Codes a ``np.packbits`` mask of ``n`` values (empty: stored dense)."""
  if mask.size == 0:
    return b""
  if mask.size != -(-n // 8):
    raise ValueError(f"mask must hold {n} bits ({-(-n // 8)} bytes), got {mask.size} bytes")
  flags = np.unpackbits(mask, count=n)
  if not np.array_equal(np.packbits(flags), mask):
    raise ValueError("mask must be np.packbits of the flags (padding bits 0)")
  by_bit = bytes([_BITS]) + _encode_symbols(flags, 1)
  by_byte = bytes([_BYTES]) + _encode_symbols(mask, 8)
  return min(by_bit, by_byte, key=len)


def _decode_mask(data: bytes, n: int) -> np.ndarray:
  if not data:
    return np.zeros((0,), np.uint8)
  nbytes = -(-n // 8)
  if data[0] == _BITS:
    return np.packbits(_decode_symbols(data[1:], n, 1).astype(np.uint8))
  if data[0] == _BYTES:
    return _decode_symbols(data[1:], nbytes, 8).astype(np.uint8)
  raise ValueError(f"mask mode must be 0 or 1, got {data[0]}")


def _raw(a: np.ndarray) -> tuple[list, bytes]:
  a = np.ascontiguousarray(a).reshape(a.shape)  # ascontiguousarray makes 0-d arrays 1-d
  a = a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a
  return [a.dtype.name, list(a.shape)], a.tobytes()


def _unraw(meta: list, data: bytes) -> np.ndarray:
  dtype, shape = jnp.dtype(meta[0]), tuple(meta[1])
  if len(data) != int(np.prod(shape)) * dtype.itemsize:
    raise ValueError(f"array {meta} needs {int(np.prod(shape)) * dtype.itemsize} bytes, "
                     f"got {len(data)}")
  return np.frombuffer(data, dtype).reshape(shape).copy()


def _is_stored(x) -> bool:
  return isinstance(x, (export_lib.PackedTensor, export_lib.SparseTensor))


def _count(t) -> int:
  return int(np.prod(t.shape, dtype=np.int64))


def _encode_leaf(x, path: str, blocks: list) -> list:
  """Appends ``x``'s blocks; returns its JSON record ``[kind, meta, array metas]``."""
  if not _is_stored(x):
    meta, data = _raw(np.asarray(x))
    blocks.append(data)
    return ["A", meta]
  kind = "P" if isinstance(x, export_lib.PackedTensor) else "S"
  n, fields, arrays = _count(x), {}, {}
  blocks.append(_encode_mask(np.asarray(x.mask, np.uint8), n))
  if kind == "P":
    codes = export_lib.codes_of(x)  # q - qmin, whatever the packed layout
    try:
      same = np.array_equal(export_lib.with_codes(x, codes).codes, x.codes)
    except ValueError:
      same = False
    if not same:
      raise ValueError(f"codes of {path!r} must be {codes.size} {x.bits}-bit codes packed as "
                       f"export lays them out, got {x.codes.size} bytes")
    blocks.append(_encode_symbols(codes, x.bits))
  for name, value in x._asdict().items():
    if name in ("mask", "codes"):
      continue
    if isinstance(value, (np.ndarray, np.generic)):
      arrays[name], data = _raw(np.asarray(value))
      blocks.append(data)
    else:
      fields[name] = value
  return [kind, fields, arrays]


def _decode_leaf(rec: list, r: _Reader):
  if rec[0] == "A":
    return _unraw(rec[1], r.block())
  kind, fields, arrays = rec
  cls = _KINDS[kind]
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
  n = int(np.prod(fields["shape"], dtype=np.int64))
  mask = _decode_mask(r.block(), n)
  out = {"mask": mask, **fields}
  codes = None
  if kind == "P":
    count = n if mask.size == 0 else int(np.unpackbits(mask, count=n).sum())
    codes = _decode_symbols(r.block(), count, fields["bits"])
    out["codes"] = np.zeros((0,), np.uint8)
  out.update({k: _unraw(meta, r.block()) for k, meta in arrays.items()})
  leaf = cls(**{f: out[f] for f in cls._fields})
  return leaf if codes is None else export_lib.with_codes(leaf, codes)


def _structure(tree, path: str, leaves: list):
  """The JSON structure of ``tree``: dicts, lists, tuples and None; leaves by index."""
  if _is_stored(tree) or not isinstance(tree, (Mapping, list, tuple)) and tree is not None:
    leaves.append((path, tree))
    return len(leaves) - 1
  if tree is None:
    return {"n": 0}
  if isinstance(tree, Mapping):
    bad = [k for k in tree if not isinstance(k, str)]
    if bad:
      raise ValueError(f"tree keys must be str to encode, got {bad[0]!r} under {path or '/'!r}")
    return {"d": [[k, _structure(v, f"{path}/{k}".lstrip("/"), leaves)]
                  for k, v in tree.items()]}
  return {"l" if isinstance(tree, list) else "t":
          [_structure(v, f"{path}/{i}".lstrip("/"), leaves) for i, v in enumerate(tree)]}


def _unstructure(s, leaves: list):
  if isinstance(s, int):
    return leaves[s]
  if "n" in s:
    return None
  if "d" in s:
    return {k: _unstructure(v, leaves) for k, v in s["d"]}
  items = [_unstructure(v, leaves) for v in s.get("l", s.get("t", []))]
  return items if "l" in s else tuple(items)


def encode(packed: export_lib.Packed) -> bytes:
  """Serializes a `Packed` export with its codes and masks entropy-coded (module doc).

  Args:
    packed: an `export.export` result.

  Returns:
    The bytes; `decode` gives back an equal `Packed`, array for array.

  Raises:
    ValueError: for a tree key that is not a str, codes/masks not laid out as `export`
      lays them out (naming the leaf), or metadata that is not plain Python scalars.
  """
  if not isinstance(packed, export_lib.Packed):
    raise ValueError(f"packed must be an export.Packed, got {type(packed).__name__}")
  unknown = [f for f in packed._fields if f not in ("tree", "spec")]
  if unknown:  # a field this format does not store would be lost silently
    raise ValueError(f"packed fields must be ('tree', 'spec') to encode, got extra {unknown}")
  spec = packed.spec
  per_path = isinstance(spec, Mapping)
  if per_path and not all(isinstance(k, str) and isinstance(v, quantizers.Spec)
                          for k, v in spec.items()):
    raise ValueError(f"packed.spec as a dict must map str paths to quantization.Specs, got "
                     f"{spec!r}")
  if not per_path and spec is not None and not isinstance(spec, quantizers.Spec):
    raise ValueError(f"packed.spec must be a quantization.Spec, a dict path -> Spec or None, "
                     f"got {spec!r}")
  leaves, blocks = [], []
  structure = _structure(packed.tree, "", leaves)
  records = [_encode_leaf(x, path, blocks) for path, x in leaves]
  meta = {"tree": structure, "leaves": records}
  if per_path:  # a per-path export: each quantized leaf's spec under "specs"
    meta.update(spec=None, specs={k: quantizers.spec_fields(v) for k, v in spec.items()})
  else:
    meta.update(spec=None if spec is None else quantizers.spec_fields(spec))
  try:
    header = json.dumps(meta, separators=(",", ":")).encode()
  except TypeError as e:
    raise ValueError(f"leaf metadata (shape, bits, axis, dtype) must be Python scalars: "
                     f"{e}") from None
  header = zlib.compress(header, 9)
  body = MAGIC + _varint(len(header)) + header + b"".join(
      _varint(len(b)) + b for b in blocks)
  return body + zlib.crc32(body).to_bytes(4, "little")


def decode(data: bytes) -> export_lib.Packed:
  """Inverse of `encode`.

  Args:
    data: bytes from `encode`.

  Returns:
    The `Packed` export (`export.load` turns it into params).

  Raises:
    ValueError: if ``data`` is not an entropy-coded export or is corrupt (checksum,
      truncation, inconsistent tables), saying which.
  """
  data = bytes(data)
  if len(data) < len(MAGIC) + 5 or data[:len(MAGIC)] != MAGIC:
    raise ValueError(f"data must start with {MAGIC!r} (an entropy-coded export), got "
                     f"{data[:len(MAGIC)]!r} in {len(data)} bytes")
  body, crc = data[:-4], int.from_bytes(data[-4:], "little")
  if zlib.crc32(body) != crc:
    raise ValueError("data is corrupt: its CRC-32 does not match (changed or truncated)")
  try:
    r = _Reader(body)
    r.take(len(MAGIC))
    meta = json.loads(zlib.decompress(r.block()))
    leaves = [_decode_leaf(rec, r) for rec in meta["leaves"]]
    if r.pos != len(body):
      raise ValueError(f"{len(body) - r.pos} bytes left over after the last leaf")
    spec = None if meta["spec"] is None else quantizers.Spec(**meta["spec"])
    if "specs" in meta:
      spec = {k: quantizers.Spec(**v) for k, v in meta["specs"].items()}
    return export_lib.Packed(_unstructure(meta["tree"], leaves), spec)
  except (ValueError, KeyError, IndexError, TypeError, zlib.error, RuntimeError) as e:
    raise ValueError(f"data is corrupt: {e}") from None


def encoded_nbytes(packed: export_lib.Packed) -> int:
  """The size of `encode(packed)` in bytes (it encodes: the size of ANS streams is only
  known once coded)."""
  return len(encode(packed))
