"""Rician tapped-delay-line fading: power-delay profiles, block and Doppler taps.

The channel of one frame has T symbol-spaced taps (spacing 1 / sample_rate). The
scattered (diffuse) power of tap t is ``pdp[t] / (K + 1)`` with a unit-sum power-delay
profile ``pdp``; a line-of-sight (LOS) component of power ``K / (K + 1)`` with a uniformly
random phase rides on the first tap. K is the Rician K-factor as 3GPP TR 38.901 defines it
(LOS power over the total scattered power), so E[sum_t |h_t|^2] = 1, K = 0 (-inf dB) is
Rayleigh fading on every tap, and a single-tap profile is flat Rician fading.

Time variation follows the Clarke/Jakes Doppler spectrum (`doppler_taps`). NumPy functions
describe profiles (static, resolved outside ``jit``); the jnp functions draw one example's
taps and are vmapped by the simulator. Each draw has a ``*_from_bits`` form taking raw
uint32 words (`variates`), so the simulator draws all of an example's randomness in ONE
PRNG call, and a ``*_parts`` form returning float32 (real, imaginary) parts, the form
XLA:CPU vectorizes.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from compressjax.channels import variates

PROFILES = ("awgn", "flat", "exponential", "inf_los")
MAX_DERIVED_TAPS = 16    # cap on a derived tap count (set num_taps to go beyond)
TAIL_POWER = 1e-3        # a derived profile drops at most this fraction of its power

INF_LOS_HALL_M = (120.0, 60.0, 10.0)
INF_LOS_K_FACTOR_DB = 7.0


def db_to_linear(db: float) -> float:
  """10^(db / 10) as a Python float; -inf maps to 0 and inf to inf."""
  return 0.0 if db == -math.inf else (math.inf if db == math.inf else 10.0 ** (db / 10.0))


def inf_los_delay_spread_ns(length_m: float = 120.0, width_m: float = 60.0,
                            height_m: float = 10.0) -> float:
  """Median RMS delay spread of 3GPP indoor factory (InF) LOS for a hall of a given size.

  3GPP TR 38.901 v17.0.0, Table 7.5-6 Part 3 (InF, LOS): lgDS = log10(26 V/S + 14) - 9.35
  with hall volume V and total surface S (walls, floor, ceiling), DS in seconds. For the
  120 x 60 x 10 m hall the table's example gives V/S = 4 and DS = 52.7 ns; factory
  measurements report 30-300 ns.

  Args:
    length_m: hall length in metres.
    width_m: hall width in metres.
    height_m: hall height in metres.

  Returns:
    The RMS delay spread in nanoseconds.
  """
  volume = length_m * width_m * height_m
  surface = 2.0 * (length_m * width_m + length_m * height_m + width_m * height_m)
  return 10.0 ** (math.log10(26.0 * volume / surface + 14.0) - 9.35) * 1e9


INF_LOS_DELAY_SPREAD_NS = inf_los_delay_spread_ns(*INF_LOS_HALL_M)


def exponential_pdp(delay_spread_ns: float, sample_rate_hz: float,
                    num_taps: int | None = None) -> np.ndarray:
  """Sampled exponential power-delay profile, p_t ~ exp(-t Ts / tau_rms), unit sum.

  The IEEE 802.11 exponential model (N. Chayat, IEEE 802.11-97/96, 1997; also Medbo &
  Schramm, ETSI BRAN 3ERI085B, 1998): taps at multiples of Ts = 1 / sample_rate with powers
  decaying as exp(-t Ts / tau_rms). With ``num_taps=None``, T is the smallest count whose
  dropped tail holds less than `TAIL_POWER` of the untruncated profile's power
  (r^T <= 1e-3 with r = exp(-Ts / tau_rms)), capped at `MAX_DERIVED_TAPS`; a profile cut
  by the cap, or by a small explicit T, has a smaller RMS spread than asked. The discrete
  RMS spread equals tau_rms only when tau_rms >> Ts (see `rms_delay_spread_ns`).

  Args:
    delay_spread_ns: RMS delay spread tau_rms in ns, >= 0 (0 gives a single tap).
    sample_rate_hz: tap rate 1 / Ts in Hz.
    num_taps: explicit T, or ``None`` to derive it.

  Returns:
    float64 [T] tap powers summing to 1.
  """
  spread_samples = delay_spread_ns * 1e-9 * sample_rate_hz
  if num_taps is None:
    if spread_samples <= 0:
      num_taps = 1
    else:
      num_taps = math.ceil(spread_samples * math.log(1.0 / TAIL_POWER) - 1e-9)
      num_taps = int(min(max(num_taps, 1), MAX_DERIVED_TAPS))
  if spread_samples <= 0:
    p = np.zeros(num_taps)
    p[0] = 1.0
    return p
  p = np.exp(-np.arange(num_taps) / spread_samples)
  return p / p.sum()


def power_delay_profile(profile: str, delay_spread_ns: float, sample_rate_hz: float,
                        num_taps: int | None = None) -> np.ndarray:
  """Scattered-power profile of a named channel profile.

  "inf_los" approximates 3GPP TR 38.901 InF LOS (Table 7.5-6 Part 3) by an exponential PDP
  at its median delay spread (`INF_LOS_DELAY_SPREAD_NS`, 52.7 ns) rather than the clustered
  TDL of Sec. 7.7.2 (Table 7.7.2-4, TDL-D, scaled per Sec. 7.7.3); its K-factor is the
  table's 7 dB mean (the 8 dB spread is not drawn). The caller passes that delay spread.

  Args:
    profile: one of `PROFILES`.
    delay_spread_ns: RMS delay spread in ns (used by "exponential" and "inf_los").
    sample_rate_hz: tap rate in Hz.
    num_taps: explicit T (the profile is truncated or zero-padded and renormalized), or
      ``None`` for the profile's own count.

  Returns:
    float64 [T] scattered power per tap, unit sum ("awgn": a unit first tap).
  """
  if profile not in PROFILES:
    raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
  if profile in ("awgn", "flat"):
    p = np.zeros(num_taps or 1)
    p[0] = 1.0
    return p
  return exponential_pdp(delay_spread_ns, sample_rate_hz, num_taps)


def mean_tap_powers(pdp: np.ndarray, k_factor: float) -> np.ndarray:
  """Mean tap powers E|h_t|^2 = (pdp_t + K [t == 0]) / (K + 1).

  Args:
    pdp: [T] scattered power per tap, unit sum.
    k_factor: linear Rician K-factor (inf: the LOS alone).

  Returns:
    float64 [T] mean tap powers summing to 1.
  """
  p = np.asarray(pdp, dtype=np.float64)
  los = np.zeros_like(p)
  los[0] = 1.0
  if math.isinf(k_factor):
    return los
  return (p + k_factor * los) / (k_factor + 1.0)


def rms_delay_spread_ns(powers: np.ndarray, sample_rate_hz: float) -> float:
  """RMS delay spread (ns) of tap powers on a grid of spacing 1 / sample_rate_hz.

  Args:
    powers: [T] tap powers (any positive scale).
    sample_rate_hz: tap rate in Hz.

  Returns:
    sqrt(E[tau^2] - E[tau]^2) under the normalized powers, in ns.
  """
  p = np.asarray(powers, dtype=np.float64)
  p = p / p.sum()
  tau = np.arange(p.shape[-1]) / sample_rate_hz * 1e9
  mean = np.sum(p * tau)
  return float(np.sqrt(max(np.sum(p * tau ** 2) - mean ** 2, 0.0)))


def _cis(x: jnp.ndarray) -> jnp.ndarray:
  sin, cos = variates.sincos(x)
  return jax.lax.complex(cos, sin)


def _complex(parts: tuple[jnp.ndarray, jnp.ndarray]) -> jnp.ndarray:
  return jax.lax.complex(*parts)


def _amplitudes(pdp: np.ndarray, k_factor: float) -> tuple[np.ndarray, float]:
  if math.isinf(k_factor):
    return np.zeros(len(pdp), np.float32), 1.0
  diffuse = np.sqrt(np.asarray(pdp) / (k_factor + 1.0)).astype(np.float32)
  return diffuse, math.sqrt(k_factor / (k_factor + 1.0))


def block_taps_words(num_taps: int) -> int:
  """uint32 words `block_taps_from_bits` consumes for T taps."""
  return 2 * num_taps + 1


def block_taps_from_bits(bits: chex.Array, pdp: np.ndarray, k_factor: float) -> jnp.ndarray:
  """`block_taps` from ``block_taps_words(T)`` raw uint32 words instead of a key."""
  return _complex(block_taps_parts(bits, pdp, k_factor))


def block_taps_parts(bits: chex.Array, pdp: np.ndarray,
                     k_factor: float) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(real, imaginary) float32 [T] parts of `block_taps_from_bits`."""
  diffuse, los = _amplitudes(pdp, k_factor)
  n_t = len(pdp)
  re, im = variates.normal_parts_from_bits(bits[:2 * n_t])
  sin, cos = variates.sincos(np.float32(2 * np.pi) * variates.uniform_from_bits(bits[2 * n_t]))
  onehot = np.eye(1, n_t, dtype=np.float32)[0] * np.float32(los)
  return re * diffuse + cos * onehot, im * diffuse + sin * onehot


