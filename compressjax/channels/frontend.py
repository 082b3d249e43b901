"""The receiver's classical front end: model-based input features for a learned receiver.

A network asked to learn the whole receiver from raw samples must learn channel estimation
from a few pilots, complex de-rotation (a product of its inputs) and echo cancellation;
a small transformer on a CPU budget stalls far above the classical receivers. DeepRx
(Honkala et al., 2021, "DeepRx: fully convolutional deep learning receiver") and NVIDIA's
neural receiver (Cammerer et al., 2023, "A neural receiver for 5G NR multi-user MIMO")
instead feed the network the classical estimates beside the raw samples, and let it learn
what the linear receiver gets wrong. `pilot_features` does that for one frame
``y[n] = sum_t h_t x[n - t] + w[n]`` whose first P samples carry the known preamble:

* LS taps from the preamble, ``h_ls = (X^H X)^-1 X^H y[:P]`` (Kay, 1993, Ch. 8), a fixed
  linear map since the preamble is fixed;
* the noise estimate from the preamble's residual, ``N0_hat = |y[:P] - X h_ls|^2 / (P - T)``
  (unbiased for P > T);
* with the channel's mean tap powers R = diag(``tap_powers``) as a prior (the
  deployment's power-delay profile, known when the receiver is designed), the LMMSE taps
  ``h = R X^H (X R X^H + N0_hat I)^-1 y[:P]`` (Kay, Ch. 12) replace the LS ones below, as in
  the LMMSE reference receiver but with the noise estimated, not known;
* the unbiased output ``x_hat`` of a sliding W = 6 T sample linear-MMSE equalizer designed
  for the estimated taps and ``N0_hat`` (`fir_mmse_equalize`), and its SINR: two small
  Cholesky solves per frame instead of the L x L one of `receivers.mmse_equalize`, whose
  cost grows as L^3 (at L = 64 on this project's 2-core CPU, 23 ms per 192 frames for the
  L x L solve alone against ~13 ms for the whole front end).

Nothing here knows the true channel or the true noise: the features are what any receiver
can compute from the frame. The features per sample n, in this order (``C = 12 + 2 T``):

  0-1    Re, Im y[n]                     raw sample
  2-3    Re, Im x_hat[n]                 MMSE-equalized symbol (with the estimated taps;
                                         magnitude clipped at `X_CLIP`)
  4-5    Re, Im x_hat[n]^2               its square and fourth power: the moments that
  6-7    Re, Im x_hat[n]^4 / 4           tell BPSK, QPSK, 8-PSK and QAM apart once pooled
  8      |x_hat[n]|^2                    (products a small network learns slowly)
  9      log10 SINR[n]                   the equalizer's SINR estimate
  10     1 on pilot positions, else 0
  11     log10 N0_hat                    the frame's noise estimate (same at every n)
  12..   Re h, then Im h                 the estimated taps (same at every n)
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from compressjax.channels import receivers

FRONTENDS = ("raw", "pilots")
_TINY = 1e-10
X_CLIP = 2.0   # largest |x_hat| fed to the network (64-QAM's corner point is 1.53)
# The FIR equalizer's (window, lookback) for T taps: 6 T samples, 2 T of them before the
# symbol (the channel's first tap dominates, so past symbols are the ISI to cancel).
_WINDOW = lambda num_taps: (6 * num_taps, 2 * num_taps)


def num_features(frontend: str, num_taps: int) -> int:
  """Channels C per sample of a front end: 2 for "raw", ``7 + 2 T`` for "pilots"."""
  if frontend not in FRONTENDS:
    raise ValueError(f"frontend must be one of {FRONTENDS}, got {frontend!r}")
  return 2 if frontend == "raw" else 12 + 2 * num_taps


@functools.lru_cache(maxsize=None)
def _ls_maps(num_pilots: int, num_taps: int) -> tuple[np.ndarray, np.ndarray]:
  """The LS estimator A = (X^H X)^-1 X^H [T, P] and the residual projector I - X A [P, P]."""
  from compressjax.channels.simulate import pilot_symbols  # pylint: disable=g-import-not-at-top
  with jax.ensure_compile_time_eval():
    x = np.asarray(receivers.convolution_matrix(pilot_symbols(num_pilots), num_taps),
                   np.complex128)
  a = np.linalg.solve(x.conj().T @ x, x.conj().T)
  return a.astype(np.complex64), (np.eye(num_pilots) - x @ a).astype(np.complex64)


def check_pilots(num_pilots: int, num_taps: int) -> None:
  """Raises unless the preamble can estimate T taps and the noise (P > T >= 1)."""
  if not (isinstance(num_taps, int) and num_taps >= 1 and isinstance(num_pilots, int)
          and num_pilots > num_taps):
    raise ValueError(f"num_pilots must exceed num_taps (the LS fit needs P > T to leave a "
                     f"noise residual), got num_pilots={num_pilots!r}, num_taps={num_taps!r}")


def _window_matrix(taps: jax.Array, window: int) -> jax.Array:
  """H_w [W, W + T - 1]: samples y[m..m+W) from symbols x[m-T+1 .. m+W), H_w[k, j] = h[k-j+T-1]."""
  num_taps = taps.shape[0]
  lag = np.arange(window)[:, None] - np.arange(window + num_taps - 1)[None, :] + num_taps - 1
  valid = (lag >= 0) & (lag < num_taps)
  return jnp.where(valid, taps[np.clip(lag, 0, num_taps - 1)], 0)


def cholesky_solve(a: chex.Array, b: chex.Array) -> jax.Array:
  """Solves a x = b for a small Hermitian positive-definite ``a`` by Cholesky, in jnp.

  Three ``lax.fori_loop`` sweeps of n steps (the factor's columns, then the two triangular
  solves; unrolled by 2, the fastest of 1/2/4/8 here), no LAPACK call: on XLA:CPU (jax
  0.10) two independent LAPACK custom calls in one program were seen to deadlock (every
  thread idle, the step never finishing), e.g. the student's and the teacher's front ends
  in one distillation step. The front end of a
  default training batch (192 frames) then takes ~13 ms instead of ~6 ms on a 2-core CPU
  (about 10% of a train step); it runs unchanged on a GPU or TPU.

  Args:
    a: [n, n] Hermitian positive definite.
    b: [n, k] right-hand sides.

  Returns:
    x [n, k].
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  n = a.shape[-1]
  rows = jnp.arange(n)

  def column(j, low):          # low[:, j] from a[:, j] and the columns before it
    v = a[:, j] - low @ jnp.conj(low[j])
    d = jnp.sqrt(jnp.maximum(jnp.real(v[j]), _TINY))
    return low.at[:, j].set(jnp.where(rows >= j, v / d, 0))

  low = jax.lax.fori_loop(0, n, column, jnp.zeros_like(a), unroll=2)      # a = low low^H

  def forward(i, z):           # low z = b, row by row (z is 0 below row i)
    return z.at[i].set((b[i] - low[i] @ z) / low[i, i])

  z = jax.lax.fori_loop(0, n, forward, jnp.zeros_like(b), unroll=2)

  def backward(t, x):          # low^H x = z, from the last row up
    i = n - 1 - t
    return x.at[i].set((z[i] - jnp.conj(low[:, i]) @ x) / jnp.conj(low[i, i]))

  return jax.lax.fori_loop(0, n, backward, jnp.zeros_like(b), unroll=2)


