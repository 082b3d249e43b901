"""Tests of the closed-form error rates (compressjax/channels/theory.py).

Monte Carlo checks use plain NumPy with fixed seeds and assert that the error count
lies in the 99% binomial interval of the closed form (scipy.stats.binom.interval).
"""

import math

import numpy as np
import pytest
from scipy import stats

from compressjax.channels import constellations as cs
from compressjax.channels import theory


def _q(x):
  return 0.5 * math.erfc(x / math.sqrt(2.0))


def _assert_in_binomial_interval(errors, n, p, level=0.99):
  lo, hi = stats.binom.interval(level, n, p)
  assert lo <= errors <= hi, f"{errors} errors of {n} outside the {level} interval [{lo}, {hi}]"


def _awgn(rng, n, n0):
  return np.sqrt(n0 / 2) * (rng.normal(size=n) + 1j * rng.normal(size=n))


def test_snr_conversions():
  np.testing.assert_allclose(theory.eb_n0_to_es_n0(10.0, 16), 10.0 + 10 * math.log10(4))
  np.testing.assert_allclose(theory.eb_n0_to_es_n0(3.0, 2), 3.0)
  x = np.array([-3.0, 0.0, 7.5])
  np.testing.assert_allclose(theory.es_n0_to_eb_n0(theory.eb_n0_to_es_n0(x, 64), 64), x)


def test_qpsk_and_bpsk_awgn_closed_forms():
  for db in (0.0, 6.0, 12.0):
    g = 10 ** (db / 10)
    np.testing.assert_allclose(theory.bpsk_ber_awgn(db), _q(math.sqrt(2 * g)), rtol=1e-12)
    # QPSK with Gray labels: BER = Q(sqrt(2 Eb/N0)), SER = 2Q(sqrt(Es/N0)) - Q^2.
    np.testing.assert_allclose(theory.qam_ber_awgn(4, db), _q(math.sqrt(2 * g)), rtol=1e-12)
    p = _q(math.sqrt(g))
    np.testing.assert_allclose(theory.qam_ser_awgn(4, db), 2 * p - p * p, rtol=1e-12)
    np.testing.assert_allclose(theory.psk_ser_awgn(4, db), 2 * p - p * p, rtol=1e-12)
    np.testing.assert_allclose(theory.psk_ser_awgn(2, db), _q(math.sqrt(2 * g)), rtol=1e-12)


@pytest.mark.parametrize("name", ["qpsk", "psk8", "qam16", "qam64"])
def test_mgf_form_with_awgn_mgf_equals_awgn_closed_form(name):
  es = np.array([0.0, 10.0, 20.0])
  np.testing.assert_allclose(theory.ser_rician(name, es, np.inf), theory.ser_awgn(name, es),
                             rtol=1e-7)


def test_psk8_high_snr_approximation():
  es = np.array([15.0, 20.0])
  approx = 2 * theory.q_function(np.sqrt(2 * 10 ** (es / 10)) * math.sin(math.pi / 8))
  np.testing.assert_allclose(theory.psk_ser_awgn(8, es), approx, rtol=2e-3)


def test_rician_k_zero_is_rayleigh_and_large_k_is_awgn():
  eb = np.array([0.0, 10.0, 20.0])
  np.testing.assert_allclose(theory.ber_rician("bpsk", eb, -np.inf), theory.bpsk_ber_rayleigh(eb),
                             rtol=1e-8)
  np.testing.assert_allclose(theory.ber_rician("qpsk", eb, -np.inf), theory.qpsk_ber_rayleigh(eb),
                             rtol=1e-8)
  # At vanishing SNR a coin flip.
  np.testing.assert_allclose(theory.ber_rician("bpsk", -200.0, 10.0), 0.5, rtol=1e-6)
  eb_mid = np.array([4.0, 8.0])
  np.testing.assert_allclose(theory.ber_rician("bpsk", eb_mid, 40.0), theory.bpsk_ber_awgn(eb_mid),
                             rtol=2e-2)
  np.testing.assert_allclose(theory.ber_rician("qam16", eb_mid, 40.0),
                             theory.qam_ber_awgn(16, eb_mid), rtol=2e-2)
  # More LOS power -> fewer errors at the same mean SNR.
  bers = [float(theory.ber_rician("qpsk", 10.0, k)) for k in (-np.inf, 0.0, 10.0, 20.0)]
  assert all(a > b for a, b in zip(bers, bers[1:]))


def test_rayleigh_qam_ser_matches_alouini_closed_form():
  # Closed form of the Rayleigh M-QAM SER (Simon & Alouini, Ch. 8), written independently.
  m, es = 16, np.array([5.0, 15.0, 25.0])
  g = 10 ** (es / 10)
  c = 1.5 * g / (m - 1)
  q = 1 - 1 / math.sqrt(m)
  r = np.sqrt(c / (1 + c))
  ref = 2 * q * (1 - r) - q * q * (1 - (4 / np.pi) * r * np.arctan(1 / r))
  np.testing.assert_allclose(theory.ser_rician("qam16", es, -np.inf), ref, rtol=1e-7)


