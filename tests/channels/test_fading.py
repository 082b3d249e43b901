"""Tests of power-delay profiles, Rician taps and Doppler (compressjax/channels/fading.py).

Statistical checks use fixed seeds; each states its tolerance in standard errors.
"""

import math

import jax
import numpy as np
import pytest
from scipy import special

from compressjax.channels import fading


def _draw(fn, n, seed=0):
  keys = jax.random.split(jax.random.key(seed), n)
  return np.asarray(jax.jit(jax.vmap(fn))(keys))


def test_exponential_pdp_decay_tail_and_cap():
  p = fading.exponential_pdp(50.0, 20e6)                 # tau = Ts: r = e^-1
  assert p.shape == (7,)                                 # e^-6 > 1e-3 >= e^-7
  np.testing.assert_allclose(p.sum(), 1.0)
  np.testing.assert_allclose(p[1:] / p[:-1], math.exp(-1.0))
  p = fading.exponential_pdp(100.0, 20e6)                # r = e^-1/2: e^-6.5 > 1e-3 >= e^-7
  assert p.shape == (14,)
  assert fading.exponential_pdp(300.0, 20e6).shape == (fading.MAX_DERIVED_TAPS,)
  assert fading.exponential_pdp(300.0, 20e6, num_taps=40).shape == (40,)
  np.testing.assert_array_equal(fading.exponential_pdp(0.0, 20e6, num_taps=3), [1.0, 0, 0])


def test_named_profiles():
  np.testing.assert_array_equal(fading.power_delay_profile("flat", 80.0, 20e6), [1.0])
  np.testing.assert_array_equal(fading.power_delay_profile("awgn", 80.0, 20e6, 2), [1.0, 0.0])
  with pytest.raises(ValueError, match="profile must be one of"):
    fading.power_delay_profile("tdl_x", 50.0, 20e6)
  # 38.901 Table 7.5-6 Part 3, InF-LOS: V/S = 72000 / 18000 = 4, lgDS = log10(118) - 9.35.
  np.testing.assert_allclose(fading.inf_los_delay_spread_ns(120, 60, 10), 52.71, atol=0.01)
  assert fading.inf_los_delay_spread_ns(300, 150, 20) > 52.71      # bigger hall, longer spread


def test_rms_delay_spread_and_mean_tap_powers():
  assert fading.rms_delay_spread_ns([1.0, 1.0], 20e6) == pytest.approx(25.0)   # Ts / 2
  assert fading.rms_delay_spread_ns([3.0], 20e6) == 0.0
  # Untruncated geometric profile r^t: std = sqrt(r) / (1 - r) samples, close to tau.
  r = math.exp(-0.25)
  p = fading.exponential_pdp(200.0, 20e6, num_taps=200)
  want = math.sqrt(r) / (1 - r) * 50.0
  assert fading.rms_delay_spread_ns(p, 20e6) == pytest.approx(want, rel=1e-9)
  assert want == pytest.approx(200.0, rel=0.01)
  pdp = np.array([0.5, 0.3, 0.2])
  np.testing.assert_allclose(fading.mean_tap_powers(pdp, 0.0), pdp)
  np.testing.assert_allclose(fading.mean_tap_powers(pdp, 4.0), [4.5 / 5, 0.3 / 5, 0.2 / 5])
  np.testing.assert_allclose(fading.mean_tap_powers(pdp, math.inf), [1.0, 0.0, 0.0])


def _k_factor_moments(h0, total_power):
  """Moment estimate of K (Greenstein et al., IEEE Commun. Lett. 3(6), 1999).

  |h|^2 of a Rician tap has mean nu^2 + s^2 and variance s^4 + 2 nu^2 s^2, so
  nu^2 = sqrt(mean^2 - var); K = nu^2 / (total scattered power).
  """
  p = np.abs(h0) ** 2
  nu2 = math.sqrt(max(p.mean() ** 2 - p.var(), 0.0))
  return nu2 / (total_power - nu2)


@pytest.mark.parametrize("k_db", [10.0, 3.0])
def test_block_taps_match_profile_and_k_factor(k_db):
  pdp = fading.exponential_pdp(50.0, 20e6)
  k = 10 ** (k_db / 10)
  n = 1 << 16
  h = _draw(lambda key: fading.block_taps(key, pdp, k), n).astype(np.complex128)
  assert h.shape == (n, 7)
  want = fading.mean_tap_powers(pdp, k)
  # Mean powers: each |h_t|^2 has std <= its mean, so 5 standard errors <= 2% of it.
  np.testing.assert_allclose(np.mean(np.abs(h) ** 2, 0), want, rtol=5 / math.sqrt(n))
  # The estimator's std at this n is 0.02-0.03 dB (20 seeds); 0.25 dB is > 8 of them.
  k_hat = _k_factor_moments(h[:, 0], np.mean(np.sum(np.abs(h) ** 2, 1)))
  assert abs(10 * math.log10(k_hat) - k_db) < 0.25
  assert abs(np.mean(h[:, 0])) < 5 / math.sqrt(n)             # uniform LOS phase
  assert abs(np.mean(h[:, 0] * np.conj(h[:, 1]))) < 5 * math.sqrt(want[0] * want[1] / n)


