"""Tests of the batch simulator (compressjax/channels/simulate.py).

References are independent NumPy re-implementations (convolution, bit split, SNR law);
statistical checks use fixed seeds and state their tolerance in standard errors.
"""

import math
import sys

import chex
import jax
import jax.extend
import numpy as np
import pytest
from scipy import stats

from compressjax import channels

SIM = sys.modules["compressjax.channels.simulate"]
BLOCK = channels.ChannelConfig(seq_len=32, num_pilots=4)
VARYING = channels.ChannelConfig(seq_len=32, num_pilots=4, doppler_hz=2e5)   # fd Ts = 0.01
MOD = channels.ChannelConfig(seq_len=16, num_pilots=0, profile="awgn", snr_db=200.0,
                             modulations=("bpsk", "qpsk", "psk8", "qam16", "qam64"))


def _np(batch):
  return jax.tree.map(np.asarray, batch)


def _sent_symbols(batch, cfg):
  """Transmitted points rebuilt from the labels, the constellation and the pilots."""
  x = np.asarray(channels.constellation(cfg.modulation))[batch.symbols]
  x[:, :cfg.num_pilots] = np.asarray(channels.pilot_symbols(cfg.num_pilots))
  return x


def _np_convolve(x, taps):
  """y[b, n] = sum_t h[b, (n,) t] x[b, n - t], an explicit loop (zero history)."""
  b, seq = x.shape
  h = taps if taps.ndim == 3 else np.broadcast_to(taps[:, None, :], (b, seq, taps.shape[-1]))
  y = np.zeros((b, seq), np.complex128)
  for n in range(seq):
    for t in range(min(n + 1, h.shape[-1])):
      y[:, n] += h[:, n, t] * x[:, n - t]
  return y


@pytest.mark.parametrize("cfg", [BLOCK, VARYING], ids=["block", "doppler"])
def test_shapes_dtypes_and_one_structure_for_all_tasks(cfg):
  tasks = channels.TASKS if cfg is BLOCK else ("symbols",)
  batches = [channels.simulate(jax.random.key(0), cfg, 8, task) for task in tasks]
  b = batches[0]
  chex.assert_shape(b.iq, (8, 32, 2))
  chex.assert_shape([b.label, b.snr_db, b.noise_var], (8,))
  chex.assert_shape(b.symbols, (8, 32))
  chex.assert_shape(b.bits, (8, 32, 4))
  chex.assert_shape(b.pilot_mask, (32,))
  chex.assert_shape(b.taps, (8, 32, 7) if cfg.time_varying else (8, 7))
  assert [str(a.dtype) for a in b] == ["float32", "int32", "float32", "int32", "int32",
                                       "bool", "complex64", "float32"]
  for other in batches[1:]:
    chex.assert_trees_all_equal_shapes_and_dtypes(b, other)
    assert jax.tree.structure(b) == jax.tree.structure(other)


@pytest.mark.parametrize("cfg, task", [(BLOCK, "modulation"), (VARYING, "symbols")])
def test_same_key_same_batch_vmapped_equals_looped(cfg, task):
  key = jax.random.key(7)
  a, b = _np(channels.simulate(key, cfg, 8, task)), _np(channels.simulate(key, cfg, 8, task))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  c = _np(channels.simulate(jax.random.key(8), cfg, 8, task))
  assert not np.allclose(a.iq, c.iq) and not np.array_equal(a.symbols, c.symbols)
  one = jax.jit(lambda k: channels.simulate_example(k, cfg, task))
  for i, k in enumerate(jax.random.split(key, 8)):
    e = _np(one(k))
    for name in ("label", "symbols", "bits"):
      np.testing.assert_array_equal(getattr(a, name)[i], getattr(e, name))
    np.testing.assert_array_equal(a.pilot_mask, e.pilot_mask)
    for name in ("iq", "snr_db", "taps", "noise_var"):
      np.testing.assert_allclose(getattr(a, name)[i], getattr(e, name), rtol=1e-6, atol=1e-6)