def _cov(hw: jax.Array, noise_var: chex.Numeric) -> jax.Array:
  return hw @ jnp.conj(hw).T + noise_var * jnp.eye(hw.shape[0], dtype=hw.dtype)


def fir_mmse_equalize(y: chex.Array, taps: chex.Array, noise_var: chex.Numeric,
                      window: int, lookback: int) -> tuple[jax.Array, jax.Array]:
  """Unbiased linear-MMSE equalizer of one block-fading frame from sliding windows.

  Symbol n is estimated from the W samples ``y[n - a : n - a + W]`` (a = ``lookback``),
  which hold the symbols x[n - a - T + 1 .. n - a + W - 1] through the window's channel
  matrix H_w [W, W + T - 1]: with R = H_w H_w^H + N0 I and h_d the column of x[n],
  w = R^-1 h_d, mu = h_d^H R^-1 h_d, x_hat = w^H y_w / mu and SINR = mu / (1 - mu)
  (Proakis & Salehi, Digital Communications, Sec. 9.4-2); one filter for the frame.
  Samples before the frame are zeros (the frame model's zero history). Samples after it
  are not observed, so the last K = W - 1 - a symbols, whose windows would run past the
  frame, are estimated the same way from the frame's last W - 1 samples (K columns of
  one more system).

  Both systems are solved by `cholesky_solve` (no LAPACK call; see there why).

  Args:
    y: complex [L] received frame, L >= W.
    taps: complex [T] channel taps.
    noise_var: N0 > 0.
    window: W >= 2 (static).
    lookback: a in [0, W - 1) (static): samples before n in the window.

  Returns:
    (x_hat complex [L], sinr float [L]).
  """
  taps = jnp.asarray(taps)
  num_taps, seq = taps.shape[0], y.shape[0]
  if not 0 <= lookback < window - 1 or seq < window:
    raise ValueError(f"need 0 <= lookback < window - 1 <= seq_len - 1, got lookback="
                     f"{lookback}, window={window}, seq_len={seq}")
  tail, span = window - 1 - lookback, window - 1
  hw, ht = _window_matrix(taps, window), _window_matrix(taps, span)
  rhs_main = hw[:, lookback + num_taps - 1:lookback + num_taps]               # [W, 1]
  rhs_tail = ht[:, span + num_taps - 1 - tail:span + num_taps - 1]            # [S, K]
  w_main = cholesky_solve(_cov(hw, noise_var), rhs_main)
  w_tail = cholesky_solve(_cov(ht, noise_var), rhs_tail)
  mu_main = jnp.clip(jnp.real(jnp.sum(jnp.conj(rhs_main) * w_main)), _TINY, 1.0 - 1e-7)
  mu_tail = jnp.clip(jnp.real(jnp.sum(jnp.conj(rhs_tail) * w_tail, axis=0)), _TINY,
                     1.0 - 1e-7)
  y_pad = jnp.concatenate([jnp.zeros((lookback,), y.dtype), y,
                           jnp.zeros((window - 1 - lookback,), y.dtype)])
  windows = jnp.stack([y_pad[k:k + seq] for k in range(window)], axis=-1)   # [L, W]
  x_main = windows @ jnp.conj(w_main[:, 0]) / mu_main
  x_tail = (jnp.conj(w_tail).T @ y[seq - span:]) / mu_tail
  x_hat = jnp.concatenate([x_main[:seq - tail], x_tail])
  mu = jnp.concatenate([jnp.broadcast_to(mu_main, (seq - tail,)), mu_tail])
  return x_hat, mu / (1.0 - mu)