def block_taps(key: chex.PRNGKey, pdp: np.ndarray, k_factor: float) -> jnp.ndarray:
  """Draws one frame's taps for block fading (constant over the frame).

  Args:
    key: PRNG key.
    pdp: static [T] scattered power per tap (unit sum).
    k_factor: static linear K-factor (LOS power / scattered power) on the first tap.

  Returns:
    complex64 [T]: h_t = sqrt(pdp_t / (K+1)) g_t + [t == 0] sqrt(K / (K+1)) e^{j phi},
    with g_t ~ CN(0, 1) and phi ~ U[0, 2 pi).
  """
  bits = jax.random.bits(key, (block_taps_words(len(pdp)),), jnp.uint32)
  return block_taps_from_bits(bits, pdp, k_factor)


DOPPLER_MODELS = ("kl", "sos")
KL_TOLERANCE = 1e-6      # power fraction the truncated Karhunen-Loeve basis may drop
KL_FUSED_RANK = 4        # up to this KL rank the basis products are fused multiply-adds


@functools.lru_cache(maxsize=64)
def clarke_basis(doppler_norm: float, seq_len: int, tol: float = KL_TOLERANCE) -> np.ndarray:
  """Karhunen-Loeve basis of the Clarke/Jakes fading process over one frame.

  Clarke's model (Bell Syst. Tech. J. 47(6), 1968; Jakes, Microwave Mobile Communications,
  1974) is a zero-mean Gaussian process with autocorrelation R[d] = J0(2 pi fd Ts d). With
  R = U diag(lam) U^T over the L samples of a frame, g = C z with C = U[:, :r]
  diag(lam[:r])^(1/2) and z ~ CN(0, I_r) has covariance R up to the dropped eigenvalues
  (at most ``tol`` of the trace); rows are rescaled to unit power. The rank r depends on
  fd Ts L (Doppler cycles per frame): 2 up to 0.01, 3 at 0.1, 6 at 1, 13 at 4, 38 at 16.
  Computed once per (fd Ts, L) in NumPy at trace time, O(L^3).

  Args:
    doppler_norm: fd / sample_rate.
    seq_len: L.
    tol: largest fraction of the power the truncation may drop.

  Returns:
    float32 [L, r].
  """
  from scipy import special  # pylint: disable=g-import-not-at-top
  lag = np.arange(seq_len)
  lam, vec = np.linalg.eigh(special.j0(2 * np.pi * doppler_norm * np.abs(lag[:, None] - lag)))
  lam, vec = np.clip(lam[::-1], 0.0, None), vec[:, ::-1]
  tail = np.cumsum(lam[::-1])[::-1] / lam.sum()       # tail[i]: power share of lam[i:]
  rank = max(1, int(np.sum(tail > tol)))
  basis = vec[:, :rank] * np.sqrt(lam[:rank])
  return (basis / np.linalg.norm(basis, axis=1, keepdims=True)).astype(np.float32)


