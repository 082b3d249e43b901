"""Classical receivers for one frame: channel estimation, equalization, detection, LLRs.

Frame model (see the channel contract): y[n] = sum_t h[n, t] x[n - t] + w[n] with zero
history (x[n < 0] = 0), unit-energy symbols and w ~ CN(0, N0). Every function handles
ONE example with static shapes; callers ``jax.vmap`` over a batch. All are pure jnp
and jit-able (the modulation name and tap count are static Python values).

LLR sign convention: LLR_b = log P(b = 0 | y) / P(b = 1 | y) with equiprobable
symbols, so a positive LLR favours bit 0 (hard decision: bit = LLR < 0).

References: S. M. Kay, Fundamentals of Statistical Signal Processing: Estimation
Theory, 1993 (LS Ch. 8, LMMSE Ch. 12); Proakis & Salehi, Digital Communications,
5th ed. (linear equalizers, Sec. 9.4); Robertson, Villebrun and Hoeher, "A comparison
of optimal and sub-optimal MAP decoding algorithms ...", ICC 1995 (max-log).
"""

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from compressjax.channels import constellations


class ReceiverOutput(NamedTuple):
  """What a receiver returns for one frame of length L (k bits per symbol, T taps).

  Attributes:
    symbols: int32 [L] detected symbol indices (pilot positions included; mask them).
    llr: float32 [L, k] max-log bit LLRs, log P(b=0)/P(b=1).
    x_hat: complex64 [L] unbiased equalizer output.
    sinr: float32 [L] post-equalizer SINR of ``x_hat`` (linear).
    taps: complex64 [T] the channel taps the receiver used (time average if given [L, T]).
  """
  symbols: jnp.ndarray
  llr: jnp.ndarray
  x_hat: jnp.ndarray
  sinr: jnp.ndarray
  taps: jnp.ndarray


def convolution_matrix(x: chex.Array, num_taps: int) -> jnp.ndarray:
  """Convolution (Toeplitz) matrix of a sequence, zero history.

  Args:
    x: complex [P] symbols.
    num_taps: T, number of channel taps (static).

  Returns:
    complex [P, T] matrix X with X[n, t] = x[n - t] (0 for n - t < 0), so that
    y = X h is the linear convolution of x with the taps h.
  """
  x = jnp.asarray(x)
  lag = np.arange(x.shape[0])[:, None] - np.arange(num_taps)[None, :]
  return jnp.where(lag >= 0, x[np.maximum(lag, 0)], jnp.zeros((), x.dtype))


def ls_channel_estimate(y_pilot: chex.Array, x_pilot: chex.Array, num_taps: int) -> jnp.ndarray:
  """Least-squares tap estimate from a preamble, h = (X^H X)^-1 X^H y [Kay, Ch. 8].

  Args:
    y_pilot: complex [P] received samples of the preamble.
    x_pilot: complex [P] known pilot symbols (P >= T).
    num_taps: T (static).

  Returns:
    complex [T] estimated taps.
  """
  xm = convolution_matrix(x_pilot, num_taps)
  xh = jnp.conj(xm).T
  return jnp.linalg.solve(xh @ xm, xh @ jnp.asarray(y_pilot))


def lmmse_channel_estimate(y_pilot: chex.Array, x_pilot: chex.Array, tap_powers: chex.Array,
                           noise_var: chex.Numeric) -> jnp.ndarray:
  """Linear MMSE tap estimate, h = R X^H (X R X^H + N0 I)^-1 y [Kay, Ch. 12].

  R = diag(tap_powers) is the taps' second moment E[h h^H] (uncorrelated taps); with
  a Rician LOS mean this is the best linear (not affine) estimator.

  Args:
    y_pilot: complex [P] received preamble.
    x_pilot: complex [P] known pilots.
    tap_powers: float [T] E|h_t|^2.
    noise_var: N0.

  Returns:
    complex [T] estimated taps.
  """
  tap_powers = jnp.asarray(tap_powers)
  xm = convolution_matrix(x_pilot, tap_powers.shape[0])
  rxh = tap_powers[:, None] * jnp.conj(xm).T                     # R X^H, [T, P]
  cov = xm @ rxh + noise_var * jnp.eye(xm.shape[0], dtype=xm.dtype)
  return rxh @ jnp.linalg.solve(cov, jnp.asarray(y_pilot))


