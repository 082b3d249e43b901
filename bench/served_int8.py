"""Served INT8 matmuls: float32, int8 weights dequantized in jit, and int8 x int8 -> int32.

Run: python bench/served_int8.py [--tokens=12288] [--rounds=10]

At the default wireless teacher's layer shapes (d = 64, MLP 128; the eval batch of 384
frames is 12,288 tokens of patch 2), one jitted MLP block (fc1 -> GELU -> fc2) three ways,
timed in interleaved rounds (`training.interleaved_latency`), as ratios to float32 with
their 10th-90th percentiles, beside a float32-vs-float32 ratio that shows the noise:

* ``dequant``: int8 codes and per-channel scales, ``(codes * scale)`` inside the jit (what
  `compressjax.serving` serves);
* ``int8 dot``: activations quantized per token to int8 (dynamic range), then
  ``lax.dot_general`` on int8 operands with ``preferred_element_type=int32`` and a float
  rescale: what an integer kernel would run.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from compressjax import training


def _quantize(w, axis):
  scale = jnp.max(jnp.abs(w), axis=axis, keepdims=True) / 127.0
  return jnp.round(w / scale).astype(jnp.int8), scale


def _int8_dense(x, codes, w_scale):
  xq, x_scale = _quantize(x, -1)
  acc = jax.lax.dot_general(xq, codes, (((x.ndim - 1,), (0,)), ((), ())),
                            preferred_element_type=jnp.int32)
  return acc.astype(jnp.float32) * x_scale * w_scale


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tokens", type=int, default=384 * 32)
  ap.add_argument("--width", type=int, default=64)
  ap.add_argument("--hidden", type=int, default=128)
  ap.add_argument("--rounds", type=int, default=10)
  args = ap.parse_args(argv)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(args.tokens, args.width)), jnp.float32)
  w1 = jnp.asarray(rng.normal(size=(args.width, args.hidden)) / 8, jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(args.hidden, args.width)) / 11, jnp.float32)
  (c1, s1), (c2, s2) = _quantize(w1, 0), _quantize(w2, 0)
  f32 = jax.jit(lambda x, a, b: jax.nn.gelu(x @ a) @ b)
  deq = jax.jit(lambda x, c1, s1, c2, s2: jax.nn.gelu(x @ (c1 * s1)) @ (c2 * s2))
  i8 = jax.jit(lambda x, c1, s1, c2, s2: _int8_dense(jax.nn.gelu(_int8_dense(x, c1, s1)),
                                                     c2, s2))
  f32_copy = jax.jit(lambda x, a, b: jax.nn.gelu(x @ a) @ b)
  ref = f32(x, w1, w2)
  err = lambda y: float(jnp.abs(y - ref).max() / jnp.abs(ref).max())
  calls = [(f32, (x, w1, w2)), (f32_copy, (x, w1, w2)), (deq, (x, c1, s1, c2, s2)),
           (i8, (x, c1, s1, c2, s2))]
  times = training.interleaved_latency(calls, rounds=args.rounds)
  print(f"device: {jax.devices()[0].device_kind}; {args.tokens} tokens, d={args.width}, "
        f"MLP {args.hidden}; float32 {1e3 * np.median(times[:, 0]):.3f} ms")
  for k, name, y in ((1, "float32 again", None), (2, "dequant in jit", deq(x, c1, s1, c2, s2)),
                     (3, "int8 dot -> int32", i8(x, c1, s1, c2, s2))):
    r = training.latency_ratio(times[:, k], times[:, 0])
    rel = "" if y is None else f"  max rel. error vs float32 {err(y):.1e}"
    print(f"{name:>18}: {r['ratio']:.2f}x [{r['lo']:.2f}, {r['hi']:.2f}]"
          f"{' noisy' if r['noisy'] else ''}{rel}")


if __name__ == "__main__":
  main()
