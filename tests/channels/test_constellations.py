"""Tests of the Gray-coded constellations (compressjax/channels/constellations.py)."""

import chex
import jax
import numpy as np
import pytest

from compressjax.channels import constellations as cs


@pytest.mark.parametrize("name", cs.MODULATIONS)
def test_unit_energy_and_shape(name):
  pts = np.asarray(cs.constellation(name))
  assert pts.dtype == np.complex64
  chex.assert_shape(pts, (cs.order(name),))
  np.testing.assert_allclose(np.mean(np.abs(pts) ** 2), 1.0, rtol=1e-6)
  assert len(np.unique(np.round(pts, 5))) == cs.order(name)


@pytest.mark.parametrize("name", cs.MODULATIONS)
def test_gray_nearest_neighbours_differ_in_one_bit(name):
  pts = np.asarray(cs.constellation(name), np.complex128)
  d = np.abs(pts[:, None] - pts[None, :])
  np.fill_diagonal(d, np.inf)
  dmin = d.min()
  i, j = np.nonzero(d < dmin * (1 + 1e-4))
  assert len(i) >= cs.order(name)  # every point has at least one nearest neighbour
  hamming = np.array([bin(a ^ b).count("1") for a, b in zip(i, j)])
  np.testing.assert_array_equal(hamming, 1)


def test_known_points():
  s = 1 / np.sqrt(10)
  qam16 = np.asarray(cs.constellation("qam16"))
  # PAM axis levels -3, -1, +1, +3 carry the Gray labels 00, 01, 11, 10 (I = 2 MSBs, Q = 2 LSBs).
  for bits, point in [(0b0000, -3 - 3j), (0b1111, 1 + 1j), (0b1110, 1 + 3j), (0b1010, 3 + 3j),
                      (0b0111, -1 + 1j), (0b1000, 3 - 3j)]:
    np.testing.assert_allclose(qam16[bits], point * s, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(cs.constellation("bpsk")), [1, -1], atol=1e-7)
  np.testing.assert_allclose(np.asarray(cs.constellation("qpsk")),
                             np.asarray(cs.constellation("qam4")))


@pytest.mark.parametrize("name", cs.MODULATIONS)
def test_bits_index_point_round_trip(name):
  m, k = cs.order(name), cs.bits_per_symbol(name)
  idx = np.arange(m)
  bits = np.asarray(cs.indices_to_bits(idx, name))
  chex.assert_shape(bits, (m, k))
  ref = np.array([[int(c) for c in format(i, f"0{k}b")] for i in idx])  # MSB first
  np.testing.assert_array_equal(bits, ref)
  np.testing.assert_array_equal(np.asarray(cs.bits_to_indices(bits, name)), idx)
  np.testing.assert_array_equal(np.asarray(cs.detect(cs.modulate(idx, name), name)), idx)
  np.testing.assert_array_equal(cs.bit_table(name), ref)


@pytest.mark.parametrize("name", cs.MODULATIONS)
def test_fast_detect_equals_bruteforce(name):
  rng = np.random.default_rng(0)
  y = (rng.normal(size=4000) + 1j * rng.normal(size=4000)) * 0.9
  y[:50] *= 5.0  # far outside the grid: clipping at the edges
  fast = np.asarray(jax.jit(cs.detect, static_argnums=1)(y, name))
  pts = np.asarray(cs.constellation(name), np.complex128)
  brute = np.argmin(np.abs(y[:, None] - pts[None]) ** 2, axis=1)
  np.testing.assert_array_equal(fast, brute)
  assert fast.dtype == np.int32


def test_batched_shapes():
  idx = np.arange(24).reshape(2, 3, 4) % 16
  y = cs.modulate(idx, "qam16")
  chex.assert_shape(y, (2, 3, 4))
  chex.assert_shape(cs.indices_to_bits(idx, "qam16"), (2, 3, 4, 4))
  chex.assert_shape(cs.detect(y, "qam16"), (2, 3, 4))


def test_bad_name_raises():
  with pytest.raises(ValueError, match=r"modulation must be one of .*got 'qam8'"):
    cs.constellation("qam8")
  with pytest.raises(ValueError, match="modulation"):
    cs.order("QAM16")
  assert cs.order("qam64") == 64 and cs.bits_per_symbol("qam256") == 8
