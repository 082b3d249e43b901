"""Batches of simulated frames for the three tasks: a pure, jitted function of (key, config).

One example is one frame of L complex samples through the channel of its `ChannelConfig`:

  y[n] = sum_t h[n, t] x[n - t] + w[n],  x[n < 0] = 0,  w ~ CN(0, N0),

with unit-energy symbols x, taps h from `fading` (E sum_t |h|^2 = 1) and N0 from an SNR
drawn per example, so the mean received Es/N0 is the drawn SNR. With ``cfg.adc_bits`` > 0
the frame then goes through the receiver's ADC (`adc.adc_quantize_parts`: AGC to the
frame's RMS level, b bits on I and on Q) in every task, so training and evaluation frames
see the same receiver; ``adc_bits`` = 0 leaves y as above, bit for bit.

`simulate_example` draws one frame from one key; `simulate` splits a key into
``batch_size`` keys and vmaps it under ``jit`` (config, batch size and task static; the SNR
range is data), so the same key gives the same batch and example i depends only on the
i-th split key.

Speed on XLA:CPU (measured, see bench/channel_throughput.py): the batch keys come from
`variates.split` (bit for bit ``jax.random.split``, unrolled); each example draws all its
randomness as ONE block of uint32 words (`variates.random_words`), as few as the frame
needs (16-bit noise phases, 32 // k symbols per word); the channel comes from `fading`'s
``*_parts`` functions, float32 real and imaginary parts (XLA:CPU vectorizes those, not
complex64 ones) with time-varying taps built time-major, the layout of ``Batch.taps``;
with such taps the received samples are one variadic reduction (`_received_parts`).
Keep the default threefry keys: "rbg"/"unsafe_rbg" keys are slower here and break the
vmap contract (XLA batches RngBitGenerator from the first key only, so vmapped and looped
draws differ).

Tasks share one frame generator and one `Batch` structure per config:
  "modulation": a class c uniform over ``cfg.modulations``; the L symbols are uniform
    points of that modulation (after the preamble if ``cfg.modulation_pilots``, else no
    pilots); ``label`` = c, ``symbols`` = the sent indices (of the example's own
    modulation, 0 at pilot positions), ``bits`` = 0.
  "symbols": ``cfg.modulation`` with the `pilot_symbols` preamble on the first P positions;
    ``symbols`` / ``bits`` are the data labels, 0 at pilot positions (mask with
    ``pilot_mask``); ``label`` = 0.
  "channel": the "symbols" frame; the regression target is ``taps``.
"""

import dataclasses
import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from compressjax.channels import adc
from compressjax.channels import constellations
from compressjax.channels import fading
from compressjax.channels import variates
from compressjax.channels.config import ChannelConfig

TASKS = ("modulation", "symbols", "channel")
PILOT_SEED = 20240607
_PILOT_BLOCK = 1024


class Batch(NamedTuple):
  """A batch of frames (B examples, L samples, k bits per symbol, T taps).

  Attributes:
    iq: float32 [B, L, 2] received samples, (real, imaginary); the ADC's output levels
      when ``cfg.adc_bits`` > 0.
    label: int32 [B] modulation class index into ``cfg.modulations`` ("modulation"
      task), else 0.
    snr_db: float32 [B] drawn SNR in dB, in ``cfg.snr_type`` units.
    symbols: int32 [B, L] sent symbol indices (0 at pilot positions).
    bits: int32 [B, L, k] their bits, MSB first, k = ``cfg.bits_per_symbol`` (0 at pilot
      positions and in the "modulation" task).
    pilot_mask: bool [L] true at pilot positions (shared by the batch).
    taps: complex64 [B, T] (block fading) or [B, L, T] (``cfg.doppler_hz > 0``).
    noise_var: float32 [B] (thermal) noise variance N0 per complex sample, without the
      ADC's quantization error.
  """
  iq: jnp.ndarray
  label: jnp.ndarray
  snr_db: jnp.ndarray
  symbols: jnp.ndarray
  bits: jnp.ndarray
  pilot_mask: jnp.ndarray
  taps: jnp.ndarray
  noise_var: jnp.ndarray


@functools.lru_cache(maxsize=None)
def _points(name: str) -> np.ndarray:
  """NumPy complex64 [M] constellation points (concrete even while tracing)."""
  with jax.ensure_compile_time_eval():
    return np.asarray(constellations.constellation(name))


@functools.lru_cache(maxsize=None)
def _pilot_table(num_pilots: int) -> np.ndarray:
  block = max(_PILOT_BLOCK, num_pilots)
  idx = np.random.default_rng(PILOT_SEED).integers(0, 4, size=block)
  return _points("qpsk")[idx[:num_pilots]].astype(np.complex64)