def test_pilots_are_a_fixed_unit_energy_qpsk_preamble():
  p = np.asarray(channels.pilot_symbols(16))
  np.testing.assert_array_equal(p, np.asarray(channels.pilot_symbols(16)))
  np.testing.assert_array_equal(p[:5], np.asarray(channels.pilot_symbols(5)))
  qpsk = np.asarray(channels.constellation("qpsk"))
  assert np.all(np.min(np.abs(p[:, None] - qpsk[None]), 1) < 1e-7)
  np.testing.assert_allclose(np.abs(p), 1.0, rtol=1e-6)
  assert channels.pilot_symbols(0).shape == (0,)
  b = _np(channels.simulate(jax.random.key(1), BLOCK, 8, "symbols"))
  np.testing.assert_array_equal(b.pilot_mask, np.arange(32) < 4)
  assert not b.symbols[:, :4].any() and not b.bits[:, :4].any() and b.symbols[:, 4:].any()
  np.testing.assert_array_equal(b.label, 0)


@pytest.mark.parametrize("cfg", [BLOCK, VARYING], ids=["block", "doppler"])
def test_received_frame_is_convolution_plus_noise_of_configured_power(cfg):
  n = 2048
  b = _np(channels.simulate(jax.random.key(2), cfg, n, "channel"))
  x = _sent_symbols(b, cfg)
  y_clean = _np_convolve(x, b.taps.astype(np.complex128))
  w = b.iq[..., 0] + 1j * b.iq[..., 1] - y_clean
  ratio = np.abs(w) ** 2 / b.noise_var[:, None]
  # |w|^2 / N0 ~ Exp(1): mean 1, std 1, 65536 samples: 0.02 is 5 standard errors.
  assert abs(ratio.mean() - 1) < 0.02
  assert abs(np.mean(w * w / b.noise_var[:, None])) < 0.02          # circular noise
  assert abs(np.mean(w * np.conj(x) / np.sqrt(b.noise_var[:, None]))) < 0.02
  # Unit symbol energy, and unit mean received signal power after the first T-1 samples.
  assert abs(np.mean(np.abs(x[:, 4:]) ** 2) - 1) < 0.02
  assert abs(np.mean(np.abs(y_clean[:, 8:]) ** 2) - 1) < 0.03
  k = cfg.bits_per_symbol
  np.testing.assert_array_equal(b.bits, (b.symbols[..., None] >> np.arange(k - 1, -1, -1)) & 1)
  batch = jax.tree.map(jax.numpy.asarray, b)
  np.testing.assert_allclose(channels.transmitted_symbols(batch, cfg, "channel"), x, atol=1e-6)
  np.testing.assert_allclose(channels.noiseless_output(batch, cfg, "channel"), y_clean,
                             atol=1e-5)


def test_snr_law_and_no_recompile_across_snr_ranges():
  n = 4096
  cfg = channels.ChannelConfig(seq_len=8, num_pilots=2, snr_db=(0.0, 20.0))
  b = _np(channels.simulate(jax.random.key(3), cfg, n))
  assert b.snr_db.min() >= 0.0 and b.snr_db.max() <= 20.0
  assert stats.kstest(b.snr_db, stats.uniform(0, 20).cdf).pvalue > 1e-3
  np.testing.assert_allclose(b.noise_var, 10 ** (-b.snr_db / 10), rtol=1e-5)
  size = SIM._simulate._cache_size()
  fixed = _np(channels.simulate(jax.random.key(3), channels.ChannelConfig(
      seq_len=8, num_pilots=2, snr_db=7.5), n))
  assert SIM._simulate._cache_size() == size                       # same executable
  np.testing.assert_allclose(fixed.snr_db, 7.5)
  np.testing.assert_allclose(fixed.noise_var, 10 ** -0.75, rtol=1e-5)


def test_eb_n0_converts_with_bits_per_symbol():
  cfg = channels.ChannelConfig(seq_len=16, num_pilots=0, profile="awgn", snr_db=(2.0, 8.0),
                               snr_type="eb_n0",
                               modulations=("bpsk", "qam16", "qam64"))
  b = _np(channels.simulate(jax.random.key(4), cfg, 64, "modulation"))
  k = np.array([1, 4, 6])[b.label]
  np.testing.assert_allclose(b.noise_var, 10 ** (-(b.snr_db + 10 * np.log10(k)) / 10),
                             rtol=1e-5)


