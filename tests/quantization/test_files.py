"""Packed files: exact round trip, size on disk, the documented layout, bad files, safe writes."""

import json
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax import quantization as q
from compressjax.quantization import files


def _sparse(seed, shape, density):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape).astype(np.float32)
  x.flat[rng.permutation(x.size)[:round((1 - density) * x.size)]] = 0.0
  return x


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "Dense_0": {"kernel": jnp.asarray(_sparse(seed, (40, 24), 0.2)),  # stored with a mask
                  "bias": jnp.asarray(rng.standard_normal(24), jnp.float32)},
      "Dense_1": {"kernel": jnp.asarray(rng.standard_normal((24, 10)), jnp.bfloat16),
                  "bias": jnp.zeros(10)},
      "Conv_0": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 2, 8)), jnp.float32)},
      "step": jnp.asarray(7, jnp.int32),
      "blocks": [{"scale": jnp.asarray(_sparse(seed + 1, (64,), 0.05))},  # float, sparse
                 {"scale": jnp.ones(4, jnp.float16)}],
  }


def _bits(x):
  a = np.asarray(x)
  return a.dtype, a.shape, a.tobytes()


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert _bits(x) == _bits(y)


SPECS = [q.Spec(8), q.Spec(4), q.Spec(8, True, "channel"), q.Spec(4, False, "channel"),
         q.Spec(3, False, "channel", 0), q.Spec(12, True, "channel"), None]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_round_trip_is_exact(tmp_path, spec):
  packed = q.export(_params(), spec)
  path = q.save(tmp_path / "model.npz", packed)
  assert path == str(tmp_path / "model.npz")
  back = q.load_file(path)
  assert back.spec == spec
  _assert_same(q.load(back), q.load(packed))
  kernel = back.tree["Dense_0"]["kernel"]
  if spec is not None:
    assert isinstance(kernel, q.PackedTensor) and kernel.mask.size  # the sparse form survived
    assert q.nbytes(back) == q.nbytes(packed)


def test_a_mixed_precision_export_round_trips_as_version_3(tmp_path):
  specs = {"Dense_0/kernel": q.Spec(3), "Conv_0/kernel": q.Spec(5, False, "channel")}
  packed = q.export(_params(), specs.get)    # Dense_1/kernel stays float (None)
  back = q.load_file(q.save(tmp_path / "mixed.npz", packed))
  assert back.spec == packed.spec == specs
  _assert_same(q.load(back), q.load(packed))
  assert q.nbytes(back) == q.nbytes(packed)
  with zipfile.ZipFile(tmp_path / "mixed.npz") as z:
    header = json.loads(np.load(z.open("header.npy")).tobytes())
  assert header["version"] == 3 and header["spec"] is None
  assert header["specs"]["Dense_0/kernel"]["bits"] == 3


def _legacy(src, dst):
  """``src`` rewritten as version 3 wrote it: a masked symmetric 2-bit leaf's non-zero codes
  ``q - qmin`` in two bits each (the first leaf; the test makes it the only one)."""
  with np.load(src) as z:
    header = json.loads(z["header"].tobytes())
    payload = z["payload"].tobytes()
  entry = header["leaves"][0]
  packed = q.load_file(src)
  t, values = packed.tree["w"], np.asarray(q.load(packed)["w"]).ravel()
  old = q.pack_bits((np.sign(values[values != 0]) + 1).astype(np.int64), 2)  # 0: -1, 2: +1
  assert entry["arrays"][0][0] == "codes" and old.size > t.codes.size
  entry["arrays"][0][2] = [old.size]
  header["version"] = 3
  np.savez(dst, header=np.frombuffer(json.dumps(header).encode(), np.uint8),
           payload=np.frombuffer(old.tobytes() + payload[t.codes.size:], np.uint8))
  return str(dst)