def doppler_taps_words(num_taps: int, doppler_norm: float, seq_len: int, model: str = "kl",
                       num_sinusoids: int = 8) -> int:
  """uint32 words `doppler_taps_from_bits` consumes (arguments as `doppler_taps`)."""
  if model not in DOPPLER_MODELS:
    raise ValueError(f"doppler_model must be one of {DOPPLER_MODELS}, got {model!r}")
  if model == "kl":
    return 2 * num_taps * clarke_basis(float(doppler_norm), int(seq_len)).shape[1] + 2
  return num_taps * (2 * num_sinusoids + 1) + 2


def _kl_parts(bits, doppler_norm, seq_len, n_t):
  """(real, imaginary) [L, T] of T independent unit-power Clarke processes."""
  basis = clarke_basis(float(doppler_norm), int(seq_len))                 # [L, r]
  rank = basis.shape[1]
  z = jnp.concatenate([p.reshape(n_t, rank) for p in variates.normal_parts_from_bits(bits)])
  if rank <= KL_FUSED_RANK:
    # Slow fading has rank 1-3: a few broadcast multiply-adds fuse with their consumers;
    # a batched GEMM of that size made the training batch ~1.9x slower on XLA:CPU.
    g = sum(basis[:, j:j + 1] * z[:, j] for j in range(rank))           # [L, 2T]
  else:
    g = basis @ z.T                                                       # one real matmul
  return g[:, :n_t], g[:, n_t:]