def test_modulation_task_classes_and_points():
  n = 4096
  b = _np(channels.simulate(jax.random.key(5), MOD, n, "modulation"))
  counts = np.bincount(b.label, minlength=5)
  lo, hi = stats.binom.interval(0.999, n, 1 / 5)
  assert np.all((counts >= lo) & (counts <= hi)), counts
  assert not b.pilot_mask.any() and not b.bits.any()
  y = b.iq[..., 0] + 1j * b.iq[..., 1]
  for c, name in enumerate(MOD.modulations):
    rows = b.label == c
    m = channels.order(name)
    assert b.symbols[rows].max() == m - 1 and b.symbols[rows].min() == 0
    want = np.asarray(channels.constellation(name))[b.symbols[rows]]
    np.testing.assert_allclose(y[rows], want, atol=1e-5)      # 200 dB: noise-free
  sent = channels.transmitted_symbols(jax.tree.map(jax.numpy.asarray, b), MOD, "modulation")
  np.testing.assert_allclose(sent, y, atol=1e-5)
  np.testing.assert_array_equal(b.taps, 1.0)


def test_modulation_frames_can_carry_the_preamble():
  import dataclasses
  cfg = dataclasses.replace(MOD, modulation_pilots=True, num_pilots=6)
  b = _np(channels.simulate(jax.random.key(5), cfg, 256, "modulation"))
  np.testing.assert_array_equal(b.pilot_mask, np.arange(cfg.seq_len) < 6)
  assert not b.symbols[:, :6].any()
  y = b.iq[..., 0] + 1j * b.iq[..., 1]                        # 200 dB: noise-free
  np.testing.assert_allclose(y[:, :6], np.broadcast_to(channels.pilot_symbols(6), (256, 6)),
                             atol=1e-5)
  for c, name in enumerate(cfg.modulations):                   # the payload is the class's
    rows = b.label == c
    want = np.asarray(channels.constellation(name))[b.symbols[rows, 6:]]
    np.testing.assert_allclose(y[rows, 6:], want, atol=1e-5)
  sent = channels.transmitted_symbols(jax.tree.map(jax.numpy.asarray, b), cfg, "modulation")
  np.testing.assert_allclose(sent, y, atol=1e-5)
  with pytest.raises(ValueError, match="modulation_pilots must be True or False"):
    dataclasses.replace(MOD, modulation_pilots=1)


def test_packed_symbols_are_uniform_and_independent():
  # Symbols share uint32 words (8 per word for 16-QAM, 5 six-bit lanes in the modulation
  # task): every symbol and every adjacent pair must still be uniform. Chi-square tests at
  # the 0.1% level.
  b = _np(channels.simulate(jax.random.key(13), VARYING, 1024, "symbols"))
  s = b.symbols[:, VARYING.num_pilots:]
  assert stats.chisquare(np.bincount(s.ravel(), minlength=16)).pvalue > 1e-3
  pairs = s[:, :-1] * 16 + s[:, 1:]
  assert stats.chisquare(np.bincount(pairs.ravel(), minlength=256)).pvalue > 1e-3
  m = _np(channels.simulate(jax.random.key(14), MOD, 2048, "modulation"))
  for c, name in enumerate(MOD.modulations):
    counts = np.bincount(m.symbols[m.label == c].ravel(), minlength=channels.order(name))
    assert stats.chisquare(counts).pvalue > 1e-3, name


def test_noise_is_circular_gaussian_with_16_bit_phases():
  # AWGN through the unit tap: iq - x is the noise alone. Kolmogorov-Smirnov at 0.1%:
  # each part N(0, N0/2), |w|^2 / N0 ~ Exp(1), the phase uniform.
  cfg = channels.ChannelConfig(seq_len=64, num_pilots=0, profile="awgn", snr_db=(0.0, 20.0))
  b = _np(channels.simulate(jax.random.key(15), cfg, 1024, "symbols"))
  w = b.iq[..., 0] + 1j * b.iq[..., 1] - _sent_symbols(b, cfg)
  w = (w / np.sqrt(b.noise_var[:, None])).ravel()
  for part in (w.real, w.imag):
    assert stats.kstest(part, stats.norm(scale=math.sqrt(0.5)).cdf).pvalue > 1e-3
  assert stats.kstest(np.abs(w) ** 2, stats.expon.cdf).pvalue > 1e-3
  assert stats.kstest(np.angle(w), stats.uniform(-np.pi, 2 * np.pi).cdf).pvalue > 1e-3
