"""Closed-form error rates in AWGN and in Rayleigh/Rician flat fading (NumPy/SciPy).

All functions take SNRs in dB, are vectorized over them (any array shape, returned
as float64 arrays of that shape) and assume the Gray-coded constellations of
`compressjax.channels.constellations` with coherent detection and perfect CSI.

References:
  [PS] J. G. Proakis and M. Salehi, Digital Communications, 5th ed., McGraw-Hill,
       2008, Ch. 4 (AWGN) and Ch. 13 (flat fading).
  [SA] M. K. Simon and M.-S. Alouini, Digital Communication over Fading Channels,
       2nd ed., Wiley, 2005: Craig's form of Q (Ch. 4), the MGF approach (Chs. 5
       and 8), the Rician MGF (Ch. 2).
  [CY] K. Cho and D. Yoon, "On the general BER expression of one- and
       two-dimensional amplitude modulations", IEEE Trans. Commun. 50(7), 2002.
Equation numbers are left out on purpose: editions differ; the chapters are stable.

Fading model: the instantaneous SNR is gamma = |h|^2 * mean_snr with E|h|^2 = 1.
In the MGF form an AWGN error rate written as a Craig integral
(1/pi) int exp(-c gamma / sin^2 th) dth becomes (1/pi) int M_gamma(-c / sin^2 th) dth
[SA, Ch. 5]; the integrals are evaluated with ``scipy.integrate.quad``.
"""

import math
from typing import Callable

import numpy as np
from scipy import integrate, special

from compressjax.channels import constellations


def db_to_linear(db) -> np.ndarray:
  """Converts dB to a linear power ratio, 10^(db / 10)."""
  return np.power(10.0, np.asarray(db, dtype=np.float64) / 10.0)


def q_function(x) -> np.ndarray:
  """Gaussian tail Q(x) = P(N(0, 1) > x) = erfc(x / sqrt 2) / 2."""
  return 0.5 * special.erfc(np.asarray(x, dtype=np.float64) / math.sqrt(2.0))


def eb_n0_to_es_n0(eb_n0_db, m: int) -> np.ndarray:
  """Es/N0 in dB from Eb/N0 in dB for M points: Es/N0 = Eb/N0 * log2(M)."""
  return np.asarray(eb_n0_db, dtype=np.float64) + 10.0 * math.log10(math.log2(m))


def es_n0_to_eb_n0(es_n0_db, m: int) -> np.ndarray:
  """Eb/N0 in dB from Es/N0 in dB for M points (inverse of `eb_n0_to_es_n0`)."""
  return np.asarray(es_n0_db, dtype=np.float64) - 10.0 * math.log10(math.log2(m))


def _check_square(m: int) -> int:
  if m not in (4, 16, 64, 256):
    raise ValueError(f"M must be a square QAM order in (4, 16, 64, 256), got {m}")
  return m


def _check_psk(m: int) -> int:
  if m not in (2, 4, 8, 16, 32, 64):
    raise ValueError(f"M must be a PSK order in (2, 4, 8, 16, 32, 64), got {m}")
  return m


def qam_ser_awgn(m: int, es_n0_db) -> np.ndarray:
  """Symbol error rate of square M-QAM in AWGN [PS, Ch. 4].

  P = 1 - (1 - p)^2 with p = 2 (1 - 1/sqrt(M)) Q(sqrt(3 Es/N0 / (M - 1))).

  Args:
    m: constellation size, one of 4, 16, 64, 256.
    es_n0_db: Es/N0 in dB (array-like).

  Returns:
    SER, float64 array shaped like ``es_n0_db``.
  """
  _check_square(m)
  g = db_to_linear(es_n0_db)
  p = 2.0 * (1.0 - 1.0 / math.sqrt(m)) * q_function(np.sqrt(3.0 * g / (m - 1)))
  return p * (2.0 - p)  # = 1 - (1 - p)^2 without cancellation at high SNR


def psk_ser_awgn(m: int, es_n0_db) -> np.ndarray:
  """Symbol error rate of M-PSK in AWGN, exact.

  BPSK: Q(sqrt(2 Es/N0)); QPSK: 1 - (1 - Q(sqrt(Es/N0)))^2; otherwise Craig's
  integral (1/pi) int_0^{(M-1)pi/M} exp(-Es/N0 sin^2(pi/M) / sin^2 th) dth
  [SA, Ch. 8].

  Args:
    m: constellation size (2, 4, 8, ...).
    es_n0_db: Es/N0 in dB (array-like).

  Returns:
    SER, float64 array shaped like ``es_n0_db``.
  """
  _check_psk(m)
  g = db_to_linear(es_n0_db)
  if m == 2:
    return q_function(np.sqrt(2.0 * g))
  if m == 4:
    p = q_function(np.sqrt(g))
    return p * (2.0 - p)
  c = math.sin(math.pi / m) ** 2
  return _mgf_integral(lambda s, gb: np.exp(s * gb), g, c, (m - 1) * math.pi / m)


