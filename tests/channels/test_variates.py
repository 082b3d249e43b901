"""Tests of the random words and variates (compressjax/channels/variates.py).

References are JAX's own Threefry and key splitting, NumPy's sin/cos and closed-form
distributions; statistical checks use fixed seeds and state their level.
"""

import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from scipy import stats

from compressjax.channels import variates


def test_random_words_are_jax_threefry_of_counters():
  key = jax.random.key(11)
  n = 9
  want = jax.extend.random.threefry_2x32(
      jax.random.key_data(key), np.concatenate([np.arange(5), np.zeros(5)]).astype(np.uint32))
  np.testing.assert_array_equal(variates.random_words(key, n), np.asarray(want)[:n])
  np.testing.assert_array_equal(variates.random_words(jax.random.PRNGKey(11), n),
                                variates.random_words(key, n))               # raw uint32 keys
  rbg = jax.random.key(11, impl="rbg")                                   # other impls
  np.testing.assert_array_equal(variates.random_words(rbg, n), jax.random.bits(rbg, (n,)))


def test_split_is_jax_random_split_bit_for_bit():
  for key in (jax.random.key(12), jax.random.PRNGKey(12)):         # typed and raw keys
    got, want = jax.jit(lambda k: variates.split(k, 37))(key), jax.random.split(key, 37)
    if jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
      got, want = jax.random.key_data(got), jax.random.key_data(want)
    np.testing.assert_array_equal(got, want)
  rbg = jax.random.key(12, impl="rbg")
  np.testing.assert_array_equal(jax.random.key_data(variates.split(rbg, 5)),
                                jax.random.key_data(jax.random.split(rbg, 5)))


def test_sincos_matches_numpy():
  x = np.concatenate([np.linspace(-1e4, 1e4, 200_001), np.pi / 2 * np.arange(-8, 9)])
  x = x.astype(np.float32)
  s, c = jax.jit(variates.sincos)(x)
  np.testing.assert_allclose(np.asarray(s), np.sin(x.astype(np.float64)), rtol=0, atol=2.5e-7)
  np.testing.assert_allclose(np.asarray(c), np.cos(x.astype(np.float64)), rtol=0, atol=2.5e-7)


def test_complex_normal_from_bits_is_circular_standard_normal():
  n = 1 << 17
  bits = jax.random.bits(jax.random.key(1), (2 * n,), jnp.uint32)
  z = np.asarray(jax.jit(variates.complex_normal_from_bits)(bits)).astype(np.complex128)
  se = 1 / math.sqrt(n)
  assert abs(np.mean(np.abs(z) ** 2) - 1) < 5 * se            # Var |z|^2 = 1
  assert abs(np.mean(z)) < 5 * se
  assert abs(np.mean(z * z)) < 5 * se                         # circular
  # Kolmogorov-Smirnov at the 0.1% level: real part N(0, 1/2), |z|^2 Exp(1).
  assert stats.kstest(z.real, stats.norm(scale=math.sqrt(0.5)).cdf).pvalue > 1e-3
  assert stats.kstest(np.abs(z) ** 2, stats.expon.cdf).pvalue > 1e-3


def test_computed_once_returns_its_arguments_exactly():
  words = jax.random.bits(jax.random.key(16), (3, 5), jnp.uint32)
  x = jax.random.normal(jax.random.key(17), (3, 5))
  got_words, got_x = jax.jit(variates.computed_once)(words, x)
  np.testing.assert_array_equal(got_words, words)       # all 2^32 patterns pass unchanged
  np.testing.assert_array_equal(got_x, x)
  (one,) = jax.jit(jax.vmap(variates.computed_once))(x)  # vmapped over frames
  np.testing.assert_array_equal(one, x)


def test_sincos_reduced_matches_numpy_on_its_range():
  r = np.linspace(-np.pi / 4, np.pi / 4, 100_001).astype(np.float32)
  s, c = jax.jit(variates.sincos_reduced)(r)
  np.testing.assert_allclose(np.asarray(s), np.sin(r.astype(np.float64)), rtol=0, atol=1e-7)
  np.testing.assert_allclose(np.asarray(c), np.cos(r.astype(np.float64)), rtol=0, atol=1e-7)