def check_tap_powers(tap_powers: tuple[float, ...] | None, num_taps: int) -> None:
  """Raises unless ``tap_powers`` is None or T finite powers >= 0 with a positive sum."""
  if tap_powers is None:
    return
  p = np.asarray(tap_powers, np.float64)
  if p.shape != (num_taps,) or not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
    raise ValueError(f"tap_powers must be None or {num_taps} finite powers >= 0 with a "
                     f"positive sum (one per tap), got {tap_powers!r}")


def _frame_features(y: jax.Array, num_pilots: int, num_taps: int,
                    tap_powers: tuple[float, ...] | None) -> jax.Array:
  a, resid = _ls_maps(num_pilots, num_taps)
  yp = y[:num_pilots]
  h = jnp.asarray(a) @ yp
  n0 = jnp.sum(jnp.abs(jnp.asarray(resid) @ yp) ** 2) / (num_pilots - num_taps)
  n0 = jnp.maximum(n0, _TINY)
  if tap_powers is not None:
    from compressjax.channels.simulate import pilot_symbols  # pylint: disable=g-import-not-at-top
    with jax.ensure_compile_time_eval():
      x_pilot = pilot_symbols(num_pilots)
    # h = R X^H (X R X^H + N0 I)^-1 y_p (receivers.lmmse_channel_estimate), P x P.
    xm = receivers.convolution_matrix(x_pilot, num_taps)
    rxh = np.asarray(tap_powers, np.float32)[:, None] * jnp.conj(xm).T
    cov = xm @ rxh + n0 * jnp.eye(num_pilots, dtype=xm.dtype)
    h = rxh @ cholesky_solve(cov, yp[:, None])[:, 0]
  x_hat, sinr = fir_mmse_equalize(y, h, n0, *_WINDOW(num_taps))
  # The unbiased output is divided by mu, which is near 0 in a deep fade: its magnitude is
  # clipped (phase kept) at X_CLIP, past every unit-energy constellation's largest point,
  # so no feature (the fourth power above all) can blow a training step up.
  mag = jnp.abs(x_hat)
  x_hat = x_hat * jnp.minimum(1.0, X_CLIP / jnp.maximum(mag, _TINY))
  per_frame = jnp.concatenate([jnp.log10(n0)[None], jnp.real(h), jnp.imag(h)])
  seq = y.shape[0]
  pilot = (jnp.arange(seq) < num_pilots).astype(jnp.float32)
  sq = x_hat * x_hat
  quad = sq * sq / 4.0
  per_sample = jnp.stack([jnp.real(y), jnp.imag(y), jnp.real(x_hat), jnp.imag(x_hat),
                          jnp.real(sq), jnp.imag(sq), jnp.real(quad), jnp.imag(quad),
                          jnp.abs(x_hat) ** 2, jnp.log10(jnp.maximum(sinr, _TINY)), pilot],
                         axis=-1)
  return jnp.concatenate([per_sample, jnp.broadcast_to(per_frame, (seq, per_frame.shape[0]))],
                         axis=-1).astype(jnp.float32)