def test_masked_2_bit_leaves_write_version_4_and_version_3_files_still_load(tmp_path):
  x = _sparse(5, (48, 40), 0.3)
  packed = q.export({"w": jnp.asarray(x)}, {"w": q.Spec(2, True, "channel")}.get,
                    where=lambda _: True)
  t = packed.tree["w"]
  assert q.skips_zero(t) and t.codes.size == -(-int(np.unpackbits(t.mask).sum()) // 8)
  path = q.save(tmp_path / "v4.npz", packed)
  with np.load(path) as z:
    assert json.loads(z["header"].tobytes())["version"] == 4
  back = q.load_file(path)
  _assert_same(q.load(back), q.load(packed))
  old = q.load_file(_legacy(path, tmp_path / "v3.npz"))   # converted on reading
  _assert_same(q.load(old), q.load(packed))
  assert old.tree["w"].codes.tobytes() == t.codes.tobytes()


@pytest.mark.parametrize("spec", [q.Spec(8), q.Spec(4, True, "channel"), None], ids=str)
def test_size_on_disk_is_nbytes_plus_a_small_header(tmp_path, spec):
  params = {"Dense_0": {"kernel": jnp.asarray(_sparse(3, (256, 512), 0.5))},
            "Dense_1": {"kernel": jnp.asarray(_sparse(4, (512, 64), 1.0)),
                        "bias": jnp.zeros(64)}}
  packed = q.export(params, spec)
  size = os.path.getsize(q.save(tmp_path / "m.npz", packed))
  assert q.nbytes(packed) <= size <= q.nbytes(packed) + 2048, (size, q.nbytes(packed))


def test_file_follows_the_documented_layout(tmp_path):
  """An independent reader (numpy + json, per the module docstring) finds every array."""
  packed = q.export(_params(1), q.Spec(4, False, "channel"))
  path = q.save(tmp_path / "m.npz", packed)
  with zipfile.ZipFile(path) as z:
    assert sorted(z.namelist()) == ["header.npy", "payload.npy"]
    assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
  with np.load(path) as z:
    header = json.loads(z["header"].tobytes().decode("utf-8"))
    payload = z["payload"].tobytes()
  assert header["format"] == "compressjax.packed" and header["version"] == 1
  assert header["spec"] == {"bits": 4, "symmetric": False, "granularity": "channel",
                            "axis": -1}
  offset, found = 0, {}
  for entry in header["leaves"]:
    for name, dtype, shape in entry["arrays"]:
      n = int(np.prod(shape)) * jnp.dtype(dtype).itemsize
      found[("/".join(map(str, entry["path"])), name)] = (entry, payload[offset:offset + n])
      offset += n
  assert offset == len(payload)
  t = packed.tree["Dense_0"]["kernel"]
  entry, codes = found[("Dense_0/kernel", "codes")]
  assert entry["kind"] == "quantized" and entry["bits"] == 4 and entry["axis"] == 1
  assert codes == t.codes.tobytes()
  assert found[("Dense_0/kernel", "scale")][1] == t.scale.astype("<f4").tobytes()
  assert found[("blocks/1/scale", "value")][1] == np.ones(4, "<f2").tobytes()
  # The payload is exactly what nbytes counts, less its per-tensor headers.
  per_tensor = sum(q.header_bytes(len(e["shape"])) for e in header["leaves"])
  assert len(payload) == q.nbytes(packed) - per_tensor


def _write(path, data: bytes):
  with open(path, "wb") as f:
    f.write(data)
  return str(path)


def _rewrite_header(src, dst, change):
  with np.load(src) as z:
    header = json.loads(z["header"].tobytes())
    payload = z["payload"]
  change(header)
  np.savez(dst, header=np.frombuffer(json.dumps(header).encode(), np.uint8), payload=payload)
  return str(dst)


def test_foreign_truncated_and_corrupt_files_raise_naming_path_and_problem(tmp_path):
  good = q.save(tmp_path / "good.npz", q.export(_params(2), q.Spec(8, True, "channel")))
  data = open(good, "rb").read()
  text = _write(tmp_path / "notes.txt", b"not a model\n")
  other = str(tmp_path / "other.npz")
  np.savez(other, weights=np.arange(5.0))
  cases = {
      text: "not an .npz",
      other: r"holds \['weights'\], expected \['header', 'payload'\]",
      _write(tmp_path / "half.npz", data[:len(data) // 2]): "truncated or corrupt",
      _rewrite_header(good, tmp_path / "v5.npz", lambda h: h.update(version=5)):
          r"unsupported packed file version 5; this library reads versions \(1, 2, 3, 4\)",
      _rewrite_header(good, tmp_path / "specs2.npz", lambda h: h.update(specs={})):
          "specs needs version 3, got version 1",
      _rewrite_header(good, tmp_path / "fmt.npz", lambda h: h.update(format="x")):
          "format must be 'compressjax.packed', got 'x'",
      _rewrite_header(good, tmp_path / "short.npz",
                      lambda h: h["leaves"][0]["arrays"][0][2].__setitem__(0, 10 ** 6)):
          r"needs payload bytes .* \(truncated\)",
      _rewrite_header(good, tmp_path / "spec.npz", lambda h: h["spec"].update(bits=99)):
          "corrupt packed file header: bits must be",
      _rewrite_header(good, tmp_path / "nokey.npz", lambda h: h["leaves"][0].pop("kind")):
          "corrupt packed file header: KeyError",
      _rewrite_header(good, tmp_path / "bits.npz", lambda h: h["leaves"][0].update(bits=4)):
          "codes must be",
  }
  flipped = bytearray(data)
  flipped[len(data) // 2] ^= 0xFF  # inside the payload: the zip's CRC-32 catches it
  cases[_write(tmp_path / "flipped.npz", bytes(flipped))] = "corrupt or truncated .*CRC"
  for path, match in cases.items():
    with pytest.raises(ValueError, match=match) as err:
      q.load_file(path)
    assert str(err.value).startswith(str(path)), (path, err.value)


def test_a_failed_write_leaves_the_existing_file_untouched(tmp_path, monkeypatch):
  path = q.save(tmp_path / "m.npz", q.export(_params(3), 8))
  before = open(path, "rb").read()

  def broken_savez(f, **arrays):
    f.write(b"PK\x03\x04 half an archive")
    raise OSError("disk full")
  monkeypatch.setattr(files.np, "savez", broken_savez)
  with pytest.raises(OSError, match="disk full"):
    q.save(path, q.export(_params(4), 4))
  assert open(path, "rb").read() == before
  assert os.listdir(tmp_path) == ["m.npz"]  # no temporary file left behind


def test_save_rejects_what_it_cannot_write(tmp_path):
  with pytest.raises(ValueError, match="packed must be a quantization.Packed"):
    q.save(tmp_path / "m.npz", _params())
  with pytest.raises(ValueError, match="dicts with string keys and lists, got key"):
    q.save(tmp_path / "m.npz", q.Packed({1: np.zeros(3)}))
