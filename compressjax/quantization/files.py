"""Packed files: `save` a `Packed` export to disk and `load_file` it back, exactly.

Format (version 1, or 2 when the spec names a grid method). A file is an uncompressed ``.npz``
archive (a zip of ``.npy`` files, which ``numpy.load`` reads anywhere) with exactly two members:

- ``header``: uint8, the UTF-8 bytes of a JSON object::

    {"format": "compressjax.packed", "version": 1 | 2,
     "spec": {"bits": 8, "symmetric": true, "granularity": "channel", "axis": -1,
              "grid": "pow2"} | null,                               # "grid": version 2 only
     "leaves": [{"path": ["Dense_0", "kernel"], "kind": "quantized" | "sparse" | "array",
                 "shape": [...], "dtype": "float32",
                 "bits": 8, "symmetric": true, "axis": 1 | null,    # "quantized" only
                 "arrays": [["codes", "uint8", [n]], ["scale", "float32", [c]], ...]}, ...]}

- ``payload``: uint8, the little-endian bytes of every array named in ``arrays``, leaf after
  leaf and array after array, with no padding.

A "quantized" leaf holds the arrays of a `PackedTensor` (``codes``, ``scale``, ``zero_point``,
``mask``), a "sparse" leaf those of a `SparseTensor` (``values``, ``mask``), an "array" leaf
one array ``value``. ``path`` lists dict keys (strings) and list indices (integers) from the
root. The payload is exactly ``nbytes(packed)`` minus its per-tensor headers, so a file's size
is `nbytes` plus the JSON (about 250 bytes per tensor) and about 500 bytes of zip and ``.npy``
headers. The zip's CRC-32 guards the payload against corruption.

Version 3 is written for a mixed-precision export (a per-path spec: `Packed.spec` a dict of
each quantized leaf's path to its `Spec`): ``"spec"`` is null and ``"specs"`` maps each such
path to its spec's fields, as ``"spec"`` holds them.

Version 4 stores the non-zeros of a masked symmetric 2-bit "quantized" leaf in one bit
each (0: -1, 1: +1; `export.skips_zero`), as `PackedTensor.codes` lays them out. It is
written only for an export holding such a leaf (with ``"spec"`` or ``"specs"`` as versions
1-3 hold them); files of versions 1-3 stored those codes ``q - qmin`` in two bits each, and
are read and converted.

Version 2 adds ``spec.grid``, the name of the spec's grid method (`grids.GRIDS`); it is
written only for a grid other than ``"minmax"``, so files of min/max specs stay version 1 (and
readable by readers of version 1), and a version-1 file's spec has the min/max grid. Reading
a file does not need the grid method registered: codes and scales hold the values.
"""

import json
import os
import sys
import tempfile
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compressjax import selection
from compressjax.quantization.export import Packed
from compressjax.quantization.export import PackedTensor
from compressjax.quantization.export import SparseTensor
from compressjax.quantization.export import code_bits
from compressjax.quantization.export import skips_zero
from compressjax.quantization.export import unpack_bits
from compressjax.quantization.export import with_codes
from compressjax.quantization import quantizers

FORMAT = "compressjax.packed"
VERSION = 2  # written when the spec names a grid method; version 1 otherwise
MIXED_VERSION = 3  # written for a per-path (mixed-precision) export
SKIP_ZERO_VERSION = 4  # written for an export holding a masked symmetric 2-bit leaf
VERSIONS = (1, 2, 3, 4)  # the versions this library reads
_FIELDS = {"quantized": ("codes", "scale", "zero_point", "mask"),
           "sparse": ("values", "mask"), "array": ("value",)}


def _path_keys(path: tuple[Any, ...]) -> list[str | int]:
  keys = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey) and isinstance(k.key, str):
      keys.append(k.key)
    elif isinstance(k, jax.tree_util.SequenceKey):
      keys.append(int(k.idx))
    else:
      raise ValueError(f"save: the tree must hold dicts with string keys and lists, got key "
                       f"{k!r} at {selection.path_str(path)}")
  return keys