@pytest.mark.parametrize("m", [4, 16, 64])
def test_qam_ser_awgn_monte_carlo(m):
  rng = np.random.default_rng(m)
  side = int(math.isqrt(m))
  levels = np.arange(-(side - 1), side, 2.0)
  grid = (levels[:, None] + 1j * levels[None, :]).ravel() / math.sqrt(2 * (m - 1) / 3)
  n = 40_000
  for es_db in (6.0, 12.0, 18.0):
    sent = rng.integers(0, m, n)
    y = grid[sent] + _awgn(rng, n, 10 ** (-es_db / 10))
    det = np.argmin(np.abs(y[:, None] - grid[None]), axis=1)
    _assert_in_binomial_interval(np.sum(det != sent), n, float(theory.qam_ser_awgn(m, es_db)))


def test_psk8_ser_and_qam16_ber_monte_carlo():
  rng = np.random.default_rng(1)
  n = 40_000
  pts8 = np.exp(2j * np.pi * np.arange(8) / 8)
  for es_db in (8.0, 14.0):
    sent = rng.integers(0, 8, n)
    y = pts8[sent] + _awgn(rng, n, 10 ** (-es_db / 10))
    det = np.round(np.angle(y) / (2 * np.pi / 8)).astype(int) % 8
    _assert_in_binomial_interval(np.sum(det != sent), n, float(theory.psk_ser_awgn(8, es_db)))
  # Exact Gray 16-QAM BER [Cho & Yoon] against the library's Gray labelling.
  pts, bits = np.asarray(cs.constellation("qam16"), np.complex128), cs.bit_table("qam16")
  for eb_db in (4.0, 10.0):
    sent = rng.integers(0, 16, n)
    y = pts[sent] + _awgn(rng, n, 10 ** (-theory.eb_n0_to_es_n0(eb_db, 16) / 10))
    det = np.argmin(np.abs(y[:, None] - pts[None]), axis=1)
    errors = np.sum(bits[det] != bits[sent])
    # Bit errors within a symbol are dependent; the interval on 4n bits is then slightly
    # too narrow, so widen it to 99.9%.
    _assert_in_binomial_interval(errors, 4 * n, float(theory.qam_ber_awgn(16, eb_db)), 0.999)


@pytest.mark.parametrize("k_db", [-np.inf, 10.0])
def test_bpsk_fading_ber_monte_carlo(k_db):
  rng = np.random.default_rng(7)
  n = 100_000
  k = 0.0 if np.isneginf(k_db) else 10 ** (k_db / 10)
  for eb_db in (0.0, 10.0):
    h = math.sqrt(k / (k + 1)) + math.sqrt(1 / (k + 1)) * _awgn(rng, n, 1.0)
    b = rng.integers(0, 2, n)
    y = h * (1 - 2 * b) + _awgn(rng, n, 10 ** (-eb_db / 10))
    det = (np.real(np.conj(h) * y) < 0).astype(int)
    _assert_in_binomial_interval(np.sum(det != b), n, float(theory.ber_rician("bpsk", eb_db, k_db)))


def test_qam16_ser_rician_monte_carlo():
  rng = np.random.default_rng(3)
  n, k = 40_000, 10 ** (10.0 / 10)
  pts = np.asarray(cs.constellation("qam16"), np.complex128)
  for es_db in (10.0, 20.0):
    h = math.sqrt(k / (k + 1)) + math.sqrt(1 / (k + 1)) * _awgn(rng, n, 1.0)
    sent = rng.integers(0, 16, n)
    y = h * pts[sent] + _awgn(rng, n, 10 ** (-es_db / 10))
    det = np.argmin(np.abs((y / h)[:, None] - pts[None]), axis=1)
    _assert_in_binomial_interval(np.sum(det != sent), n,
                                 float(theory.ser_rician("qam16", es_db, 10.0)))


def test_vectorized_shapes():
  es = np.zeros((2, 3))
  assert theory.qam_ser_awgn(16, es).shape == (2, 3)
  assert theory.psk_ser_awgn(8, es).shape == (2, 3)
  assert theory.ber_rician("qpsk", es, 5.0).shape == (2, 3)
  assert theory.ser_rician("qam64", es, -np.inf).shape == (2, 3)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match=r"square QAM order in \(4, 16, 64, 256\), got 8"):
    theory.qam_ser_awgn(8, 10.0)
  with pytest.raises(ValueError, match="M must be a PSK order"):
    theory.psk_ser_awgn(3, 10.0)
  with pytest.raises(ValueError, match="got 'psk8'"):
    theory.ber_rician("psk8", 10.0, 3.0)
  with pytest.raises(ValueError, match="k_factor_db"):
    theory.ser_rician("qam16", 10.0, float("nan"))
  with pytest.raises(ValueError, match="modulation must be one of"):
    theory.ser_awgn("qam8", 10.0)