def pilot_symbols(num_pilots: int) -> jnp.ndarray:
  """The fixed pilot preamble: unit-energy QPSK points from a fixed NumPy seed.

  Args:
    num_pilots: P >= 0. Sequences for P <= 1024 are prefixes of one another.

  Returns:
    complex64 [P], the same on every call.
  """
  if not isinstance(num_pilots, (int, np.integer)) or num_pilots < 0:
    raise ValueError(f"num_pilots must be an integer >= 0, got {num_pilots!r}")
  return jnp.asarray(_pilot_table(int(num_pilots)))


def _check_task(task: str) -> None:
  if task not in TASKS:
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def _pilot_mask(cfg: ChannelConfig, task: str) -> np.ndarray:
  p = 0 if task == "modulation" and not cfg.modulation_pilots else cfg.num_pilots
  return np.arange(cfg.seq_len) < p


def _class_table(mods: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
  """Points of every class, zero-padded to the largest M: [C, M_max]; and k per class."""
  m_max = max(constellations.order(m) for m in mods)
  table = np.zeros((len(mods), m_max), np.complex64)
  for c, m in enumerate(mods):
    table[c, :constellations.order(m)] = _points(m)
  return table, np.array([constellations.bits_per_symbol(m) for m in mods], np.uint32)


def _lane_bits(cfg: ChannelConfig, task: str) -> int:
  """Bits each symbol draws: k, or in the "modulation" task the largest k of the classes."""
  if task != "modulation":
    return cfg.bits_per_symbol
  return max(constellations.bits_per_symbol(m) for m in cfg.modulations)


def _symbol_words(cfg: ChannelConfig, task: str) -> int:
  return -(-cfg.seq_len // (32 // _lane_bits(cfg, task)))


def _parts(table: np.ndarray, index) -> tuple[jnp.ndarray, jnp.ndarray]:
  return jnp.asarray(table.real)[index], jnp.asarray(table.imag)[index]


def _draw_symbols(words, cfg: ChannelConfig, task: str, u_class):
  """Symbol indices [L], points (real, imag) [L], class and bits per symbol from words.

  Each word holds 32 // w lanes of w = `_lane_bits` bits, one symbol per lane, taken MSB
  first; M is a power of two, so the top k bits of a lane are uniform over the M points.
  """
  width = _lane_bits(cfg, task)
  shifts = np.uint32(32 - width * (np.arange(32 // width) + 1))
  lanes = ((words[:, None] >> shifts) & np.uint32((1 << width) - 1)).reshape(-1)
  lanes = lanes[:cfg.seq_len]
  if task != "modulation":
    idx = lanes.astype(jnp.int32)
    return idx, _parts(_points(cfg.modulation), idx), jnp.int32(0), width
  table, ks = _class_table(cfg.modulations)
  cls = jnp.minimum((u_class * table.shape[0]).astype(jnp.int32), table.shape[0] - 1)
  k = jnp.asarray(ks)[cls]
  idx = (lanes >> (np.uint32(width) - k)).astype(jnp.int32)
  return idx, _parts(table.reshape(-1), cls * table.shape[1] + idx), cls, k


def _channel_words(cfg: ChannelConfig) -> int:
  if cfg.profile == "awgn":
    return 0
  if cfg.time_varying:
    return fading.doppler_taps_words(cfg.tap_count, cfg.doppler_norm, cfg.seq_len,
                                     cfg.doppler_model, cfg.doppler_sinusoids)
  return fading.block_taps_words(cfg.tap_count)


def _convolve(x: jnp.ndarray, taps: jnp.ndarray) -> jnp.ndarray:
  """y[n] = sum_t taps[(n,) t] x[n - t], zero history; ``taps`` is [T] or [L, T]."""
  parts = _received_parts((jnp.real(x), jnp.imag(x)), (jnp.real(taps), jnp.imag(taps)))
  return jax.lax.complex(*parts)


def _received_parts(x, taps, noise=None):
  """(real, imag) of sum_t taps[(n,) t] x[n - t] (+ noise[n]) from float32 parts.

  Real arithmetic: XLA:CPU vectorizes float32 loops and not complex64 ones. Time-varying
  taps sum the T products and the noise as T + 1 terms of ONE two-output ``lax.reduce``,
  so XLA computes each sample's real and imaginary parts in one pass (as two arrays,
  every shared term, noise and LOS phasor, is evaluated twice); block taps are faster
  as fused multiply-adds (the reduction measured 2-5x slower there).
  """
  (x_re, x_im), (h_re, h_im) = x, taps
  if h_re.shape[-1] == 1:
    # A zero second tap keeps x a separate fusion on XLA:CPU; fused alone, the gather
    # of x and the Box-Muller noise share one loop that runs scalar, twice as slow.
    h_re, h_im = (jnp.concatenate([h, jnp.zeros_like(h)], -1) for h in (h_re, h_im))
  num_taps, seq_len = h_re.shape[-1], x_re.shape[0]
  pad = np.zeros((num_taps - 1,), np.float32)
  xp_re, xp_im = jnp.concatenate([pad, x_re]), jnp.concatenate([pad, x_im])
  terms_re, terms_im = [], []
  for t in range(num_taps):
    s_re = xp_re[num_taps - 1 - t:num_taps - 1 - t + seq_len]
    s_im = xp_im[num_taps - 1 - t:num_taps - 1 - t + seq_len]
    g_re, g_im = h_re[..., t], h_im[..., t]
    terms_re.append(g_re * s_re - g_im * s_im)
    terms_im.append(g_re * s_im + g_im * s_re)
  if noise is not None:
    terms_re.append(noise[0])
    terms_im.append(noise[1])
  if h_re.ndim == 1:
    return sum(terms_re), sum(terms_im)
  zero = np.float32(0)
  return jax.lax.reduce((jnp.stack(terms_re, -1), jnp.stack(terms_im, -1)), (zero, zero),
                        lambda a, b: (a[0] + b[0], a[1] + b[1]), (1,))


def _pilot_frame(cfg: ChannelConfig) -> np.ndarray:
  """complex64 [L]: the pilot preamble in its first P positions, zeros elsewhere."""
  frame = np.zeros(cfg.seq_len, np.complex64)
  frame[:cfg.num_pilots] = _pilot_table(cfg.num_pilots)
  return frame


def _check_args(cfg, task: str) -> None:
  _check_task(task)
  if not isinstance(cfg, ChannelConfig):
    raise ValueError(f"cfg must be a ChannelConfig, got {type(cfg).__name__}")


def _example(key, cfg: ChannelConfig, task: str, snr_lo, snr_hi) -> Batch:
  """One frame; the SNR range is an argument (traced under `simulate`), not ``cfg``'s."""
  seq = cfg.seq_len
  # ONE PRNG call per example: [class, snr | L noise radii | L noise phases, 16 bits each |
  # symbols, 32 // w per word | channel].
  o_phase = 2 + seq
  o_sym = o_phase + (seq + 1) // 2
  o_chan = o_sym + _symbol_words(cfg, task)
  bits = variates.random_words(key, o_chan + _channel_words(cfg))
  u = variates.uniform_from_bits(bits[:2])
  snr_db = snr_lo + (snr_hi - snr_lo) * u[1]
  idx, (x_re, x_im), label, k = _draw_symbols(bits[o_sym:o_chan], cfg, task, u[0])
  es_n0_db = snr_db
  if cfg.snr_type == "eb_n0":
    es_n0_db = snr_db + 10.0 * jnp.log10(jnp.asarray(k, jnp.float32))
  noise_var = jnp.power(jnp.float32(10.0), -es_n0_db / 10.0)

  mask = _pilot_mask(cfg, task)
  if mask.any():
    pilots = _pilot_frame(cfg)
    x_re, x_im = jnp.where(mask, pilots.real, x_re), jnp.where(mask, pilots.imag, x_im)
    idx = jnp.where(mask, 0, idx)
  if task == "modulation":
    bits_out = jnp.zeros((seq, cfg.bits_per_symbol), jnp.int32)
  else:
    bits_out = constellations.indices_to_bits(idx, cfg.modulation)

  chan = bits[o_chan:]
  if cfg.profile == "awgn":
    h = np.eye(1, cfg.tap_count, dtype=np.float32)[0]
    h = (jnp.asarray(h), jnp.zeros_like(h))
  elif cfg.time_varying:
    h = fading.doppler_taps_parts(chan, cfg.pdp, cfg.k_factor, cfg.doppler_norm, seq,
                                  cfg.doppler_model, cfg.doppler_sinusoids)
  else:
    h = fading.block_taps_parts(chan, cfg.pdp, cfg.k_factor)

  half = bits[o_phase:o_sym]
  turns = jnp.concatenate([half >> np.uint32(16), half & np.uint32(0xFFFF)])[:seq]
  turns = turns.astype(jnp.float32) * np.float32(2.0 ** -16)
  w_re, w_im = variates.normal_parts_from_bits(bits[2:o_phase], turns)
  std = jnp.sqrt(noise_var)
  y_re, y_im = _received_parts((x_re, x_im), h, (std * w_re, std * w_im))
  if cfg.adc_bits:
    y_re, y_im = adc.adc_quantize_parts(y_re, y_im, cfg.adc_bits, cfg.effective_adc_clip)
  return Batch(iq=jnp.stack([y_re, y_im], -1), label=label,
               snr_db=snr_db, symbols=idx, bits=bits_out, pilot_mask=jnp.asarray(mask),
               taps=jax.lax.complex(*h), noise_var=noise_var)


def simulate_example(key: chex.PRNGKey, cfg: ChannelConfig, task: str = "symbols") -> Batch:
  """Draws one frame: every `Batch` field without the batch dimension.

  Args:
    key: PRNG key of this example.
    cfg: the channel configuration (static).
    task: one of `TASKS` (static).

  Returns:
    A `Batch` of one example (iq [L, 2], label [], ..., pilot_mask [L], taps [T] or
    [L, T], noise_var []).
  """
  _check_args(cfg, task)
  lo, hi = cfg.snr_range
  return _example(key, cfg, task, jnp.float32(lo), jnp.float32(hi))


@functools.partial(jax.jit, static_argnames=("cfg", "batch_size", "task"))
def _simulate(key, cfg, batch_size, task, snr_lo, snr_hi):
  keys = variates.split(key, batch_size)
  axes = Batch(*([0] * len(Batch._fields)))._replace(pilot_mask=None)
  return jax.vmap(lambda k: _example(k, cfg, task, snr_lo, snr_hi), out_axes=axes)(keys)


def simulate(key: chex.PRNGKey, cfg: ChannelConfig, batch_size: int,
             task: str = "symbols") -> Batch:
  """Draws a batch of frames, jitted and vmapped.

  Compiled once per (cfg without its SNR, batch_size, task): the SNR range is passed as
  data, so sweeping ``snr_db`` (an evaluation over an SNR grid) does not recompile.

  Args:
    key: PRNG key; example i is `simulate_example` of ``jax.random.split(key, B)[i]``.
    cfg: the channel configuration.
    batch_size: B >= 1.
    task: one of `TASKS`.

  Returns:
    A `Batch` with fixed shapes for a given (cfg, batch_size): every task has the same
    pytree structure, shapes and dtypes.
  """
  _check_args(cfg, task)
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
      or batch_size < 1:
    raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
  return _simulate(key, _without_snr(cfg), int(batch_size), task, *_snr_bounds(cfg.snr_range))


@functools.lru_cache(maxsize=256)
def _without_snr(cfg: ChannelConfig) -> ChannelConfig:
  return dataclasses.replace(cfg, snr_db=0.0)


@functools.lru_cache(maxsize=256)
def _snr_bounds(snr_range: tuple[float, float]) -> tuple[jax.Array, jax.Array]:
  # Kept on the device: two host scalars to transfer cost ~8% of a B=256 training batch.
  with jax.ensure_compile_time_eval():
    return jnp.float32(snr_range[0]), jnp.float32(snr_range[1])


def transmitted_symbols(batch: Batch, cfg: ChannelConfig, task: str = "symbols") -> jnp.ndarray:
  """The sent points x of a batch, rebuilt from its labels, the constellation and pilots.

  Args:
    batch: a `Batch` drawn with ``cfg`` and ``task``.
    cfg: its configuration.
    task: its task.

  Returns:
    complex64 [B, L].
  """
  _check_args(cfg, task)
  if task == "modulation":
    table, _ = _class_table(cfg.modulations)
    x = jnp.asarray(table)[batch.label[:, None], batch.symbols]
  else:
    x = jnp.asarray(_points(cfg.modulation))[batch.symbols]
  return jnp.where(batch.pilot_mask, _pilot_frame(cfg), x)


def noiseless_output(batch: Batch, cfg: ChannelConfig, task: str = "symbols") -> jnp.ndarray:
  """The received frame without noise, sum_t h[(n,) t] x[n - t], of every example.

  Args:
    batch: a `Batch` drawn with ``cfg`` and ``task``.
    cfg: its configuration.
    task: its task.

  Returns:
    complex64 [B, L]; ``iq`` minus this is the noise (and, with ``cfg.adc_bits`` > 0, the
    quantization error).
  """
  return jax.vmap(_convolve)(transmitted_symbols(batch, cfg, task), batch.taps)
