"""Gray-coded constellations: bits <-> symbol index <-> complex point.

Every constellation has unit average symbol energy (Es = 1) over equiprobable
points. Index ``i`` carries the bits of ``i`` in binary, most significant bit
first, and the points are Gray-placed: nearest neighbours differ in exactly one
bit. Square M-QAM splits the bits into an in-phase half (the MSBs) and a
quadrature half (the LSBs) and Gray-codes each PAM axis (Proakis & Salehi,
Digital Communications, 5th ed., Sec. 3.2); M-PSK Gray-codes the phase index.

Tables are built once in NumPy (``functools.lru_cache``); the public functions
take the modulation name as a static Python string, resolved outside ``jit``.
"""

import functools
import math

import chex
import jax.numpy as jnp
import numpy as np

MODULATIONS = ("bpsk", "qpsk", "psk8", "qam4", "qam16", "qam64", "qam256")

_ORDERS = {"bpsk": 2, "qpsk": 4, "psk8": 8, "qam4": 4, "qam16": 16, "qam64": 64,
           "qam256": 256}
# QPSK is the 4-point square QAM (points at odd multiples of pi/4), so per-axis
# slicing applies to it; BPSK and 8-PSK are sliced by angle.
_SQUARE = ("qpsk", "qam4", "qam16", "qam64", "qam256")


def check_modulation(name: str) -> str:
  """Validates a modulation name.

  Args:
    name: candidate modulation name.

  Returns:
    ``name`` unchanged.

  Raises:
    ValueError: if ``name`` is not in `MODULATIONS`.
  """
  if not isinstance(name, str) or name not in _ORDERS:
    raise ValueError(f"modulation must be one of {MODULATIONS}, got {name!r}")
  return name


def order(name: str) -> int:
  """Number of points M of the constellation ``name``."""
  return _ORDERS[check_modulation(name)]


def bits_per_symbol(name: str) -> int:
  """Bits per symbol k = log2(M) of the constellation ``name``."""
  return int(math.log2(order(name)))


def is_square_qam(name: str) -> bool:
  """Whether ``name`` is a square QAM (QPSK counts: it is 4-QAM)."""
  return check_modulation(name) in _SQUARE


def _gray(n: np.ndarray) -> np.ndarray:
  return n ^ (n >> 1)


def _gray_inverse(g: np.ndarray) -> np.ndarray:
  n = g.copy()
  shift = g >> 1
  while np.any(shift):
    n ^= shift
    shift >>= 1
  return n


def _qam_scale(m_total: int) -> float:
  # Mean energy of the (2p - m + 1) + j(2q - m + 1) grid is 2 (M - 1) / 3.
  return 1.0 / math.sqrt(2.0 * (m_total - 1) / 3.0)


@functools.lru_cache(maxsize=None)
def _table(name: str) -> np.ndarray:
  """NumPy complex128 table of the points, indexed by symbol index."""
  m = order(name)
  idx = np.arange(m)
  if name in _SQUARE:
    side = math.isqrt(m)
    half = bits_per_symbol(name) // 2
    i_pos = _gray_inverse(idx >> half)          # I level position from the MSBs
    q_pos = _gray_inverse(idx & (side - 1))     # Q level position from the LSBs
    pts = (2 * i_pos - side + 1) + 1j * (2 * q_pos - side + 1)
    return pts * _qam_scale(m)
  # PSK: the point at phase position p carries label gray(p).
  pos = _gray_inverse(idx)
  return np.exp(2j * np.pi * pos / m)


def constellation(name: str) -> jnp.ndarray:
  """The points of a constellation, indexed by symbol index.

  Args:
    name: one of `MODULATIONS`.

  Returns:
    complex64 array [M] with unit mean energy; index ``i`` carries the bits of
    ``i`` (MSB first) and nearest neighbours differ in exactly one bit.
  """
  return jnp.asarray(_table(check_modulation(name)), dtype=jnp.complex64)


def modulate(indices: chex.Array, name: str) -> jnp.ndarray:
  """Maps symbol indices to complex points.

  Args:
    indices: integer array [...] with values in [0, M).
    name: one of `MODULATIONS`.

  Returns:
    complex64 array [...] of constellation points.
  """
  return jnp.take(constellation(name), jnp.asarray(indices), mode="clip")


def detect(y: chex.Array, name: str) -> jnp.ndarray:
  """Nearest-point detection (ML in AWGN with unit channel gain).

  Square QAM is sliced per axis (each PAM axis independently, which is the exact
  nearest point of a product grid); PSK is sliced by angle. Both equal the
  brute-force argmin of |y - s|^2 (ties aside).

  Args:
    y: complex array [...] of received (equalized) samples.
    name: one of `MODULATIONS`.

  Returns:
    int32 array [...] of symbol indices.
  """
  m = order(name)
  y = jnp.asarray(y)
  if name in _SQUARE:
    side = math.isqrt(m)
    half = bits_per_symbol(name) // 2
    gray = jnp.asarray(_gray(np.arange(side)), dtype=jnp.int32)

    def axis(v):
      pos = jnp.round((v / _qam_scale(m) + side - 1) / 2)
      return gray[jnp.clip(pos, 0, side - 1).astype(jnp.int32)]

    return (axis(jnp.real(y)) << half) | axis(jnp.imag(y))
  gray = jnp.asarray(_gray(np.arange(m)), dtype=jnp.int32)
  angle = jnp.angle(y)
  pos = jnp.round(angle * (m / (2 * np.pi))).astype(jnp.int32) % m
  return gray[pos]


def detect_bruteforce(y: chex.Array, name: str) -> jnp.ndarray:
  """Nearest-point detection by argmin of |y - s|^2 over all M points.

  Args:
    y: complex array [...].
    name: one of `MODULATIONS`.

  Returns:
    int32 array [...] of symbol indices (reference for `detect`).
  """
  pts = constellation(name)
  d = jnp.abs(jnp.asarray(y)[..., None] - pts) ** 2
  return jnp.argmin(d, axis=-1).astype(jnp.int32)


def indices_to_bits(indices: chex.Array, name: str) -> jnp.ndarray:
  """Splits symbol indices into their bits.

  Args:
    indices: integer array [...] with values in [0, M).
    name: one of `MODULATIONS`.

  Returns:
    int32 array [..., k] of bits, most significant first.
  """
  k = bits_per_symbol(name)
  shifts = jnp.arange(k - 1, -1, -1, dtype=jnp.int32)
  return (jnp.asarray(indices, dtype=jnp.int32)[..., None] >> shifts) & 1


def bits_to_indices(bits: chex.Array, name: str) -> jnp.ndarray:
  """Packs bits (MSB first) into symbol indices.

  Args:
    bits: integer array [..., k] of 0/1 values, most significant first.
    name: one of `MODULATIONS`.

  Returns:
    int32 array [...] of symbol indices.
  """
  k = bits_per_symbol(name)
  shifts = jnp.arange(k - 1, -1, -1, dtype=jnp.int32)
  return jnp.sum(jnp.asarray(bits, dtype=jnp.int32) << shifts, axis=-1)


def bit_table(name: str) -> np.ndarray:
  """NumPy int array [M, k]: the bits of every symbol index, MSB first."""
  k = bits_per_symbol(name)
  idx = np.arange(order(name))
  return (idx[:, None] >> np.arange(k - 1, -1, -1)) & 1
