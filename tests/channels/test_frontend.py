"""The model-based front end: LS taps, noise estimate, FIR MMSE equalizer, feature layout."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax import channels
from compressjax.channels import frontend

CFG = channels.ChannelConfig(modulation="qam16", seq_len=64, num_pilots=8, profile="inf_los",
                             num_taps=4, doppler_hz=0.0, snr_db=20.0)
T, P, L = 4, 8, 64
PRIOR = tuple(float(p) for p in CFG.tap_powers)
# Every test draws N frames of CFG (at its own SNR and seed), so the simulator compiles once
# and the front end twice (LS and LMMSE taps); the tests are compile-bound, not compute-bound.
N = 1000
_pilot_features = jax.jit(frontend.pilot_features, static_argnums=(1, 2, 3))
_fir = jax.jit(jax.vmap(lambda y, h, n0: frontend.fir_mmse_equalize(y, h, n0, 6 * T, 2 * T)))


def _complex(iq):
  return np.asarray(iq[..., 0]) + 1j * np.asarray(iq[..., 1])


@functools.lru_cache
def _frames(seed, snr_db):
  return channels.simulate(jax.random.key(seed), dataclasses.replace(CFG, snr_db=snr_db), N,
                           "symbols")


@functools.lru_cache
def _features(seed, snr_db, prior=None):
  return np.asarray(_pilot_features(_frames(seed, snr_db).iq, P, T, prior))


@functools.lru_cache
def _fir_true_channel(seed, snr_db):
  """The FIR equalizer of every frame, designed for its true taps and N0."""
  b = _frames(seed, snr_db)
  return _fir(jnp.asarray(_complex(b.iq), jnp.complex64), b.taps, b.noise_var)


def test_feature_count_and_layout():
  assert frontend.num_features("raw", T) == 2
  assert frontend.num_features("pilots", T) == 12 + 2 * T
  with pytest.raises(ValueError, match="tap_powers must be None or 4"):
    frontend.pilot_features(jnp.zeros((1, L, 2)), P, T, (1.0, 0.0))
  b, f = _frames(3, 20.0), _features(3, 20.0)
  assert f.shape == (N, L, 12 + 2 * T)
  np.testing.assert_array_equal(f[..., :2], np.asarray(b.iq))        # raw samples first
  np.testing.assert_array_equal(f[0, :, 10], np.arange(L) < P)        # pilot marker
  # Per-frame features repeat at every sample.
  np.testing.assert_array_equal(f[:, :, 11:], np.broadcast_to(f[:, :1, 11:], f[:, :, 11:].shape))
  x = f[..., 2] + 1j * f[..., 3]
  np.testing.assert_allclose(f[..., 4] + 1j * f[..., 5], x ** 2, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(f[..., 8], np.abs(x) ** 2, rtol=1e-4, atol=1e-5)
  assert np.array_equal(frontend.features(b.iq, "raw", P, T), b.iq)


def test_noiseless_frame_gives_the_true_taps_exactly():
  f = _features(1, 200.0)   # 200 dB: N0 = 1e-20, no noise in float32
  h = f[:, 0, 12:12 + T] + 1j * f[:, 0, 12 + T:]
  np.testing.assert_allclose(h, np.asarray(_frames(1, 200.0).taps), atol=2e-5)


def test_equalizer_error_matches_its_reported_sinr():
  # For the unbiased MMSE output E|x_hat - x|^2 = 1 / SINR (noise and residual ISI), at
  # every position, the frame's tail included: the mean of |x_hat - x|^2 SINR over 1000
  # frames at 20 dB with the true taps and N0 is 1 within 10%.
  b = _frames(3, 20.0)
  x_hat, sinr = _fir_true_channel(3, 20.0)
  err = np.abs(np.asarray(x_hat) - np.asarray(channels.transmitted_symbols(b, CFG))) ** 2
  scaled = err * np.asarray(sinr)
  assert 0.9 < scaled.mean() < 1.1, scaled.mean()
  assert 0.8 < scaled[:, -2 * T:].mean() < 1.2, scaled[:, -2 * T:].mean()   # the tail


def test_lmmse_taps_match_the_reference_estimator():
  # With a prior, the front end's taps are receivers.lmmse_channel_estimate with N0_hat.
  b, f = _frames(4, 5.0), _features(4, 5.0, PRIOR)
  y = jnp.asarray(_complex(b.iq)[:, :P], jnp.complex64)
  want = jax.jit(jax.vmap(channels.lmmse_channel_estimate, in_axes=(0, None, None, 0)))(
      y, channels.pilot_symbols(P), np.asarray(PRIOR, np.float32), 10.0 ** f[:, 0, 11])
  np.testing.assert_allclose(f[:, 0, 12:12 + T] + 1j * f[:, 0, 12 + T:], want, atol=2e-5)


def test_noise_estimate_is_unbiased():
  # N0_hat = |residual|^2 / (P - T) is unbiased: its mean over N = 1000 frames is within 4
  # standard errors of N0 (each estimate is N0 * chi2(2 (P - T)) / (2 (P - T))). Dividing
  # by P - T + 1 instead (a 20% bias) would miss by 12 of them.
  n0 = 10.0 ** _features(2, 10.0)[:, 0, 11]
  true = float(np.asarray(_frames(2, 10.0).noise_var)[0])
  se = true / np.sqrt(P - T) / np.sqrt(N)
  assert abs(n0.mean() - true) < 4 * se, (n0.mean(), true)


def _window_matrix(h, window):
  t = h.size
  hw = np.zeros((window, window + t - 1), complex)
  for k in range(window):
    for j in range(window + t - 1):
      if 0 <= k - j + t - 1 < t:
        hw[k, j] = h[k - j + t - 1]
  return hw


def _mmse(hw, col, n0, yw):
  r = hw @ hw.conj().T + n0 * np.eye(hw.shape[0])
  w = np.linalg.solve(r, hw[:, col])
  mu = np.real(np.vdot(hw[:, col], w))
  return np.vdot(w, yw) / mu, mu / (1 - mu)


def _numpy_fir(y, h, n0, window, lookback):
  """The sliding MMSE equalizer written out window by window, in float64."""
  t, seq = h.size, y.size
  tail, span = window - 1 - lookback, window - 1
  out, sinr = np.zeros(seq, complex), np.zeros(seq)
  for n in range(seq - tail):
    yw = np.array([y[n - lookback + k] if 0 <= n - lookback + k < seq else 0
                   for k in range(window)])
    out[n], sinr[n] = _mmse(_window_matrix(h, window), lookback + t - 1, n0, yw)
  for n in range(seq - tail, seq):   # symbols x[L - S - T + 1 + j] from the last S samples
    j = n - (seq - span - t + 1)
    out[n], sinr[n] = _mmse(_window_matrix(h, span), j, n0, y[seq - span:])
  return out, sinr


def test_fir_equalizer_matches_numpy():
  rng = np.random.default_rng(0)
  h = (rng.normal(size=T) + 1j * rng.normal(size=T)) / np.sqrt(2 * T)
  y = rng.normal(size=L) + 1j * rng.normal(size=L)
  shapes = ((24, 8), (5, 0), (7, 5))
  got = jax.jit(lambda y, h: [frontend.fir_mmse_equalize(y, h, 0.05, w, a) for w, a in shapes])(
      jnp.asarray(y, jnp.complex64), jnp.asarray(h, jnp.complex64))
  for (window, lookback), (got_x, got_s) in zip(shapes, got):
    want_x, want_s = _numpy_fir(y, h, 0.05, window, lookback)
    np.testing.assert_allclose(np.asarray(got_x), want_x, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(np.asarray(got_s), want_s, rtol=2e-3)
  with pytest.raises(ValueError, match="lookback"):
    frontend.fir_mmse_equalize(jnp.asarray(y, jnp.complex64), jnp.asarray(h, jnp.complex64),
                               0.05, 7, 6)


def test_fir_equalizer_is_close_to_the_full_block_mmse():
  # With the true taps at 20 dB on the default link, the sliding 6T-sample equalizer's SER
  # is within 1.5x of the L x L MMSE equalizer's (and far below a one-tap de-rotation's).
  n, b = N, _frames(3, 20.0)
  y = jnp.asarray(_complex(b.iq), jnp.complex64)
  full = jax.jit(jax.vmap(
      lambda y, h, n0: channels.equalize_and_detect(y, h, n0, "qam16").symbols))(
          y, b.taps, b.noise_var)
  x_fir, _ = _fir_true_channel(3, 20.0)
  one_tap = channels.detect(y / b.taps[:, :1], "qam16")
  data = ~np.asarray(b.pilot_mask)
  ser = lambda s: float(((np.asarray(s) != np.asarray(b.symbols)) * data).sum()
                        / (n * data.sum()))
  s_full, s_fir, s_one = ser(full), ser(channels.detect(x_fir, "qam16")), ser(one_tap)
  assert s_fir <= 1.5 * s_full + 1e-3, (s_fir, s_full)
  assert s_fir < 0.5 * s_one, (s_fir, s_one)


@pytest.mark.parametrize("num_pilots, num_taps", [(4, 4), (3, 4), (8, 0)])
def test_bad_pilot_counts_are_rejected(num_pilots, num_taps):
  with pytest.raises(ValueError, match="num_pilots must exceed num_taps"):
    frontend.pilot_features(jnp.zeros((1, 16, 2)), num_pilots, num_taps)


def test_unknown_frontend_is_rejected():
  with pytest.raises(ValueError, match="frontend must be one of"):
    frontend.num_features("fft", 4)


def test_cholesky_solve_matches_numpy():
  rng = np.random.default_rng(1)
  systems = []
  for n, k in ((1, 1), (8, 1), (23, 15)):
    m = rng.normal(size=(n, n)) + 1j * rng.normal(size=(n, n))
    systems.append((m @ m.conj().T + 0.1 * np.eye(n),
                    rng.normal(size=(n, k)) + 1j * rng.normal(size=(n, k))))
  got = jax.jit(lambda systems: [frontend.cholesky_solve(a, b) for a, b in systems])(
      jax.tree.map(lambda x: jnp.asarray(x, jnp.complex64), systems))
  for (a, b), x in zip(systems, got):
    np.testing.assert_allclose(np.asarray(x), np.linalg.solve(a, b), rtol=2e-3, atol=2e-3)


def test_equalized_symbols_are_clipped_in_a_deep_fade():
  # Frames at -30 dB: the estimated channel is noise, mu is tiny and the unbiased output
  # huge; the features stay bounded (|x_hat| <= X_CLIP) and finite.
  f = _features(6, -30.0, PRIOR)
  assert np.all(np.isfinite(f))
  mag = np.abs(f[..., 2] + 1j * f[..., 3])
  assert mag.max() <= frontend.X_CLIP * (1 + 1e-5)
  assert np.abs(f[..., 6:8]).max() <= frontend.X_CLIP ** 4 / 4 * (1 + 1e-4)
