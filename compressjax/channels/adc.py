"""The receiver's ADC: automatic gain control, then a b-bit uniform quantizer on I and Q.

A low-resolution receiver digitizes each received sample's in-phase and quadrature parts
with a b-bit converter. Here, for one frame of complex samples ``y`` (shape [..., L]):

* AGC: one gain per frame, set from the frame's own RMS level per real dimension,
  ``rms = sqrt(mean_n |y[n]|^2 / 2)`` over its L samples. I and Q share it (jointly), as
  a receiver whose gain stage sits before the I/Q split does, so the quantizer neither
  rotates nor unbalances the constellation; a fade of the whole frame is undone by the
  gain, not clipped.
* Quantizer: uniform mid-rise over [-clip * rms, clip * rms] with 2^b levels per real
  dimension, step ``d = 2 clip rms / 2^b``, code ``k = clamp(floor(u / d), -2^(b-1),
  2^(b-1) - 1)`` and reconstruction level ``(k + 1/2) d`` for u = Re y and u = Im y; the
  two outer cells extend to infinity (clipping). With b = 1 that is ``sign(u) * clip * rms
  / 2`` (u = 0 counts as positive).
* Output: the reconstruction levels as floats, in the input's own scale (the receiver
  knows the gain it set), so q(y) ~ y and a receiver built for y applies as it is: the
  data, not a model, hence no straight-through gradient.

Default clip (`GAUSSIAN_CLIP`): the clip, in RMS units, that minimizes the quantizer's
mean squared error for a Gaussian input at b bits (`gaussian_mse`, minimized numerically;
for b = 1..5 these are J. Max's optimal uniform steps times 2^(b-1), "Quantizing for
minimum distortion", IRE Trans. Inf. Theory, 1960, Table II). A frame after multipath,
Doppler and noise is close to Gaussian per dimension, and the optimum moves out with b
because the granular error falls as 4^-b while the clipping error falls only as the
Gaussian tail. At b = 1 the level is sqrt(2 / pi) rms = E|u|, the MSE-optimal one-bit
reconstruction; the level does not matter to a linear receiver there, whose SNR at low
Es/N0 is 2 / pi (-1.96 dB) of the unquantized one (Bussgang, 1952; Mezghani and Nossek,
"Capacity lower bound of MIMO channels with output quantization and correlated noise",
ISIT 2012); tests/channels/test_adc.py checks that on the simulator's frames.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

MAX_BITS = 8
# bits -> the clip (multiples of the RMS level per real dimension) minimizing a Gaussian
# input's MSE, with that MSE in dB: measured by `gaussian_mse` (minimized to 1e-6, rounded).
GAUSSIAN_CLIP = {1: 1.596, 2: 1.991, 3: 2.344, 4: 2.682, 5: 3.010, 6: 3.330, 7: 3.640,
                 8: 3.938}
GAUSSIAN_MSE_DB = {1: -4.40, 2: -9.25, 3: -14.27, 4: -19.38, 5: -24.57, 6: -29.83,
                   7: -35.17, 8: -40.57}


def check_bits(bits) -> int:
  """The ADC resolution as an int (0 = off), or a ValueError naming what is allowed.

  Args:
    bits: None or 0 (no ADC), or an integer in [1, `MAX_BITS`]; a Python value, not traced.

  Returns:
    The bits, 0 for off.
  """
  if bits is None:
    return 0
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) \
      or not 0 <= bits <= MAX_BITS:
    raise ValueError(f"bits must be None or an integer in [0, {MAX_BITS}] (0 or None: no "
                     f"ADC), got {bits!r}")
  return int(bits)


def default_clip(bits: int) -> float:
  """The clip multiple used when none is given: `GAUSSIAN_CLIP` at ``bits`` (1..8)."""
  b = check_bits(bits)
  if b == 0:
    raise ValueError(f"bits must be in [1, {MAX_BITS}] for a clip, got {bits!r}")
  return GAUSSIAN_CLIP[b]


def _check_clip(clip) -> None:
  if isinstance(clip, (int, float, np.floating, np.integer)) and not isinstance(clip, bool):
    if not (math.isfinite(clip) and clip > 0):
      raise ValueError(f"clip must be a finite number > 0 (multiples of the RMS level), "
                       f"got {clip!r}")


def gaussian_mse(clip: float, bits: int) -> float:
  """MSE of the mid-rise quantizer on a unit-variance Gaussian input (float64, closed form).

  Sums E[(u - l_k)^2; u in cell k] over the 2^b cells, with the antiderivative
  (1 + l^2) Phi(t) - (t - 2 l) phi(t) of (t - l)^2 phi(t).

  Args:
    clip: the clip level in standard deviations (> 0).
    bits: b in [1, `MAX_BITS`].

  Returns:
    E[(u - q(u))^2] for u ~ N(0, 1).
  """
  b = check_bits(bits)
  _check_clip(clip)
  n = 1 << b
  step = 2.0 * clip / n
  phi = lambda t: math.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)
  cdf = lambda t: 0.5 * math.erfc(-t / math.sqrt(2.0))
  total = 0.0
  for k in range(-n // 2, n // 2):
    level = step * (k + 0.5)
    def upto(t, level=level):
      if math.isinf(t):
        return (1.0 + level * level) if t > 0 else 0.0
      return (1.0 + level * level) * cdf(t) - (t - 2.0 * level) * phi(t)
    lo = -math.inf if k == -n // 2 else step * k
    hi = math.inf if k == n // 2 - 1 else step * (k + 1)
    total += upto(hi) - upto(lo)
  return total


def agc_rms(re: chex.Array, im: chex.Array) -> jnp.ndarray:
  """The AGC's level: RMS per real dimension over a frame's last axis, I and Q jointly.

  Args:
    re: float [..., L] in-phase parts.
    im: float [..., L] quadrature parts.

  Returns:
    float [...], sqrt(mean_n (re^2 + im^2) / 2).
  """
  return jnp.sqrt(0.5 * jnp.mean(re * re + im * im, axis=-1))


def _step(re, im, bits: int, clip):
  """Quantizer step d = 2 clip rms / 2^b per frame, [..., 1], and a divide-safe copy."""
  d = (jnp.asarray(clip, re.dtype) * np.float32(2.0 ** (1 - bits)) * agc_rms(re, im))[..., None]
  return d, jnp.where(d > 0, d, jnp.ones_like(d))


def _codes(u, safe_step, bits: int):
  half = 1 << (bits - 1)
  return jnp.clip(jnp.floor(u / safe_step), -half, half - 1).astype(jnp.int32)


def adc_codes(y: chex.Array, bits: int, clip: chex.Numeric | None = None
              ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The ADC's integer codes of a frame and its quantizer step (see the module docstring).

  Args:
    y: complex [..., L] received samples; the last axis is the frame the AGC levels.
    bits: b in [1, `MAX_BITS`] (static).
    clip: the clip in RMS units (> 0, may be traced); None takes `default_clip`.

  Returns:
    (codes int32 [..., L, 2] in [-2^(b-1), 2^(b-1) - 1], (I, Q); step float32 [...]), so
    the ADC's output is ``(codes + 0.5) * step[..., None, None]``.
  """
  b = check_bits(bits)
  if b == 0:
    raise ValueError(f"bits must be in [1, {MAX_BITS}] for codes (0: no ADC), got {bits!r}")
  clip = default_clip(b) if clip is None else clip
  _check_clip(clip)
  y = jnp.asarray(y, jnp.complex64)
  re, im = jnp.real(y), jnp.imag(y)
  d, safe = _step(re, im, b, clip)
  return jnp.stack([_codes(re, safe, b), _codes(im, safe, b)], -1), d[..., 0]