def bpsk_ber_awgn(eb_n0_db) -> np.ndarray:
  """Bit error rate of BPSK (and of Gray QPSK) in AWGN: Q(sqrt(2 Eb/N0)) [PS, Ch. 4].

  Args:
    eb_n0_db: Eb/N0 in dB (array-like).

  Returns:
    BER, float64 array shaped like ``eb_n0_db``.
  """
  return q_function(np.sqrt(2.0 * db_to_linear(eb_n0_db)))


def _cy_terms(m: int) -> list[tuple[float, float]]:
  """(weight, a) pairs with P_b = sum weight * erfc(a sqrt(Eb/N0)) for Gray M-QAM [CY]."""
  side = math.isqrt(_check_square(m))
  n_axis_bits = int(math.log2(side))
  a0 = math.sqrt(3.0 * math.log2(m) / (2.0 * (m - 1)))
  terms = []
  for k in range(1, n_axis_bits + 1):
    for i in range(int((1 - 2.0 ** -k) * side)):
      f = math.floor(i * 2 ** (k - 1) / side)
      w = (-1) ** f * (2 ** (k - 1) - math.floor(i * 2 ** (k - 1) / side + 0.5))
      terms.append((w / (side * n_axis_bits), (2 * i + 1) * a0))
  return terms


def qam_ber_awgn(m: int, eb_n0_db) -> np.ndarray:
  """Exact bit error rate of Gray-coded square M-QAM in AWGN [CY].

  Args:
    m: constellation size, one of 4, 16, 64, 256.
    eb_n0_db: Eb/N0 in dB (array-like).

  Returns:
    BER, float64 array shaped like ``eb_n0_db``.
  """
  g = db_to_linear(eb_n0_db)
  return sum(w * special.erfc(a * np.sqrt(g)) for w, a in _cy_terms(m))


def bpsk_ber_rayleigh(eb_n0_db) -> np.ndarray:
  """BER of BPSK in flat Rayleigh fading [PS, Ch. 13].

  P_b = (1 - sqrt(g / (1 + g))) / 2 with g the mean Eb/N0 (linear).

  Args:
    eb_n0_db: mean Eb/N0 in dB (array-like).

  Returns:
    BER, float64 array shaped like ``eb_n0_db``.
  """
  g = db_to_linear(eb_n0_db)
  return 0.5 * (1.0 - np.sqrt(g / (1.0 + g)))


def qpsk_ber_rayleigh(eb_n0_db) -> np.ndarray:
  """BER of Gray QPSK in flat Rayleigh fading; equal to BPSK at the same Eb/N0 [PS, Ch. 13].

  Args:
    eb_n0_db: mean Eb/N0 in dB (array-like).

  Returns:
    BER, float64 array shaped like ``eb_n0_db``.
  """
  return bpsk_ber_rayleigh(eb_n0_db)


def rician_mgf(s, mean_snr, k_factor_db: float) -> np.ndarray:
  """MGF E[exp(s gamma)] of the Rician-faded SNR [SA, Ch. 2].

  M(s) = (1 + K) / (1 + K - s g) exp(K s g / (1 + K - s g)), g = mean SNR (linear).
  K = 0 (``k_factor_db = -inf``) is Rayleigh, 1 / (1 - s g); ``+inf`` is AWGN, exp(s g).

  Args:
    s: MGF argument (real, <= 0 here), array-like.
    mean_snr: mean SNR, linear, broadcastable with ``s``.
    k_factor_db: Rician K-factor in dB.

  Returns:
    The MGF values, float64.
  """
  s = np.asarray(s, dtype=np.float64)
  g = np.asarray(mean_snr, dtype=np.float64)
  if np.isposinf(k_factor_db):
    return np.exp(s * g)
  k = float(db_to_linear(k_factor_db))
  den = 1.0 + k - s * g
  return (1.0 + k) / den * np.exp(k * s * g / den)