def channel_matrix(taps: chex.Array, seq_len: int) -> jnp.ndarray:
  """The L x L lower-triangular matrix H with y = H x for the frame model.

  Args:
    taps: complex [T] (block fading) or [L, T] (time-varying, row n = taps at time n).
    seq_len: L (static).

  Returns:
    complex [L, L], H[n, m] = h[n, n - m] for 0 <= n - m < T, else 0.
  """
  taps = jnp.asarray(taps)
  num_taps = taps.shape[-1]
  lag = np.arange(seq_len)[:, None] - np.arange(seq_len)[None, :]
  valid = (lag >= 0) & (lag < num_taps)
  lag_c = np.clip(lag, 0, num_taps - 1)
  if taps.ndim == 1:
    vals = taps[lag_c]
  else:
    vals = jnp.take_along_axis(taps, jnp.asarray(lag_c), axis=1)
  return jnp.where(valid, vals, jnp.zeros((), taps.dtype))


def zf_equalize(y: chex.Array, h: chex.Array) -> jnp.ndarray:
  """Zero-forcing equalizer: x_hat = H^-1 y (noise is amplified where H is weak).

  Args:
    y: complex [L] received frame.
    h: complex [L, L] channel matrix.

  Returns:
    complex [L] equalized symbols.
  """
  return jnp.linalg.solve(h, y)