def _entry(keys: list, leaf: Any) -> tuple[dict, list[np.ndarray]]:
  """The header entry of one leaf and its arrays, in payload order."""
  if isinstance(leaf, PackedTensor):
    entry = {"kind": "quantized", "shape": list(leaf.shape), "dtype": leaf.dtype,
             "bits": leaf.bits, "symmetric": leaf.symmetric, "axis": leaf.axis}
    arrays = [leaf.codes, leaf.scale, leaf.zero_point, leaf.mask]
  elif isinstance(leaf, SparseTensor):
    entry = {"kind": "sparse", "shape": list(leaf.shape), "dtype": str(leaf.values.dtype)}
    arrays = [leaf.values, leaf.mask]
  else:
    a = np.asarray(leaf)
    entry = {"kind": "array", "shape": list(a.shape), "dtype": str(a.dtype)}
    arrays = [a]
  arrays = [np.asarray(a) for a in arrays]
  entry["arrays"] = [[name, str(a.dtype), list(a.shape)]
                     for name, a in zip(_FIELDS[entry["kind"]], arrays)]
  return {"path": keys, **entry}, arrays


def _little_endian_bytes(a: np.ndarray) -> bytes:
  a = np.ascontiguousarray(a)
  if sys.byteorder == "big" and a.dtype.itemsize > 1:
    a = a.byteswap()
  return a.tobytes()


def _dtype(name: Any) -> np.dtype:
  """A dtype from its header name (bfloat16 included); no object dtypes."""
  dtype = np.dtype(jnp.dtype(name))
  if dtype.hasobject:
    raise ValueError(f"dtype must hold numbers, got {name!r}")
  return dtype


def _shape(value: Any, name: str) -> tuple[int, ...]:
  if not isinstance(value, list) or not all(
      isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
    raise ValueError(f"{name} must be a list of non-negative ints, got {value!r}")
  return tuple(value)


def save(path: str | os.PathLike, packed: Packed) -> str:
  """Writes a `Packed` export to ``path`` (format in the module docstring).

  The file is written beside ``path`` under a temporary name and moved over it with
  ``os.replace``, so an existing file is never left half-written by a failed save.

  Args:
    path: the file to write (``.npz`` is the natural suffix; none is added).
    packed: from `export` (or `load_file`).

  Returns:
    ``path`` as a string.

  Raises:
    ValueError: if ``packed`` is not a `Packed`, or its tree holds containers other than dicts
      with string keys and lists.
  """
  if not isinstance(packed, Packed):
    raise ValueError(f"packed must be a quantization.Packed (from export), got "
                     f"{type(packed).__name__}")
  is_tensor = lambda x: isinstance(x, (PackedTensor, SparseTensor))
  flat = jax.tree_util.tree_flatten_with_path(packed.tree, is_leaf=is_tensor)[0]
  entries, chunks = [], []
  for p, leaf in flat:
    entry, arrays = _entry(_path_keys(p), leaf)
    entries.append(entry)
    chunks.extend(_little_endian_bytes(a) for a in arrays)
  skips = any(isinstance(leaf, PackedTensor) and skips_zero(leaf) for _, leaf in flat)
  if isinstance(packed.spec, dict):
    header = {"format": FORMAT, "version": MIXED_VERSION, "spec": None,
              "specs": {p: quantizers.spec_fields(s) for p, s in sorted(packed.spec.items())},
              "leaves": entries}
  else:
    spec = None if packed.spec is None else quantizers.spec_fields(packed.spec)
    header = {"format": FORMAT,
              "version": VERSION if spec is not None and "grid" in spec else 1,
              "spec": spec, "leaves": entries}
  if skips:
    header["version"] = SKIP_ZERO_VERSION
  header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
  path = os.fspath(path)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.",
                             dir=os.path.dirname(os.path.abspath(path)))
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, header=np.frombuffer(header_bytes, np.uint8),
               payload=np.frombuffer(b"".join(chunks), np.uint8))
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path


