"""Random words and the variates drawn from them, in forms XLA:CPU runs fast.

The simulator draws all of an example's randomness as ONE block of uint32 words
(`random_words`, an unrolled Threefry; on XLA:CPU each ``jax.random`` call is a rolled
loop: about a second of compile time and a slow loop at run time) and turns words into
variates with the ``*_from_bits`` functions; `split` is ``jax.random.split`` bit for bit.
`sincos` replaces ``jnp.sin``/``jnp.cos``, which XLA:CPU evaluates element by element, and
`computed_once` stops XLA from recomputing a shared value in each of its consumers.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _is_threefry(key: chex.PRNGKey) -> bool:
  typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  impl = str(jax.random.key_impl(key)) if typed else jax.config.jax_default_prng_impl
  return impl == "threefry2x32"


def _threefry(key: chex.PRNGKey, x0: jnp.ndarray,
              x1: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Threefry-2x32-20 of counter pairs (x0, x1) under a threefry key, unrolled.

  The hash of JAX's default keys (Salmon et al., "Parallel random numbers: as easy as 1, 2,
  3", SC 2011; equal to ``jax.extend.random.threefry_2x32``) written out, which XLA:CPU
  runs about twice as fast as JAX's rolled-loop lowering and compiles faster.
  """
  typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  k0, k1 = jax.random.key_data(key) if typed else key
  ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))) ^ x0
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x0, x1


def split(key: chex.PRNGKey, num: int) -> jax.Array:
  """``jax.random.split(key, num)`` bit for bit, as the unrolled hash for threefry keys.

  Args:
    key: a PRNG key (typed or raw uint32 [2]).
    num: number of keys (static).

  Returns:
    Keys like ``jax.random.split``'s: [num] typed keys, or uint32 [num, 2].
  """
  if not (_is_threefry(key) and jax.config.jax_threefry_partitionable):
    return jax.random.split(key, num)
  # JAX's partitionable split hashes the counters (0, i) (jax/_src/random/threefry2x32.py).
  data = jnp.stack(_threefry(key, jnp.zeros((num,), jnp.uint32),
                             jnp.arange(num, dtype=jnp.uint32)), -1)
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(key))
  return data