def _sos_rows(bits, doppler_norm, seq_len, n_t, n_s):
  """Zheng-Xiao angles with Gaussian weights; phases factored as l = 16 h + m."""
  l2 = min(16, seq_len)
  l1 = -(-seq_len // l2)
  u = variates.uniform_from_bits(bits[:n_t])
  z = variates.complex_normal_from_bits(bits[n_t:]).reshape(n_t, n_s)
  z = z * np.float32(math.sqrt(1 / n_s))
  alpha = np.float32(np.pi / n_s) * (np.arange(n_s, dtype=np.float32) + u[:, None])
  w = (np.float32(2 * np.pi * doppler_norm) * variates.sincos(alpha)[1])[..., None]   # [T, N, 1]
  p = _cis((l2 * np.arange(l1, dtype=np.float32)) * w) * z[..., None]     # [T, N, L1]
  q = _cis(np.arange(l2, dtype=np.float32) * w)                            # [T, N, L2]
  return jnp.einsum("tnh,tnm->thm", p, q).reshape(n_t, l1 * l2)[:, :seq_len]


def doppler_taps_from_bits(bits: chex.Array, pdp: np.ndarray, k_factor: float,
                           doppler_norm: float, seq_len: int, model: str = "kl",
                           num_sinusoids: int = 8) -> jnp.ndarray:
  """`doppler_taps` from `doppler_taps_words` raw uint32 words instead of a key."""
  return _complex(doppler_taps_parts(bits, pdp, k_factor, doppler_norm, seq_len, model,
                                    num_sinusoids))


def doppler_taps_parts(bits: chex.Array, pdp: np.ndarray, k_factor: float,
                       doppler_norm: float, seq_len: int, model: str = "kl",
                       num_sinusoids: int = 8) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(real, imaginary) float32 [L, T] parts of `doppler_taps_from_bits`.

  Built time-major, the layout of ``Batch.taps``, so the simulator writes its output in
  one pass and the convolution reads the same array (no transpose).
  """
  diffuse, los = _amplitudes(pdp, k_factor)
  n_t = len(pdp)
  if model == "kl":
    re, im = _kl_parts(bits[2:], doppler_norm, seq_len, n_t)
  else:
    g = _sos_rows(bits[2:], doppler_norm, seq_len, n_t, num_sinusoids).T
    re, im = jnp.real(g), jnp.imag(g)
  re, im = re * diffuse, im * diffuse
  if los == 0:
    return re, im
  angles = np.float32(2 * np.pi) * variates.uniform_from_bits(bits[:2])    # theta0, phi0
  sin, cos = variates.sincos(angles)
  # Per frame: the Doppler shift fd cos(theta0) and e^{j phi0}, computed once rather than
  # in every sample of every consumer.
  doppler, c0, s0 = variates.computed_once(cos[0], cos[1], sin[1])
  turn = np.float32(2 * np.pi * doppler_norm) * doppler * np.arange(seq_len, dtype=np.float32)
  if 2 * np.pi * doppler_norm * (seq_len - 1) <= np.pi / 4:
    # Slow fading turns the LOS by at most pi / 4 over the frame: no range reduction.
    s, c = variates.sincos_reduced(turn)
  else:
    s, c = variates.sincos(turn)
  sin, cos = s0 * c + c0 * s, c0 * c - s0 * s                             # e^{j(phi0 + turn)}
  los = np.float32(los)
  # The LOS joins column 0 by a concatenation: added through a 0/1 mask over all T
  # columns, XLA:CPU would evaluate its sine and cosine T times per sample.
  return (jnp.concatenate([re[:, :1] + (los * cos)[:, None], re[:, 1:]], axis=1),
          jnp.concatenate([im[:, :1] + (los * sin)[:, None], im[:, 1:]], axis=1))


def doppler_taps(key: chex.PRNGKey, pdp: np.ndarray, k_factor: float, doppler_norm: float,
                 seq_len: int, model: str = "kl", num_sinusoids: int = 8) -> jnp.ndarray:
  """Draws one frame's time-varying taps: Rician TDL with a Clarke/Jakes Doppler spectrum.

  Each tap's scattered part is an independent unit-power Rayleigh process with
  autocorrelation J0(2 pi fd Ts d); the LOS on the first tap turns at the Doppler shift
  fd cos(theta0) of a uniform arrival angle theta0 from a uniform phase (its ensemble
  autocorrelation is J0 as well). Models:
    "kl": the Gaussian Clarke process from `clarke_basis`, exact up to 1e-6 of the power
      (one small real matmul).
    "sos": sum of N sinusoids, alpha_n = pi (n + u) / N with one u ~ U[0, 1) per tap. The
      random rotation of Zheng & Xiao (IEEE Trans. Commun. 51(6), 2003) puts each alpha_n
      uniformly on its own arc, so the ensemble autocorrelation is exactly J0 for any N;
      CN(0, 1/N) weights (as in Hoeher, IEEE Trans. Veh. Technol. 41(4), 1992) make each
      sample exactly CN(0, 1). A realization holds N Doppler lines per tap.

  Args:
    key: PRNG key.
    pdp: static [T] scattered power per tap (unit sum).
    k_factor: static linear K-factor on the first tap.
    doppler_norm: static fd / sample_rate, cycles per sample.
    seq_len: L (static).
    model: one of `DOPPLER_MODELS` (static).
    num_sinusoids: N of "sos" (static).

  Returns:
    complex64 [L, T]; E|h[l, t]|^2 is the mean tap power of t for every l.
  """
  n = doppler_taps_words(len(pdp), doppler_norm, seq_len, model, num_sinusoids)
  bits = jax.random.bits(key, (n,), jnp.uint32)
  return doppler_taps_from_bits(bits, pdp, k_factor, doppler_norm, seq_len, model,
                                num_sinusoids)
