"""Entropy-coded export against the plain packed export and zlib, on a Laplace-weighted model.

Run: ``python bench/entropy_export.py [--widths 512,1024,1024,512,10] [--seed 0]``. Builds an
MLP whose kernels are i.i.d. Laplace (biases normal), prunes each kernel to 50% by magnitude,
exports it as INT8 and INT4 (symmetric, per channel) and prints, per setting, the bytes of:
the plain export (`quantization.nbytes`), ours (`quantization.encoded_nbytes`, the length of
`quantization.encode`, names and structure included), and zlib level 9 over the concatenated
arrays of the plain export plus its per-tensor headers (the general-purpose baseline), with
their ratios to plain and to fp32, the floor ``sum over kernels of (n_nonzero * H(codes) +
n * h(density)) / 8`` of an order-0 coder, and the encode/decode times (median of 5).
"""

import argparse
import statistics
import time
import zlib

import numpy as np

from compressjax import quantization as q


def model(widths, seed):
  """Laplace kernels (scale 1/sqrt(fan_in)) pruned to 50% by magnitude, normal biases."""
  r = np.random.default_rng(seed)
  params = {}
  for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
    k = (r.laplace(size=(a, b)) / np.sqrt(a)).astype(np.float32)
    k[np.abs(k) < np.median(np.abs(k))] = 0.0
    params[f"Dense_{i}"] = {"kernel": k, "bias": (0.1 * r.normal(size=b)).astype(np.float32)}
  return params


def zlib_nbytes(packed) -> int:
  """zlib -9 over every array of the plain export, plus the headers `nbytes` counts."""
  is_stored = lambda x: isinstance(x, (q.PackedTensor, q.SparseTensor))
  leaves = [x for layer in packed.tree.values() for x in layer.values()]
  arrays, headers = [], 0
  for x in leaves:
    if is_stored(x):
      arrays += [v for v in x if isinstance(v, np.ndarray)]
    else:
      arrays.append(np.asarray(x))
    headers += q.header_bytes(len(x.shape) if is_stored(x) else np.ndim(x))
  return len(zlib.compress(b"".join(a.tobytes() for a in arrays), 9)) + headers


def entropy_floor(packed) -> float:
  """Bytes an order-0 coder needs at least for the codes and masks of the kernels."""
  bits = 0.0
  for layer in packed.tree.values():
    t = layer["kernel"]
    n = int(np.prod(t.shape))
    flags = np.unpackbits(t.mask, count=n) if t.mask.size else np.ones(n, np.uint8)
    codes = q.codes_of(t)
    for values in ((codes, flags) if t.mask.size else (codes,)):
      p = np.bincount(values) / values.size
      p = p[p > 0]
      bits += values.size * float(-(p * np.log2(p)).sum())
  return bits / 8


def _median_time(fn, repeats=5):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--widths", default="512,1024,1024,512,10")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  params = model([int(w) for w in args.widths.split(",")], args.seed)
  fp32 = sum(x.nbytes for layer in params.values() for x in layer.values())
  n_kernel = sum(layer["kernel"].size for layer in params.values())
  print(f"model: widths {args.widths}, {n_kernel:,} kernel weights (50% zero), fp32 "
        f"{fp32:,} bytes")
  print(f"{'export':<12}{'plain':>10}{'ours':>10}{'ours/plain':>12}{'zlib':>10}"
        f"{'zlib/plain':>12}{'floor':>10}{'fp32/ours':>11}{'enc s':>8}{'dec s':>8}")
  for name, spec in (("int8", q.Spec(8, True, "channel")), ("int4", q.Spec(4, True, "channel"))):
    packed = q.export(params, spec)
    plain = q.nbytes(packed)
    enc_s, data = _median_time(lambda: q.encode(packed))
    dec_s, back = _median_time(lambda: q.decode(data))
    assert len(data) == q.encoded_nbytes(packed)
    for a, b in zip(q.load(back).values(), q.load(packed).values()):
      assert all(np.array_equal(a[k], b[k]) for k in a)
    z = zlib_nbytes(packed)
    print(f"{name:<12}{plain:>10,}{len(data):>10,}{len(data) / plain:>12.3f}{z:>10,}"
          f"{z / plain:>12.3f}{entropy_floor(packed):>10,.0f}{fp32 / len(data):>11.2f}"
          f"{enc_s:>8.3f}{dec_s:>8.3f}")


if __name__ == "__main__":
  main()