def pilot_features(iq: chex.Array, num_pilots: int, num_taps: int,
                   tap_powers: tuple[float, ...] | None = None) -> jax.Array:
  """Model-based features of frames that start with the `pilot_symbols` preamble.

  Args:
    iq: float [B, L, 2] received samples (real, imaginary).
    num_pilots: P, the preamble length (static).
    num_taps: T, the taps to estimate (static), P > T.
    tap_powers: the prior E|h_t|^2 of the T taps (static; LMMSE taps), or None (LS taps).

  Returns:
    float32 [B, L, 12 + 2 T] (see the module docstring for the channels).
  """
  check_pilots(num_pilots, num_taps)
  check_tap_powers(tap_powers, num_taps)
  iq = jnp.asarray(iq, jnp.float32)
  if iq.ndim != 3 or iq.shape[-1] != 2 or iq.shape[1] <= num_pilots:
    raise ValueError(f"iq must have shape [B, L > num_pilots={num_pilots}, 2], got {iq.shape}")
  y = jax.lax.complex(iq[..., 0], iq[..., 1])
  return jax.vmap(lambda f: _frame_features(f, num_pilots, num_taps, tap_powers))(y)


def features(iq: chex.Array, frontend: str, num_pilots: int, num_taps: int,
             tap_powers: tuple[float, ...] | None = None) -> jax.Array:
  """The input of a learned receiver: ``iq`` itself ("raw") or `pilot_features` ("pilots").

  Args:
    iq: float [B, L, 2].
    frontend: one of `FRONTENDS` (static).
    num_pilots: P (static; used by "pilots").
    num_taps: T (static; used by "pilots").
    tap_powers: the LMMSE prior of "pilots" (None: LS taps).

  Returns:
    float32 [B, L, num_features(frontend, num_taps)].
  """
  num_features(frontend, num_taps)
  if frontend == "raw":
    return jnp.asarray(iq, jnp.float32)
  return pilot_features(iq, num_pilots, num_taps, tap_powers)