def _read_archive(path: str) -> tuple[dict, np.ndarray]:
  """The parsed JSON header and the payload bytes, or ValueError naming what is wrong."""
  with open(path, "rb") as f:
    magic = f.read(4)
  if not zipfile.is_zipfile(path):
    what = ("a truncated or corrupt .npz archive" if magic == b"PK\x03\x04"
            else "not an .npz (zip) archive")
    raise ValueError(f"{path}: not a readable compressjax packed file: {what}")
  try:
    with np.load(path, allow_pickle=False) as z:
      if sorted(z.files) != ["header", "payload"]:
        raise ValueError(f"{path}: not a compressjax packed file: its .npz holds "
                         f"{sorted(z.files)}, expected ['header', 'payload']")
      raw, payload = z["header"], z["payload"]
  except (zipfile.BadZipFile, EOFError, OSError) as e:
    raise ValueError(f"{path}: corrupt or truncated packed file: {e}") from e
  if raw.dtype != np.uint8 or payload.dtype != np.uint8 or raw.ndim != 1 or payload.ndim != 1:
    raise ValueError(f"{path}: not a compressjax packed file: header and payload must be 1-D "
                     f"uint8, got {raw.dtype}{list(raw.shape)} and "
                     f"{payload.dtype}{list(payload.shape)}")
  try:
    header = json.loads(raw.tobytes().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: corrupt packed file: header is not UTF-8 JSON ({e})") from e
  if not isinstance(header, dict) or header.get("format") != FORMAT:
    got = header.get("format") if isinstance(header, dict) else type(header).__name__
    raise ValueError(f"{path}: not a compressjax packed file: format must be {FORMAT!r}, "
                     f"got {got!r}")
  if header.get("version") not in VERSIONS:
    raise ValueError(f"{path}: unsupported packed file version {header.get('version')!r}; "
                     f"this library reads versions {VERSIONS}")
  return header, payload


def _check_leaf(where: str, kind: str, leaf: Any, version: int) -> int:
  """The count of a leaf's stored values; raises ValueError if its arrays disagree with its
  shape, bits and mask (codes laid out as ``version`` lays them out)."""
  n = int(np.prod(leaf.shape))
  if kind == "array":
    return n
  if leaf.mask.dtype != np.uint8:
    raise ValueError(f"{where}: mask must be uint8, got {leaf.mask.dtype}")
  stored = n
  if leaf.mask.size:
    if leaf.mask.size != -(-n // 8):
      raise ValueError(f"{where}: mask must hold {-(-n // 8)} bytes for {n} values, "
                       f"got {leaf.mask.size}")
    stored = int(np.unpackbits(leaf.mask, count=n).sum())
  if kind == "sparse":
    if leaf.values.shape != (stored,):
      raise ValueError(f"{where}: values must hold the mask's {stored} non-zeros, got "
                       f"shape {leaf.values.shape}")
    return stored
  bits = leaf.bits if version < SKIP_ZERO_VERSION else code_bits(
      leaf.bits, leaf.symmetric, bool(leaf.mask.size))
  if leaf.codes.dtype != np.uint8 or leaf.codes.shape != (-(-stored * bits // 8),):
    raise ValueError(f"{where}: codes must be {-(-stored * bits // 8)} uint8 bytes for "
                     f"{stored} {bits}-bit values, got {leaf.codes.dtype}"
                     f"{list(leaf.codes.shape)}")
  channels = () if leaf.axis is None else (leaf.shape[leaf.axis],)
  if leaf.scale.dtype != np.float32 or leaf.scale.shape != channels:
    raise ValueError(f"{where}: scale must be float32 of shape {channels}, got "
                     f"{leaf.scale.dtype}{list(leaf.scale.shape)}")
  zp_shape = (0,) if leaf.symmetric else channels
  if leaf.zero_point.shape != zp_shape:
    raise ValueError(f"{where}: zero_point must have shape {zp_shape}, got "
                     f"{list(leaf.zero_point.shape)}")
  return stored


def _leaf(where: str, entry: dict, payload: np.ndarray, offset: int,
          version: int) -> tuple[Any, int]:
  """Rebuilds one leaf from its header entry and the payload from ``offset``."""
  kind = entry["kind"]
  names = [a[0] for a in entry["arrays"]]
  if kind not in _FIELDS or names != list(_FIELDS[kind]):
    allowed = ", ".join(f"{k} {list(v)}" for k, v in _FIELDS.items())
    raise ValueError(f"{where}: kind {kind!r} with arrays {names} is not one of: {allowed}")
  arrays = []
  for name, dtype, shape in entry["arrays"]:
    dtype, shape = _dtype(dtype), _shape(shape, f"shape of {name!r}")
    size = int(np.prod(shape)) * dtype.itemsize
    if offset + size > payload.size:
      raise ValueError(f"{where}: array {name!r} needs payload bytes [{offset}, "
                       f"{offset + size}), but the payload holds {payload.size} (truncated)")
    a = np.frombuffer(payload[offset:offset + size].tobytes(), dtype)
    if sys.byteorder == "big" and dtype.itemsize > 1:
      a = a.byteswap()
    arrays.append(a.reshape(shape))
    offset += size
  shape = _shape(entry["shape"], "shape")
  if kind == "quantized":
    axis = entry["axis"]
    if axis is not None and not 0 <= axis < len(shape):
      raise ValueError(f"{where}: axis must be None or in [0, {len(shape)}), got {axis!r}")
    leaf = PackedTensor(*arrays, shape=shape, bits=int(entry["bits"]),
                                   symmetric=bool(entry["symmetric"]), axis=axis,
                                   dtype=str(_dtype(entry["dtype"])))
  elif kind == "sparse":
    leaf = SparseTensor(arrays[0], arrays[1], shape)
  else:
    leaf = arrays[0]
    if leaf.shape != shape:
      raise ValueError(f"{where}: value must have shape {shape}, got {leaf.shape}")
  stored = _check_leaf(where, kind, leaf, version)
  if kind == "quantized" and version < SKIP_ZERO_VERSION and skips_zero(leaf):
    # Versions 1-3 stored every non-zero's code q - qmin in `bits` bits.
    leaf = with_codes(leaf, unpack_bits(leaf.codes, leaf.bits, stored))
  return leaf, offset


def _insert(tree: Any, keys: list, leaf: Any, where: str) -> Any:
  """Puts ``leaf`` at ``keys`` in nested dicts (string keys) and lists (integer keys)."""
  if not keys:
    return leaf
  key, rest = keys[0], keys[1:]
  if isinstance(key, str):
    tree = {} if tree is None else tree
    if not isinstance(tree, dict):
      raise ValueError(f"{where}: path mixes a dict key {key!r} into a list")
    if key in tree and not rest:
      raise ValueError(f"{where}: path repeats an earlier leaf's")
    tree[key] = _insert(tree.get(key), rest, leaf, where)
    return tree
  tree = [] if tree is None else tree
  if not isinstance(tree, list) or isinstance(key, bool) or not isinstance(key, int) \
      or key != len(tree):
    raise ValueError(f"{where}: path key {key!r} is not the next list index or a string")
  tree.append(_insert(None, rest, leaf, where))
  return tree


def load_file(path: str | os.PathLike) -> Packed:
  """Reads a file written by `save` back into the `Packed` it holds, exactly.

  Args:
    path: the file.

  Returns:
    The `Packed` export, its ``spec`` included; `load` turns it into params.

  Raises:
    ValueError: naming ``path`` and what is wrong, for a file that is not a packed file (a
      text file, another ``.npz``), has another format version, or is truncated or corrupt.
    OSError: if the file cannot be opened (``FileNotFoundError`` for a missing one).
  """
  path = os.fspath(path)
  header, payload = _read_archive(path)
  try:
    spec = header["spec"]
    if spec is not None and "grid" in spec and header["version"] < 2:
      raise ValueError(f"spec.grid needs version 2, got version {header['version']}")
    spec = None if spec is None else quantizers.Spec(**spec)
    if "specs" in header:
      if header["version"] < MIXED_VERSION:
        raise ValueError(f"specs needs version {MIXED_VERSION}, got version "
                         f"{header['version']}")
      spec = {p: quantizers.Spec(**f) for p, f in header["specs"].items()}
    tree, offset = None, 0
    for i, entry in enumerate(header["leaves"]):
      where = f"{path}: leaf {i} ({'/'.join(map(str, entry['path']))})"
      leaf, offset = _leaf(where, entry, payload, offset, header["version"])
      tree = _insert(tree, list(entry["path"]), leaf, where)
  except ValueError as e:
    if str(e).startswith(path):
      raise
    raise ValueError(f"{path}: corrupt packed file header: {e}") from e
  except (KeyError, TypeError, AttributeError, IndexError) as e:
    raise ValueError(f"{path}: corrupt packed file header: {e!r}") from e
  if offset != payload.size:
    raise ValueError(f"{path}: corrupt packed file: the header describes {offset} payload "
                     f"bytes, the payload holds {payload.size}")
  return Packed({} if tree is None else tree, spec)