def adc_quantize_parts(re: chex.Array, im: chex.Array, bits: int | None,
                       clip: chex.Numeric | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The ADC on float (real, imaginary) parts: `adc_quantize` without complex arrays.

  The simulator keeps frames as float32 parts (XLA:CPU vectorizes those, not complex64).

  Args:
    re: float [..., L] in-phase parts.
    im: float [..., L] quadrature parts.
    bits: None or 0 (off: the parts come back unchanged), or b in [1, `MAX_BITS`]
      (static).
    clip: the clip in RMS units (> 0, may be traced); None takes `default_clip`.

  Returns:
    The reconstruction levels (re_q, im_q), float [..., L], in the input's scale.
  """
  b = check_bits(bits)
  if b == 0:
    return re, im
  clip = default_clip(b) if clip is None else clip
  _check_clip(clip)
  re, im = jnp.asarray(re), jnp.asarray(im)
  d, safe = _step(re, im, b, clip)
  # An all-zero frame has d = 0: its codes come from the safe step, its levels are 0.
  level = lambda u: (_codes(u, safe, b).astype(u.dtype) + np.float32(0.5)) * d
  return level(re), level(im)


def adc_quantize(y: chex.Array, bits: int | None,
                 clip: chex.Numeric | None = None) -> jnp.ndarray:
  """Quantizes a frame's complex samples with AGC and a b-bit ADC per real dimension.

  Pure and jittable (``bits`` static); vmaps over leading axes, which it also accepts.

  Args:
    y: complex [..., L] received samples; the last axis is the frame the AGC levels.
    bits: None or 0 (off: ``y`` comes back unchanged), or b in [1, `MAX_BITS`] (static).
    clip: the clip in multiples of the frame's RMS level per real dimension (> 0, may be
      traced); None takes `default_clip` (the Gaussian-MSE-optimal `GAUSSIAN_CLIP`).

  Returns:
    complex64 [..., L]: each part replaced by its reconstruction level, in the input's
    scale (``y`` itself when off).
  """
  if check_bits(bits) == 0:
    return y
  y = jnp.asarray(y, jnp.complex64)
  return jax.lax.complex(*adc_quantize_parts(jnp.real(y), jnp.imag(y), bits, clip))