def _mgf_integral(mgf: Callable, gbar: np.ndarray, c: float, upper: float) -> np.ndarray:
  """(1/pi) int_0^upper mgf(-c / sin^2 th, gbar) dth, elementwise over ``gbar``."""
  flat = np.asarray(gbar, dtype=np.float64).reshape(-1)
  out = np.empty_like(flat)
  for n, gb in enumerate(flat):
    f = lambda th: mgf(-c / np.sin(th) ** 2, gb)
    out[n] = integrate.quad(f, 0.0, upper, epsabs=0.0, epsrel=1e-10, limit=200)[0] / math.pi
  return out.reshape(np.shape(gbar))


def _check_k(k_factor_db: float) -> float:
  k = float(k_factor_db)
  if math.isnan(k):
    raise ValueError(f"k_factor_db must be a number in [-inf, inf], got {k_factor_db}")
  return k


def ber_rician(modulation: str, eb_n0_db, k_factor_db: float) -> np.ndarray:
  """Exact BER of Gray square QAM / BPSK / QPSK in flat Rician fading (MGF form) [SA, Ch. 8].

  Each erfc(a sqrt(gamma)) term of the AWGN BER (BPSK: a = 1; Gray M-QAM [CY])
  is averaged over the fading as (2/pi) int_0^{pi/2} M_gamma(-a^2 / sin^2 th) dth.

  Args:
    modulation: "bpsk", "qpsk" or a square QAM name ("qam4", ..., "qam256").
    eb_n0_db: mean Eb/N0 in dB (array-like).
    k_factor_db: Rician K-factor in dB; -inf is Rayleigh, +inf is AWGN.

  Returns:
    BER, float64 array shaped like ``eb_n0_db``.

  Raises:
    ValueError: for 8-PSK (use `ser_rician`) or an unknown name or a NaN K.
  """
  constellations.check_modulation(modulation)
  k = _check_k(k_factor_db)
  if modulation == "psk8":
    raise ValueError("modulation must be one of ('bpsk', 'qpsk', 'qam4', 'qam16', 'qam64', "
                     "'qam256') for ber_rician, got 'psk8' (use ser_rician)")
  terms = [(0.5, 1.0)] if modulation in ("bpsk", "qpsk") else _cy_terms(
      constellations.order(modulation))
  g = db_to_linear(eb_n0_db)
  mgf = lambda s, gb: rician_mgf(s, gb, k)
  return sum(2.0 * w * _mgf_integral(mgf, g, a * a, math.pi / 2) for w, a in terms)


def ser_rician(modulation: str, es_n0_db, k_factor_db: float) -> np.ndarray:
  """Exact SER of any modulation in flat Rician fading (MGF form) [SA, Ch. 8].

  M-PSK: (1/pi) int_0^{(M-1)pi/M} M(-sin^2(pi/M) / sin^2 th) dth. Square M-QAM, with
  q = 1 - 1/sqrt(M) and c = 3 / (2 (M - 1)):
  (4q/pi) int_0^{pi/2} M(-c / sin^2 th) dth - (4q^2/pi) int_0^{pi/4} M(-c / sin^2 th) dth.
  With ``k_factor_db = inf`` these reduce to the AWGN SERs.

  Args:
    modulation: one of `constellations.MODULATIONS`.
    es_n0_db: mean Es/N0 in dB (array-like).
    k_factor_db: Rician K-factor in dB; -inf is Rayleigh, +inf is AWGN.

  Returns:
    SER, float64 array shaped like ``es_n0_db``.
  """
  constellations.check_modulation(modulation)
  k = _check_k(k_factor_db)
  m = constellations.order(modulation)
  g = db_to_linear(es_n0_db)
  mgf = lambda s, gb: rician_mgf(s, gb, k)
  if constellations.is_square_qam(modulation):
    q, c = 1.0 - 1.0 / math.sqrt(m), 3.0 / (2.0 * (m - 1))
    return (4.0 * q * _mgf_integral(mgf, g, c, math.pi / 2)
            - 4.0 * q * q * _mgf_integral(mgf, g, c, math.pi / 4))
  return _mgf_integral(mgf, g, math.sin(math.pi / m) ** 2, (m - 1) * math.pi / m)


def ser_awgn(modulation: str, es_n0_db) -> np.ndarray:
  """SER in AWGN of a named modulation (dispatches to `qam_ser_awgn` / `psk_ser_awgn`).

  Args:
    modulation: one of `constellations.MODULATIONS`.
    es_n0_db: Es/N0 in dB (array-like).

  Returns:
    SER, float64 array shaped like ``es_n0_db``.
  """
  constellations.check_modulation(modulation)
  m = constellations.order(modulation)
  if modulation.startswith("qam"):
    return qam_ser_awgn(m, es_n0_db)
  return psk_ser_awgn(m, es_n0_db)
