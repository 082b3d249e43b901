"""The channel configuration: one frozen, hashable dataclass, validated on construction.

A `ChannelConfig` fixes everything static about a batch (modulation, frame length,
pilots, power-delay profile, tap count, Doppler, SNR range, the receiver's ADC), so
``simulate`` compiles once per config and every batch drawn from it has the same shapes.
It is usable as a ``jax.jit`` static argument. Invalid values raise ``ValueError`` naming
the field, the value and what is allowed, here at the boundary and never inside ``jit``.
"""

import dataclasses
import math
import numbers

import numpy as np

from compressjax.channels import adc
from compressjax.channels import constellations
from compressjax.channels import fading

SNR_TYPES = ("es_n0", "eb_n0")
MAX_TAPS = 64            # explicit num_taps upper bound (derived tap counts cap at 16)
MAX_SINUSOIDS = 64


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_int(name: str, value, lo: int, hi: int) -> None:
  if not _is_int(value) or not lo <= value <= hi:
    raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")


def _check_finite(name: str, value, lo: float = -math.inf, lo_open: bool = False) -> None:
  bound = f"> {lo}" if lo_open else f">= {lo}"
  ok = _is_real(value) and math.isfinite(value) and (value > lo if lo_open else value >= lo)
  if not ok:
    what = "a finite number" + ("" if lo == -math.inf else f" {bound}")
    raise ValueError(f"{name} must be {what}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ChannelConfig:
  """Static description of the simulated link (see the channel contract).

  Frame model: y[n] = sum_t h[n, t] x[n - t] + w[n], n = 0..L-1, zero history, unit
  symbol energy, E[sum_t |h[n, t]|^2] = 1 and w ~ CN(0, N0) with N0 = 10^(-Es/N0 / 10).

  Attributes:
    modulation: constellation of the "symbols" and "channel" tasks (one of
      `constellations.MODULATIONS`).
    modulations: the classes of the "modulation" task; the label is an index into it.
    seq_len: L, complex samples per example.
    num_pilots: P, length of the known QPSK preamble (`pilot_symbols`) of the "symbols"
      and "channel" tasks (and of the "modulation" task with ``modulation_pilots``);
      0 <= P < L.
    modulation_pilots: whether the "modulation" task's frames carry the preamble too, as
      any burst does for synchronization (the payload's modulation stays unknown to the
      receiver); False gives blind classification of L payload symbols.
    profile: power-delay profile, one of `fading.PROFILES`: "awgn" (one unit tap, no
      fading; ignores ``k_factor_db``, ``delay_spread_ns`` and ``doppler_hz``), "flat" (one
      fading tap, Rician with K = ``k_factor_db``: 10 dB by default, pass
      ``k_factor_db=-inf`` for Rayleigh; ignores ``delay_spread_ns``), "exponential"
      (sampled exponential PDP with RMS spread ``delay_spread_ns``), "inf_los" (3GPP TR
      38.901 indoor factory LOS; fixes its own K-factor and delay spread, so
      ``k_factor_db`` and ``delay_spread_ns`` are ignored, see
      `fading.inf_los_delay_spread_ns`). Setting a field the profile ignores to a value
      other than its default and the profile's own warns (``UserWarning``).
    k_factor_db: Rician K-factor in dB: LOS power over total scattered power, the LOS on
      the first tap (3GPP TR 38.901 definition); ``-inf`` is Rayleigh. The default 10 dB
      applies to "flat" and "exponential".
    delay_spread_ns: RMS delay spread of the scattered power, >= 0 (0 gives one tap).
    sample_rate_hz: symbol rate; the taps are spaced 1 / sample_rate_hz apart.
    num_taps: T; ``None`` derives it from the profile (tail < 1e-3, at most 16). An
      explicit T truncates or zero-pads the profile and renormalizes it to unit power.
    doppler_hz: maximum Doppler frequency; 0 is block fading (taps [T] constant over the
      frame), > 0 time-varying taps [L, T] with a Clarke/Jakes spectrum. Must be below
      sample_rate_hz / 2. Ignored by "awgn".
    doppler_model: "kl" (the exact Gaussian Clarke process from `fading.clarke_basis`) or
      "sos" (sum of sinusoids with random angles per tap); see `fading.doppler_taps`.
    doppler_sinusoids: sinusoids per tap of the "sos" model.
    snr_db: a float, or a (lo, hi) range drawn uniformly per example, in dB.
    snr_type: "es_n0" (SNR per symbol) or "eb_n0" (per bit, Es/N0 = Eb/N0 * log2 M).
    adc_bits: the receiver's ADC (`adc.adc_quantize`) on every task's received samples,
      after the noise: 0 = none (ideal samples); b = 1..8 = AGC to the frame's own RMS
      level, then a b-bit uniform mid-rise quantizer on I and on Q. ``Batch.noise_var``
      stays the thermal N0; the quantization error comes on top of it.
    adc_clip: the ADC's clip level in multiples of the frame's RMS level per real
      dimension (> 0); None takes `adc.GAUSSIAN_CLIP` at ``adc_bits`` (the clip that
      minimizes a Gaussian input's quantization MSE). Ignored (with a warning) when
      ``adc_bits`` is 0.
  """
  modulation: str = "qam16"
  modulations: tuple[str, ...] = ("bpsk", "qpsk", "psk8", "qam16", "qam64")
  seq_len: int = 128
  num_pilots: int = 16
  modulation_pilots: bool = False
  profile: str = "exponential"
  k_factor_db: float = 10.0
  delay_spread_ns: float = 50.0
  sample_rate_hz: float = 20e6
  num_taps: int | None = None
  doppler_hz: float = 0.0
  doppler_model: str = "kl"
  doppler_sinusoids: int = 8
  snr_db: float | tuple[float, float] = (0.0, 20.0)
  snr_type: str = "es_n0"
  adc_bits: int = 0
  adc_clip: float | None = None

  def __post_init__(self):
    constellations.check_modulation(self.modulation)
    mods = self.modulations
    if isinstance(mods, str) or not isinstance(mods, (tuple, list)) or not mods:
      raise ValueError(f"modulations must be a non-empty tuple of names from "
                       f"{constellations.MODULATIONS}, got {mods!r}")
    for m in mods:
      if m not in constellations.MODULATIONS:
        raise ValueError(f"modulations must only contain names from "
                         f"{constellations.MODULATIONS}, got {m!r}")
    if len(set(mods)) != len(mods):
      raise ValueError(f"modulations must not repeat a name, got {tuple(mods)!r}")
    object.__setattr__(self, "modulations", tuple(mods))
    _check_int("seq_len", self.seq_len, 1, 1 << 20)
    _check_int("num_pilots", self.num_pilots, 0, self.seq_len - 1)
    if not isinstance(self.modulation_pilots, bool):
      raise ValueError(f"modulation_pilots must be True or False, got {self.modulation_pilots!r}")
    if self.profile not in fading.PROFILES:
      raise ValueError(f"profile must be one of {fading.PROFILES}, got {self.profile!r}")
    k = self.k_factor_db
    if not _is_real(k) or math.isnan(k) or k == math.inf:
      raise ValueError(f"k_factor_db must be a finite number in dB or -inf (Rayleigh), "
                       f"got {k!r}")
    _check_finite("delay_spread_ns", self.delay_spread_ns, 0.0)
    _check_finite("sample_rate_hz", self.sample_rate_hz, 0.0, lo_open=True)
    if self.num_taps is not None:
      _check_int("num_taps (or None)", self.num_taps, 1, MAX_TAPS)
    _check_finite("doppler_hz", self.doppler_hz, 0.0)
    if self.doppler_hz >= self.sample_rate_hz / 2:
      raise ValueError(f"doppler_hz must be below sample_rate_hz / 2 = "
                       f"{self.sample_rate_hz / 2}, got {self.doppler_hz!r}")
    if self.doppler_model not in fading.DOPPLER_MODELS:
      raise ValueError(f"doppler_model must be one of {fading.DOPPLER_MODELS}, "
                       f"got {self.doppler_model!r}")
    _check_int("doppler_sinusoids", self.doppler_sinusoids, 1, MAX_SINUSOIDS)
    snr = self.snr_db
    if isinstance(snr, (tuple, list)):
      if len(snr) != 2 or not all(_is_real(v) and math.isfinite(v) for v in snr):
        raise ValueError(f"snr_db must be a finite float or a (lo, hi) pair of finite "
                         f"floats, got {snr!r}")
      if snr[0] > snr[1]:
        raise ValueError(f"snr_db range must have lo <= hi (a non-empty range), got {snr!r}")
      object.__setattr__(self, "snr_db", (float(snr[0]), float(snr[1])))
    elif not (_is_real(snr) and math.isfinite(snr)):
      raise ValueError(f"snr_db must be a finite float or a (lo, hi) pair of finite floats, "
                       f"got {snr!r}")
    if self.snr_type not in SNR_TYPES:
      raise ValueError(f"snr_type must be one of {SNR_TYPES}, got {self.snr_type!r}")
    if not _is_int(self.adc_bits) or not 0 <= self.adc_bits <= adc.MAX_BITS:
      raise ValueError(f"adc_bits must be an integer in [0, {adc.MAX_BITS}] (0: no ADC), "
                       f"got {self.adc_bits!r}")
    object.__setattr__(self, "adc_bits", int(self.adc_bits))
    if self.adc_clip is not None:
      _check_finite("adc_clip (or None)", self.adc_clip, 0.0, lo_open=True)
      object.__setattr__(self, "adc_clip", float(self.adc_clip))
    # A field the profile ignores, set away from its default and from the value the profile
    # uses, would silently not act: say so (a warning, since configs shared across profiles
    # set such fields on purpose).
    import warnings  # pylint: disable=g-import-not-at-top
    ignored = {"awgn": ("k_factor_db", "delay_spread_ns", "doppler_hz"),
               "flat": ("delay_spread_ns",),
               "inf_los": ("k_factor_db", "delay_spread_ns")}.get(self.profile, ())
    in_force = {"k_factor_db": self.effective_k_factor_db,
                "delay_spread_ns": self.effective_delay_spread_ns, "doppler_hz": 0.0}
    for name in ignored:
      value, default = getattr(self, name), self.__dataclass_fields__[name].default
      if value != default and value != in_force[name]:
        warnings.warn(f"ChannelConfig: profile {self.profile!r} ignores {name} (it uses "
                      f"{in_force[name]:g}), got {name}={value!r}; leave it at its default "
                      f"{default!r} or pick a profile that uses it", UserWarning, stacklevel=3)
    if self.adc_clip is not None and self.adc_bits == 0:
      warnings.warn(f"ChannelConfig: adc_bits=0 (no ADC) ignores adc_clip, got "
                    f"adc_clip={self.adc_clip!r}; set adc_bits in [1, {adc.MAX_BITS}] or "
                    f"leave adc_clip at None", UserWarning, stacklevel=3)

  @property
  def snr_range(self) -> tuple[float, float]:
    """The SNR range (lo, hi) in dB (lo == hi for a fixed SNR), in ``snr_type`` units."""
    if isinstance(self.snr_db, tuple):
      return self.snr_db
    return (float(self.snr_db), float(self.snr_db))

  @property
  def bits_per_symbol(self) -> int:
    """k = log2 M of ``modulation`` (the last dimension of ``Batch.bits``)."""
    return constellations.bits_per_symbol(self.modulation)

  @property
  def effective_k_factor_db(self) -> float:
    """The K-factor (dB) in force: the profile's own for named profiles, inf for "awgn"."""
    if self.profile == "awgn":
      return math.inf
    if self.profile == "inf_los":
      return fading.INF_LOS_K_FACTOR_DB
    return float(self.k_factor_db)

  @property
  def k_factor(self) -> float:
    """The linear K-factor in force (0 = Rayleigh, inf = no fading)."""
    return fading.db_to_linear(self.effective_k_factor_db)

  @property
  def effective_delay_spread_ns(self) -> float:
    """RMS delay spread (ns) of the scattered power in force for this profile."""
    if self.profile in ("awgn", "flat"):
      return 0.0
    if self.profile == "inf_los":
      return fading.INF_LOS_DELAY_SPREAD_NS
    return float(self.delay_spread_ns)

  @property
  def pdp(self) -> np.ndarray:
    """float64 [T]: scattered power per tap, unit sum ("awgn": a unit first tap)."""
    return fading.power_delay_profile(self.profile, self.effective_delay_spread_ns,
                                      self.sample_rate_hz, self.num_taps)

  @property
  def tap_count(self) -> int:
    """T, the number of channel taps (the last dimension of ``Batch.taps``)."""
    return int(self.pdp.shape[0])

  @property
  def tap_powers(self) -> np.ndarray:
    """float64 [T]: mean tap powers E|h_t|^2 including the LOS; they sum to 1."""
    return fading.mean_tap_powers(self.pdp, self.k_factor)

  @property
  def time_varying(self) -> bool:
    """Whether the taps vary over the frame (``doppler_hz > 0`` and a fading profile)."""
    return self.doppler_hz > 0 and self.profile != "awgn"

  @property
  def effective_adc_clip(self) -> float | None:
    """The ADC's clip in RMS units in force: ``adc_clip`` or its default; None when off."""
    if self.adc_bits == 0:
      return None
    return self.adc_clip if self.adc_clip is not None else adc.default_clip(self.adc_bits)

  @property
  def doppler_norm(self) -> float:
    """Normalized maximum Doppler frequency fd / sample_rate (cycles per sample)."""
    return float(self.doppler_hz) / float(self.sample_rate_hz)