def mmse_equalize(y: chex.Array, h: chex.Array,
                  noise_var: chex.Numeric) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Linear MMSE equalizer with unbiased per-symbol output [Proakis & Salehi, Sec. 9.4].

  With unit-energy symbols, W = H (H^H H + N0 I)^-1 and mu_n = w_n^H h_n, the output
  x_hat_n = (w_n^H y) / mu_n = x_n + e_n has E|e_n|^2 = 1 / SINR_n with
  SINR_n = mu_n / mse_n, mse_n = N0 [(H^H H + N0 I)^-1]_nn = 1 - mu_n (computed from
  B directly, which stays accurate in float32 when mu_n is close to 1).

  Args:
    y: complex [L] received frame.
    h: complex [L, L] channel matrix.
    noise_var: N0 (> 0).

  Returns:
    (x_hat complex [L], sinr float [L]).
  """
  hh = jnp.conj(h).T
  gram = hh @ h + noise_var * jnp.eye(h.shape[1], dtype=h.dtype)
  chol = jax.scipy.linalg.cho_factor(gram, lower=True)
  b = jax.scipy.linalg.cho_solve(chol, jnp.eye(h.shape[1], dtype=h.dtype))
  w = h @ b
  mu = jnp.real(jnp.sum(jnp.conj(w) * h, axis=0))
  mse = noise_var * jnp.real(jnp.diagonal(b))
  x_hat = (jnp.conj(w).T @ y) / mu
  return x_hat, mu / mse


def ml_detect(y: chex.Array, gain: chex.Array, name: str) -> jnp.ndarray:
  """Per-symbol ML detection for y = g s + n: argmin_s |y - g s|^2 = nearest point of y / g.

  Args:
    y: complex [...] observations.
    gain: complex, broadcastable to ``y``.
    name: modulation name (static).

  Returns:
    int32 [...] symbol indices.
  """
  gain = jnp.asarray(gain)
  mag2 = jnp.real(gain * jnp.conj(gain))
  z = jnp.where(mag2 > 0, y * jnp.conj(gain) / jnp.where(mag2 > 0, mag2, 1.0), 0.0)
  return constellations.detect(z, name)


def _bit_log_masks(name: str) -> jnp.ndarray:
  """[M, 2, k] with 0 where symbol m has bit j equal to b (axis 1), else -inf."""
  bits = constellations.bit_table(name)
  masks = np.stack([bits == 0, bits == 1], axis=1)
  return jnp.asarray(np.where(masks, 0.0, -np.inf), dtype=jnp.float32)


def _metrics(y, gain, noise_var, name):
  """Log-likelihoods -|y - g s|^2 / N0, shape [..., M, 1, 1]."""
  pts = constellations.constellation(name)
  y = jnp.asarray(y)[..., None]
  d = -jnp.abs(y - jnp.asarray(gain)[..., None] * pts) ** 2 / jnp.asarray(noise_var)[..., None]
  return d[..., None, None]


def llr_exact(y: chex.Array, gain: chex.Array, noise_var: chex.Array, name: str) -> jnp.ndarray:
  """Exact bit LLRs for y = g s + n, n ~ CN(0, N0), equiprobable symbols.

  LLR_j = logsumexp_{s: b_j = 0} (-|y - g s|^2 / N0) - logsumexp_{s: b_j = 1} (...).

  Args:
    y: complex [...] observations.
    gain: complex, broadcastable to ``y``.
    noise_var: N0 > 0, broadcastable to ``y`` (per-symbol values allowed).
    name: modulation name (static).

  Returns:
    float32 [..., k] LLRs, log P(b=0|y) / P(b=1|y).
  """
  lse = jax.nn.logsumexp(_metrics(y, gain, noise_var, name) + _bit_log_masks(name), axis=-3)
  return (lse[..., 0, :] - lse[..., 1, :]).astype(jnp.float32)


def llr_maxlog(y: chex.Array, gain: chex.Array, noise_var: chex.Array, name: str) -> jnp.ndarray:
  """Max-log bit LLRs: logsumexp replaced by max in `llr_exact`.

  Args:
    y: complex [...] observations.
    gain: complex, broadcastable to ``y``.
    noise_var: N0 > 0, broadcastable to ``y``.
    name: modulation name (static).

  Returns:
    float32 [..., k] LLRs; sign(LLR) gives the bits of the ML symbol decision.
  """
  mx = jnp.max(_metrics(y, gain, noise_var, name) + _bit_log_masks(name), axis=-3)
  return (mx[..., 0, :] - mx[..., 1, :]).astype(jnp.float32)


def equalize_and_detect(y: chex.Array, taps: chex.Array, noise_var: chex.Numeric,
                        name: str) -> ReceiverOutput:
  """Detects a frame given channel taps (true or estimated).

  One tap ([1] or [L, 1]): the channel is flat and the per-symbol ML decision is
  exact. More taps: MMSE equalization with the full channel matrix, then per-symbol
  ML on the unbiased output treating residual interference as Gaussian noise of
  variance 1 / SINR. This is NOT sequence (Viterbi) ML; it is the linear-receiver
  reference.

  Args:
    y: complex [L] received frame.
    taps: complex [T] or [L, T].
    noise_var: N0.
    name: modulation name (static).

  Returns:
    A `ReceiverOutput`.
  """
  y = jnp.asarray(y)
  taps = jnp.asarray(taps)
  if taps.shape[-1] == 1:
    gain = taps[..., 0]
    mag2 = jnp.maximum(jnp.real(gain * jnp.conj(gain)), 1e-30)  # a null tap gives SINR ~ 0
    x_hat = y * jnp.conj(gain) / mag2
    sinr = jnp.broadcast_to(mag2 / noise_var, y.shape)
  else:
    x_hat, sinr = mmse_equalize(y, channel_matrix(taps, y.shape[0]), noise_var)
  symbols = constellations.detect(x_hat, name)
  llr = llr_maxlog(x_hat, jnp.ones((), x_hat.dtype), 1.0 / sinr, name)
  block_taps = taps if taps.ndim == 1 else jnp.mean(taps, axis=0)
  return ReceiverOutput(symbols, llr, x_hat.astype(jnp.complex64), sinr.astype(jnp.float32),
                        block_taps.astype(jnp.complex64))


def perfect_csi_detect(y: chex.Array, taps: chex.Array, noise_var: chex.Numeric,
                       name: str) -> jnp.ndarray:
  """Symbol decisions with the true channel (see `equalize_and_detect` for the method).

  Flat/AWGN channels give exact per-symbol ML; multipath gives MMSE + per-symbol ML
  with the true channel matrix, not sequence ML.

  Args:
    y: complex [L] received frame.
    taps: complex [T] or [L, T] true taps.
    noise_var: N0.
    name: modulation name (static).

  Returns:
    int32 [L] symbol indices.
  """
  return equalize_and_detect(y, taps, noise_var, name).symbols


def ls_receiver(y: chex.Array, x_pilot: chex.Array, num_taps: int, noise_var: chex.Numeric,
                name: str) -> ReceiverOutput:
  """LS estimate from the preamble y[:P], then MMSE equalization and detection.

  Args:
    y: complex [L] received frame whose first P samples carry ``x_pilot``.
    x_pilot: complex [P] known pilots.
    num_taps: T to estimate (static).
    noise_var: N0.
    name: modulation name (static).

  Returns:
    A `ReceiverOutput` (``taps`` are the LS estimate).
  """
  y = jnp.asarray(y)
  taps = ls_channel_estimate(y[:x_pilot.shape[0]], x_pilot, num_taps)
  return equalize_and_detect(y, taps, noise_var, name)


def lmmse_receiver(y: chex.Array, x_pilot: chex.Array, tap_powers: chex.Array,
                   noise_var: chex.Numeric, name: str) -> ReceiverOutput:
  """LMMSE estimate from the preamble y[:P], then MMSE equalization and detection.

  Args:
    y: complex [L] received frame whose first P samples carry ``x_pilot``.
    x_pilot: complex [P] known pilots.
    tap_powers: float [T] prior tap powers E|h_t|^2.
    noise_var: N0.
    name: modulation name (static).

  Returns:
    A `ReceiverOutput` (``taps`` are the LMMSE estimate).
  """
  y = jnp.asarray(y)
  taps = lmmse_channel_estimate(y[:x_pilot.shape[0]], x_pilot, tap_powers, noise_var)
  return equalize_and_detect(y, taps, noise_var, name)