def random_words(key: chex.PRNGKey, n: int) -> jnp.ndarray:
  """n uint32 words: Threefry-2x32 of the counters (c, 0), c < n / 2, under the key.

  Args:
    key: a PRNG key (typed or raw uint32 [2]); keys of other implementations than
      threefry use ``jax.random.bits``.
    n: number of words (static).

  Returns:
    uint32 [n]: the first words of each counter's pair, then the second words.
  """
  if not _is_threefry(key):
    return jax.random.bits(key, (n,), jnp.uint32)
  x0 = jnp.arange((n + 1) // 2, dtype=jnp.uint32)
  x0, x1 = _threefry(key, x0, jnp.zeros_like(x0))
  # Computed once, both words of a hash together: fused, the 20 rounds would be redone in
  # every consumer (symbols, bits, noise, taps), and once per word.
  x0, x1 = computed_once(x0, x1)
  return jnp.concatenate([x0, x1])[:n]


def computed_once(*arrays: jnp.ndarray) -> tuple[jnp.ndarray, ...]:
  """The arrays, unchanged (up to the sign of zero), each computed once by XLA.

  XLA:CPU re-fuses a cheap elementwise producer into every consumer, so a value shared by
  several outputs (or by the real and imaginary parts of one) is recomputed in each, and
  ``lax.optimization_barrier`` is gone before fusion runs. A reduction's result is always
  written out, so each array is summed with zeros along a new axis of size 2 (x + 0 = x),
  all in ONE variadic reduction: arrays computed together (the two words of a hash) share
  their work there too.

  Args:
    *arrays: arrays of one shape.

  Returns:
    The same arrays.
  """
  ops = tuple(jnp.stack([a, jnp.zeros_like(a)], -1) for a in arrays)
  inits = tuple(np.zeros((), a.dtype) for a in arrays)
  return jax.lax.reduce(ops, inits, lambda x, y: tuple(p + q for p, q in zip(x, y)),
                        (arrays[0].ndim,))


# Cody-Waite split of pi/2 and Cephes sinf/cosf minimax coefficients on [-pi/4, pi/4]
# (S. L. Moshier, Methods and Programs for Mathematical Functions, 1989).
_PIO2 = (np.float32(1.5703125), np.float32(4.837512969970703125e-4),
         np.float32(7.54978995489188216e-8))
_SIN = (np.float32(-1.6666654611e-1), np.float32(8.3321608736e-3), np.float32(-1.9515295891e-4))
_COS = (np.float32(4.166664568298827e-2), np.float32(-1.388731625493765e-3),
        np.float32(2.443315711809948e-5))


def sincos_reduced(r: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(sin r, cos r) for |r| <= pi / 4: `sincos` without its range reduction.

  Args:
    r: float32 array of angles in [-pi/4, pi/4].

  Returns:
    Two float32 arrays shaped like ``r``.
  """
  r2 = r * r
  s = r + r * r2 * (_SIN[0] + r2 * (_SIN[1] + r2 * _SIN[2]))
  c = 1 - 0.5 * r2 + r2 * r2 * (_COS[0] + r2 * (_COS[1] + r2 * _COS[2]))
  return s, c


def sincos(x: chex.Array) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(sin x, cos x) in float32 from mul/add polynomials (abs. error < 2e-7 for |x| < 1e4).

  XLA:CPU evaluates ``jnp.sin``/``jnp.cos`` element by element, about 10x slower than
  this vectorizable form, which also fuses with its neighbours on every backend.

  Args:
    x: float32 array of angles in radians.

  Returns:
    Two float32 arrays shaped like ``x``.
  """
  x = jnp.asarray(x, jnp.float32)
  k = jnp.round(x * np.float32(2 / np.pi))
  r = ((x - k * _PIO2[0]) - k * _PIO2[1]) - k * _PIO2[2]
  q = k.astype(jnp.int32) & 3
  s, c = sincos_reduced(r)
  swap = (q & 1) == 1
  sin = jnp.where(q >= 2, -1.0, 1.0) * jnp.where(swap, c, s)
  cos = jnp.where((q == 1) | (q == 2), -1.0, 1.0) * jnp.where(swap, s, c)
  return sin, cos


def uniform_from_bits(bits: chex.Array) -> jnp.ndarray:
  """Uniform float32 in [0, 1) from uint32 words (their top 24 bits)."""
  return (bits >> np.uint32(8)).astype(jnp.float32) * np.float32(2.0 ** -24)


def complex_normal_from_bits(bits: chex.Array) -> jnp.ndarray:
  """CN(0, 1) samples from uint32 words by Box & Muller (Ann. Math. Stat. 29(2), 1958).

  z = sqrt(-ln u1) e^{j 2 pi u2}, so |z|^2 ~ Exp(1) and the phase is uniform. u1 uses all
  32 bits, (w + 1/2) 2^-32, so the tail reaches |z|^2 = 22.9 (6.8 sigma per axis).

  Args:
    bits: uint32 [2 n].

  Returns:
    complex64 [n].
  """
  return jax.lax.complex(*normal_parts_from_bits(bits))


def normal_parts_from_bits(bits: chex.Array, turns: chex.Array | None = None
                           ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(real, imaginary) float32 parts of `complex_normal_from_bits`, each of variance 1/2.

  XLA:CPU vectorizes float32 loops and not complex64 ones, so the simulator works on the
  parts.

  Args:
    bits: uint32 [2 n] (radius words, then phase words), or [n] radius words when
      ``turns`` is given.
    turns: optional phases as float32 [n] fractions of a turn, uniform in [0, 1) (the
      simulator's noise takes them from 16-bit half words, 2^16 phases per turn, to hash
      fewer words).

  Returns:
    Two float32 [n] arrays.
  """
  n = bits.shape[0] if turns is not None else bits.shape[0] // 2
  u1 = (bits[:n].astype(jnp.float32) + np.float32(0.5)) * np.float32(2.0 ** -32)
  radius = jnp.sqrt(-jnp.log(u1))
  u2 = uniform_from_bits(bits[n:]) if turns is None else turns
  sin, cos = sincos(np.float32(2 * np.pi) * u2)
  return cos * radius, sin * radius
