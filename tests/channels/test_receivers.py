"""Tests of the classical receivers (compressjax/channels/receivers.py)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from compressjax.channels import constellations as cs
from compressjax.channels import receivers as rx


def _cn(rng, *shape, var=1.0):
  return np.sqrt(var / 2) * (rng.normal(size=shape) + 1j * rng.normal(size=shape))


def _qpsk(rng, n):
  return np.asarray(cs.modulate(rng.integers(0, 4, n), "qpsk"), np.complex128)


def test_convolution_and_channel_matrices_match_numpy():
  rng = np.random.default_rng(0)
  x, h = _cn(rng, 12), _cn(rng, 3)
  xm = np.asarray(rx.convolution_matrix(jnp.asarray(x, jnp.complex64), 3))
  chex.assert_shape(xm, (12, 3))
  np.testing.assert_allclose(xm @ h, np.convolve(x, h)[:12], rtol=1e-5, atol=1e-6)
  hm = np.asarray(rx.channel_matrix(jnp.asarray(h, jnp.complex64), 12))
  np.testing.assert_allclose(hm @ x, np.convolve(x, h)[:12], rtol=1e-5, atol=1e-6)
  # Time-varying taps: y[n] = sum_t h[n, t] x[n - t].
  hv = _cn(rng, 12, 3)
  ref = np.array([sum(hv[n, t] * x[n - t] for t in range(3) if n - t >= 0) for n in range(12)])
  hvm = np.asarray(rx.channel_matrix(jnp.asarray(hv, jnp.complex64), 12))
  np.testing.assert_allclose(hvm @ x, ref, rtol=1e-5, atol=1e-6)


def test_ls_recovers_taps_without_noise():
  rng = np.random.default_rng(1)
  x, h = _qpsk(rng, 16), _cn(rng, 4)
  y = np.convolve(x, h)[:16]
  est = rx.ls_channel_estimate(jnp.asarray(y, jnp.complex64), jnp.asarray(x, jnp.complex64), 4)
  np.testing.assert_allclose(np.asarray(est), h, rtol=1e-4, atol=1e-5)


def _lmmse_numpy(y, x, p, n0):
  xm = np.array([[x[n - t] if n - t >= 0 else 0 for t in range(len(p))] for n in range(len(x))])
  r = np.diag(p)
  return r @ xm.conj().T @ np.linalg.solve(xm @ r @ xm.conj().T + n0 * np.eye(len(x)), y)


def test_lmmse_matches_numpy_and_beats_ls_at_low_snr():
  rng = np.random.default_rng(2)
  num, p_len, n0 = 400, 8, 10 ** (0.0 / 10)
  powers = np.exp(-np.arange(4) / 1.5)
  powers /= powers.sum()
  x = _qpsk(rng, p_len)
  h = _cn(rng, num, 4) * np.sqrt(powers)
  y = np.stack([np.convolve(x, hi)[:p_len] for hi in h]) + _cn(rng, num, p_len, var=n0)
  c64 = lambda a: jnp.asarray(a, jnp.complex64)
  lmmse = jax.jit(jax.vmap(rx.lmmse_channel_estimate, in_axes=(0, None, None, None)))(
      c64(y), c64(x), jnp.asarray(powers, jnp.float32), n0)
  ls = jax.jit(jax.vmap(rx.ls_channel_estimate, in_axes=(0, None, None)), static_argnums=2)(
      c64(y), c64(x), 4)
  ref = _lmmse_numpy(y[0], x, powers, n0)
  np.testing.assert_allclose(np.asarray(lmmse[0]), ref, rtol=1e-4, atol=1e-5)
  mse_lmmse = np.mean(np.abs(np.asarray(lmmse) - h) ** 2)
  mse_ls = np.mean(np.abs(np.asarray(ls) - h) ** 2)
  assert mse_lmmse < 0.7 * mse_ls, (mse_lmmse, mse_ls)


def _tdl_frame(rng, length=24, num_taps=3, name="qam16"):
  # |h1| + |h2| < |h0|: minimum phase, so the triangular H is well conditioned.
  taps = np.array([1.0, 0.5, 0.25][:num_taps]) * np.exp(2j * np.pi * rng.random(num_taps))
  idx = rng.integers(0, cs.order(name), length)
  x = np.asarray(cs.modulate(idx, name), np.complex128)
  return taps, idx, x, np.convolve(x, taps)[:length]


def test_zf_inverts_known_channel():
  rng = np.random.default_rng(3)
  taps, _, x, y = _tdl_frame(rng)
  hm = rx.channel_matrix(jnp.asarray(taps, jnp.complex64), 24)
  np.testing.assert_allclose(np.asarray(rx.zf_equalize(jnp.asarray(y, jnp.complex64), hm)), x,
                             rtol=1e-4, atol=1e-4)


def test_mmse_matches_numpy_reference():
  rng = np.random.default_rng(4)
  taps, _, _, y = _tdl_frame(rng)
  n0 = 0.2
  y = y + _cn(rng, 24, var=n0)
  hm = np.asarray(rx.channel_matrix(jnp.asarray(taps, jnp.complex64), 24), np.complex128)
  w = np.linalg.solve(hm @ hm.conj().T + n0 * np.eye(24), hm)
  mu = np.real(np.sum(w.conj() * hm, axis=0))
  x_hat, sinr = rx.mmse_equalize(jnp.asarray(y, jnp.complex64), jnp.asarray(hm, jnp.complex64), n0)
  np.testing.assert_allclose(np.asarray(x_hat), (w.conj().T @ y) / mu, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(np.asarray(sinr), mu / (1 - mu), rtol=1e-3)



def test_mmse_output_is_unbiased_with_error_variance_one_over_sinr():
  rng = np.random.default_rng(9)
  taps, _, _, _ = _tdl_frame(rng, 16, 3, "qpsk")
  n0, draws = 0.3, 3000
  hm = rx.channel_matrix(jnp.asarray(taps, jnp.complex64), 16)
  x = _qpsk(rng, draws * 16).reshape(draws, 16)
  y = x @ np.asarray(hm, np.complex128).T + _cn(rng, draws, 16, var=n0)
  x_hat, sinr = jax.jit(jax.vmap(rx.mmse_equalize, in_axes=(0, None, None)))(
      jnp.asarray(y, jnp.complex64), hm, n0)
  err = np.asarray(x_hat, np.complex128) - x
  # 3000 draws per position: the standard error of the gain is ~0.01 and of the
  # variance ~2.6% (relative), so 5 and 10% tolerances are > 3.5 sigma.
  np.testing.assert_allclose(np.mean(np.asarray(x_hat) * np.conj(x), axis=0), 1.0, atol=0.05)
  np.testing.assert_allclose(np.mean(np.abs(err) ** 2, axis=0), 1.0 / np.asarray(sinr[0]),
                             rtol=0.1)


@pytest.mark.parametrize("name", ["bpsk", "psk8", "qam16", "qam64"])
def test_ml_detect_and_llrs_against_bruteforce(name):
  rng = np.random.default_rng(5)
  n, n0 = 300, 0.3
  pts = np.asarray(cs.constellation(name), np.complex128)
  bits = cs.bit_table(name)
  g = _cn(rng, n)
  y = g * pts[rng.integers(0, len(pts), n)] + _cn(rng, n, var=n0)
  metric = -np.abs(y[:, None] - g[:, None] * pts[None]) ** 2 / n0  # [n, M]
  yj, gj = jnp.asarray(y, jnp.complex64), jnp.asarray(g, jnp.complex64)
  det = np.asarray(rx.ml_detect(yj, gj, name))
  np.testing.assert_array_equal(det, np.argmax(metric, axis=1))
  exact = np.asarray(rx.llr_exact(yj, gj, n0, name))
  maxlog = np.asarray(rx.llr_maxlog(yj, gj, n0, name))
  chex.assert_shape([exact, maxlog], (n, cs.bits_per_symbol(name)))
  for j in range(bits.shape[1]):
    zero, one = bits[:, j] == 0, bits[:, j] == 1
    ref = logsumexp(metric[:, zero], axis=1) - logsumexp(metric[:, one], axis=1)
    np.testing.assert_allclose(exact[:, j], ref, rtol=1e-3, atol=1e-3)
    ref_ml = metric[:, zero].max(axis=1) - metric[:, one].max(axis=1)
    np.testing.assert_allclose(maxlog[:, j], ref_ml, rtol=1e-3, atol=1e-3)
  # Sign convention: LLR = log P(b=0)/P(b=1), so bit = LLR < 0 reproduces the ML decision.
  np.testing.assert_array_equal((maxlog < 0).astype(int), bits[det])


def test_perfect_csi_flat_is_nearest_point_of_y_over_h():
  rng = np.random.default_rng(6)
  name, n0 = "qam16", 0.05
  idx = rng.integers(0, 16, 32)
  x = np.asarray(cs.modulate(idx, name), np.complex128)
  pts = np.asarray(cs.constellation(name), np.complex128)
  for taps in (_cn(rng, 1), _cn(rng, 32, 1)):  # block and time-varying flat fading
    g = taps[..., 0]
    y = g * x + _cn(rng, 32, var=n0)
    det = rx.perfect_csi_detect(jnp.asarray(y, jnp.complex64), jnp.asarray(taps, jnp.complex64),
                                n0, name)
    ref = np.argmin(np.abs((y / g)[:, None] - pts[None]), axis=1)
    np.testing.assert_array_equal(np.asarray(det), ref)


def test_receivers_recover_noiseless_multipath_frame_under_jit_and_vmap():
  rng = np.random.default_rng(8)
  name, length, p_len, n0 = "qam16", 24, 8, 1e-4
  frames = [_tdl_frame(rng, length, 3, name) for _ in range(3)]
  pilots = _qpsk(rng, p_len)
  xs, ys, idxs = [], [], []
  for taps, idx, x, _ in frames:
    x = x.copy()
    x[:p_len] = pilots
    xs.append(x)
    ys.append(np.convolve(x, taps)[:length])
    idxs.append(idx)
  y = jnp.asarray(np.stack(ys), jnp.complex64)
  pj = jnp.asarray(pilots, jnp.complex64)
  ls = jax.jit(jax.vmap(functools.partial(rx.ls_receiver, num_taps=3, noise_var=n0, name=name),
                        in_axes=(0, None)))(y, pj)
  powers = jnp.asarray([1.0, 0.25, 0.0625], jnp.float32)
  lm = jax.jit(jax.vmap(rx.lmmse_receiver, in_axes=(0, None, None, None, None)),
               static_argnums=4)(y, pj, powers, n0, name)
  true_taps = jnp.asarray(np.stack([f[0] for f in frames]), jnp.complex64)
  pc = jax.vmap(rx.equalize_and_detect, in_axes=(0, 0, None, None))(y, true_taps, n0, name)
  for out in (ls, lm, pc):
    chex.assert_shape([out.symbols, out.x_hat, out.sinr], (3, length))
    chex.assert_shape(out.llr, (3, length, 4))
    np.testing.assert_array_equal(np.asarray(out.symbols)[:, p_len:], np.stack(idxs)[:, p_len:])
    np.testing.assert_allclose(np.asarray(out.taps), np.asarray(true_taps), atol=2e-2)
  assert out.symbols.dtype == jnp.int32 and out.llr.dtype == jnp.float32