def test_rayleigh_block_taps_have_no_los():
  pdp = np.array([0.7, 0.3])
  h = _draw(lambda key: fading.block_taps(key, pdp, 0.0), 1 << 15)
  p = np.abs(h[:, 0]) ** 2
  # Rayleigh: |h|^2 is exponential, so var = mean^2 and the moment estimate of nu^2 is ~0.
  assert abs(p.var() / p.mean() ** 2 - 1) < 0.06
  assert _k_factor_moments(h[:, 0], 1.0) < 0.1


def test_clarke_basis_reproduces_j0_covariance():
  fd = 0.02
  c = fading.clarke_basis(fd, 64).astype(np.float64)
  lag = np.arange(64)
  want = special.j0(2 * np.pi * fd * np.abs(lag[:, None] - lag))
  np.testing.assert_allclose(c @ c.T, want, atol=2e-3)
  np.testing.assert_allclose(np.sum(c ** 2, 1), 1.0, rtol=1e-5)
  assert c.shape[1] < 64                                        # truncated, low rank
  assert fading.clarke_basis(1e-5, 64).shape[1] <= 2            # nearly constant process


@pytest.mark.parametrize("model, k_db", [("kl", None), ("sos", None), ("kl", 10.0)])
def test_doppler_autocorrelation_follows_j0(model, k_db):
  fd, seq, n = 0.01, 64, 8192
  k = 0.0 if k_db is None else 10 ** (k_db / 10)
  h = _draw(lambda key: fading.doppler_taps(key, np.ones(1), k, fd, seq, model, 8), n)
  assert h.shape == (n, seq, 1)
  g = h[..., 0].astype(np.complex128)
  lags = np.array([1, 8, 16, 24, 32, 48, 63])
  r = np.array([np.mean(g[:, d:] * np.conj(g[:, :seq - d])) for d in lags])
  # Each realization's lag product averages to a value of variance <= 1, so the standard
  # error over 8192 realizations is <= 0.011: a tolerance of 0.05 is >= 4.5 of them.
  np.testing.assert_allclose(r.real, special.j0(2 * np.pi * fd * lags), atol=0.05)
  np.testing.assert_allclose(r.imag, 0.0, atol=0.05)
  np.testing.assert_allclose(np.mean(np.abs(g) ** 2), 1.0, atol=0.03)


def test_doppler_taps_mean_powers_and_k_factor_per_sample():
  pdp = fading.exponential_pdp(50.0, 20e6)
  k = 10.0
  n = 1 << 14
  for model in fading.DOPPLER_MODELS:
    h = _draw(lambda key: fading.doppler_taps(key, pdp, k, 1e-3, 16, model), n, seed=3)
    assert h.shape == (n, 16, 7)
    want = fading.mean_tap_powers(pdp, k)
    np.testing.assert_allclose(np.mean(np.abs(h) ** 2, (0, 1)), want, rtol=0.05)
    # K from one time sample; its std at this n is about 0.13 dB: 0.6 dB is 4.5 of them.
    k_hat = _k_factor_moments(h[:, 5, 0], 1.0)
    assert abs(10 * math.log10(k_hat) - 10.0) < 0.6, model


@pytest.mark.parametrize("fd", [1e-4, 0.01])       # LOS turn below pi / 4 per frame, and above
def test_los_alone_is_a_unit_tone_at_a_random_doppler_shift(fd):
  seq, n = 64, 4096
  h = _draw(lambda key: fading.doppler_taps(key, np.ones(1), math.inf, fd, seq), n)
  h = h[..., 0].astype(np.complex128)
  np.testing.assert_allclose(np.abs(h), 1.0, atol=1e-6)
  # e^{j(phi0 + 2 pi fd cos(theta0) n)}: a constant step per frame; float32 phases leave
  # ~1e-7 rad of error per sample, < 1e-3 of the smallest step here.
  shift = np.angle(h[:, 1:] * np.conj(h[:, :-1])) / (2 * np.pi * fd)
  np.testing.assert_allclose(shift, np.broadcast_to(shift[:, :1], shift.shape), atol=2e-3)
  # cos(theta0) with theta0 uniform: mean 0 and mean square 1/2 (standard errors 0.011
  # and 0.0055 at this n: 5 of them); phi0 uniform: E h = 0 (standard error 1/64).
  c = shift[:, 0]
  assert np.all(np.abs(c) <= 1 + 2e-3)
  assert abs(c.mean()) < 0.055 and abs(np.mean(c ** 2) - 0.5) < 0.028
  assert abs(h[:, 0].mean()) < 5 / math.sqrt(n)
  # Against the closed form from the same words: theta0, phi0 from the top 24 bits of the
  # first two (as `doppler_taps` draws them).
  words = fading.doppler_taps_words(1, fd, seq)
  keys = jax.random.split(jax.random.key(0), n)[:16]                    # as `_draw`
  u = np.stack([np.asarray(jax.random.bits(k, (words,), np.uint32))[:2] >> 8 for k in keys])
  theta0, phi0 = (2 * np.pi * u * 2.0 ** -24).T
  want = np.exp(1j * (phi0[:, None] + 2 * np.pi * fd * np.cos(theta0)[:, None] * np.arange(seq)))
  np.testing.assert_allclose(h[:16], want, atol=1e-5)
