"""Tests of the receiver's ADC (compressjax/channels/adc.py) and its channel option."""

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate
from scipy import stats

from compressjax import channels
from compressjax.channels import adc

ChannelConfig = channels.ChannelConfig
BITS = tuple(range(1, adc.MAX_BITS + 1))


def _frames(seed=0, shape=(3, 4, 256)):
  """Complex Gaussian frames with a different power per frame (complex128)."""
  rng = np.random.default_rng(seed)
  scale = 10.0 ** rng.uniform(-2, 2, shape[:-1] + (1,))
  return scale * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))


def _np_adc(y, bits, clip):
  """NumPy float64 reference: per-frame joint-I/Q RMS, mid-rise codes and levels."""
  rms = np.sqrt(np.mean(np.abs(y) ** 2, axis=-1, keepdims=True) / 2)
  step = 2 * clip * rms / 2 ** bits
  half = 2 ** (bits - 1)
  codes = [np.clip(np.floor(u / step), -half, half - 1) for u in (y.real, y.imag)]
  levels = [(k + 0.5) * step for k in codes]
  return np.stack(codes, -1).astype(np.int64), levels[0] + 1j * levels[1]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("clip", [None, 1.0, 3.5])
def test_quantizer_matches_numpy_reference(bits, clip):
  y = _frames(bits)
  c = adc.default_clip(bits) if clip is None else clip
  want_codes, want = _np_adc(y, bits, c)
  codes, step = adc.adc_codes(jnp.asarray(y, jnp.complex64), bits, clip)
  got = channels.adc_quantize(jnp.asarray(y, jnp.complex64), bits, clip)
  # float32 vs float64 may move a sample lying within an ulp of a cell edge: none here.
  np.testing.assert_array_equal(np.asarray(codes), want_codes)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6, atol=0)
  np.testing.assert_allclose(np.asarray(step),
                             2 * c * np.sqrt(np.mean(np.abs(y) ** 2, -1) / 2) / 2 ** bits,
                             rtol=2e-6)


@pytest.mark.parametrize("bits", BITS)
def test_levels_count_is_two_to_the_bits(bits):
  # A ramp over four times the clip range on I (and reversed on Q) visits every cell.
  ramp = np.linspace(-1.0, 1.0, 8192)
  y = jnp.asarray(ramp - 1j * ramp, jnp.complex64)
  clip = 0.5                          # rms of the ramp = 1 / sqrt(3) per dimension
  out = np.asarray(channels.adc_quantize(y, bits, clip))
  codes, step = adc.adc_codes(y, bits, clip)
  for part, k in ((out.real, codes[..., 0]), (out.imag, codes[..., 1])):
    levels = np.unique(part)
    assert levels.size == 2 ** bits
    np.testing.assert_array_equal(np.unique(np.asarray(k)),
                                  np.arange(-2 ** (bits - 1), 2 ** (bits - 1)))
    # Uniform mid-rise: symmetric, spaced by the step, the outer ones step / 2 inside clip.
    d = 2 * clip * np.sqrt(np.mean(ramp ** 2)) / 2 ** bits
    np.testing.assert_allclose(float(step), d, rtol=1e-6)
    np.testing.assert_allclose(np.diff(levels), d, rtol=1e-4)
    np.testing.assert_allclose(levels, -levels[::-1], rtol=1e-6)
    np.testing.assert_allclose(levels[-1], clip * np.sqrt(np.mean(ramp ** 2)) - d / 2,
                               rtol=1e-5)


def test_one_bit_is_sign_times_the_bussgang_level():
  y = jnp.asarray(_frames(1, (2, 512)), jnp.complex64)
  out = np.asarray(channels.adc_quantize(y, 1))
  rms = np.asarray(channels.agc_rms(jnp.real(y), jnp.imag(y)))[:, None]
  level = adc.GAUSSIAN_CLIP[1] / 2 * rms
  yr, yi = np.asarray(y.real), np.asarray(y.imag)
  np.testing.assert_allclose(out.real, np.where(yr >= 0, 1, -1) * level, rtol=1e-6)
  np.testing.assert_allclose(out.imag, np.where(yi >= 0, 1, -1) * level, rtol=1e-6)
  # The level is E|u| = sqrt(2 / pi) sigma, the MSE-optimal one-bit reconstruction.
  np.testing.assert_allclose(adc.GAUSSIAN_CLIP[1] / 2, math.sqrt(2 / math.pi), atol=5e-4)


@pytest.mark.parametrize("off", [0, None])
def test_off_is_identity(off):
  y = jnp.asarray(_frames(2), jnp.complex64)
  assert channels.adc_quantize(y, off) is y
  re, im = jnp.real(y), jnp.imag(y)
  out = channels.adc_quantize_parts(re, im, off)
  assert out[0] is re and out[1] is im


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_agc_makes_codes_scale_invariant_per_frame(bits):
  y = _frames(3, (4, 1024))
  codes, _ = adc.adc_codes(jnp.asarray(y, jnp.complex64), bits)
  out = np.asarray(channels.adc_quantize(jnp.asarray(y, jnp.complex64), bits))
  for c in (1e-3, 0.37, 2.0, 5e3):
    scaled = jnp.asarray(c * y, jnp.complex64)
    np.testing.assert_array_equal(np.asarray(adc.adc_codes(scaled, bits)[0]), codes)
    np.testing.assert_allclose(np.asarray(channels.adc_quantize(scaled, bits)), c * out,
                               rtol=1e-5)
  # Each frame has its own gain: scaling one frame leaves the others' levels alone.
  y2 = y.copy()
  y2[0] *= 100.0
  out2 = np.asarray(channels.adc_quantize(jnp.asarray(y2, jnp.complex64), bits))
  np.testing.assert_array_equal(out2[1:], out[1:])


def test_jit_vmap_traced_clip_and_zero_frame():
  y = jnp.asarray(_frames(4, (6, 128)), jnp.complex64)
  eager = channels.adc_quantize(y, 4, 2.5)
  jitted = jax.jit(channels.adc_quantize, static_argnums=1)(y, 4, jnp.float32(2.5))
  mapped = jax.vmap(lambda f: channels.adc_quantize(f, 4, 2.5))(y)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(mapped), np.asarray(eager), rtol=1e-6)
  zero = channels.adc_quantize(jnp.zeros((2, 16), jnp.complex64), 2)
  np.testing.assert_array_equal(np.asarray(zero), 0)


@pytest.mark.parametrize("bits, clip, message", [
    (9, None, r"bits must be None or an integer in \[0, 8\]"),
    (-1, None, r"bits must be None or an integer in \[0, 8\]"),
    (2.0, None, r"got 2.0"),
    (True, None, r"got True"),
    (3, 0.0, r"clip must be a finite number > 0"),
    (3, -1.0, r"clip must be a finite number > 0"),
    (3, math.inf, r"clip must be a finite number > 0"),
])
def test_bad_arguments_raise(bits, clip, message):
  with pytest.raises(ValueError, match=message):
    channels.adc_quantize(jnp.ones((8,), jnp.complex64), bits, clip)
  with pytest.raises(ValueError, match=message):
    channels.adc_codes(jnp.ones((8,), jnp.complex64), bits, clip)


def test_codes_need_bits():
  with pytest.raises(ValueError, match=r"bits must be in \[1, 8\] for codes"):
    channels.adc_codes(jnp.ones((8,), jnp.complex64), 0)


# J. Max (1960), Table II: the MSE-optimal uniform quantizer step for N(0, 1), N = 2..32.
_MAX_STEP = {1: 1.596, 2: 0.9957, 3: 0.5860, 4: 0.3352, 5: 0.1881}


def test_gaussian_clip_table_minimizes_the_quantizer_mse():
  for b, step in _MAX_STEP.items():
    np.testing.assert_allclose(2 * adc.GAUSSIAN_CLIP[b] / 2 ** b, step, rtol=1e-3)
  for b in BITS:
    c = adc.GAUSSIAN_CLIP[b]
    mse = adc.gaussian_mse(c, b)
    assert mse < adc.gaussian_mse(c * 0.99, b) and mse < adc.gaussian_mse(c * 1.01, b)
    np.testing.assert_allclose(10 * np.log10(mse), adc.GAUSSIAN_MSE_DB[b], atol=0.006)
  np.testing.assert_allclose(adc.gaussian_mse(adc.GAUSSIAN_CLIP[1], 1), 1 - 2 / np.pi,
                             rtol=1e-5)
  # The closed form against numerical integration of the NumPy quantizer's error.
  for b, c in ((2, 1.3), (3, 2.344), (5, 4.0)):
    step, half = 2 * c / 2 ** b, 2 ** (b - 1)
    level = lambda u, step=step, half=half: (
        np.clip(np.floor(u / step), -half, half - 1) + 0.5) * step
    edges = [-np.inf] + [step * k for k in range(-half + 1, half)] + [np.inf]
    want = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
      inside = lo + step / 2 if np.isfinite(lo) else hi - step / 2
      err = lambda u, l=level(inside): (u - l) ** 2 * stats.norm.pdf(u)
      want += integrate.quad(err, lo, hi, epsabs=1e-13, epsrel=1e-10)[0]
    np.testing.assert_allclose(adc.gaussian_mse(c, b), want, rtol=1e-7)


@pytest.mark.parametrize("kwargs, message", [
    (dict(adc_bits=9), r"adc_bits must be an integer in \[0, 8\] \(0: no ADC\), got 9"),
    (dict(adc_bits=-1), r"adc_bits must be an integer in \[0, 8\].*got -1"),
    (dict(adc_bits=4.0), r"adc_bits must be an integer in \[0, 8\].*got 4.0"),
    (dict(adc_bits=None), r"adc_bits must be an integer in \[0, 8\].*got None"),
    (dict(adc_bits=True), r"adc_bits must be an integer in \[0, 8\].*got True"),
    (dict(adc_bits=2, adc_clip=0.0), r"adc_clip \(or None\) must be a finite number > 0"),
    (dict(adc_bits=2, adc_clip=-2.0), r"adc_clip \(or None\) must be a finite number > 0"),
    (dict(adc_bits=2, adc_clip=math.nan), r"adc_clip \(or None\) must be a finite number"),
    (dict(adc_bits=2, adc_clip="2"), r"adc_clip \(or None\) must be a finite number"),
])
def test_config_rejects_bad_adc_fields(kwargs, message):
  with pytest.raises(ValueError, match=message):
    ChannelConfig(**kwargs)


def test_config_adc_defaults_normalization_and_ignored_clip_warning():
  cfg = ChannelConfig()
  assert (cfg.adc_bits, cfg.adc_clip, cfg.effective_adc_clip) == (0, None, None)
  cfg = ChannelConfig(adc_bits=np.int64(3), adc_clip=2)
  assert type(cfg.adc_bits) is int and type(cfg.adc_clip) is float
  assert cfg == ChannelConfig(adc_bits=3, adc_clip=2.0)
  assert hash(cfg) == hash(ChannelConfig(adc_bits=3, adc_clip=2.0))
  assert ChannelConfig(adc_bits=5).effective_adc_clip == adc.GAUSSIAN_CLIP[5]
  with pytest.warns(UserWarning, match="adc_bits=0 .* ignores adc_clip"):
    ChannelConfig(adc_clip=2.0)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    ChannelConfig(adc_bits=2, adc_clip=2.0)


@pytest.mark.parametrize("task", channels.TASKS)
def test_simulate_quantizes_every_task_after_the_noise(task):
  base = ChannelConfig(seq_len=32, num_pilots=4, profile="inf_los", num_taps=4,
                       doppler_hz=200.0, modulation_pilots=True, snr_db=(0.0, 30.0))
  key = jax.random.key(7)
  ideal = channels.simulate(key, base, 8, task)
  for bits, clip in ((1, None), (3, 1.5)):
    cfg = dataclasses.replace(base, adc_bits=bits, adc_clip=clip)
    got = channels.simulate(key, cfg, 8, task)
    # The same key draws the same frame; only iq changes, to the ADC of the ideal one.
    for name in got._fields:
      if name != "iq":
        np.testing.assert_array_equal(np.asarray(getattr(got, name)),
                                      np.asarray(getattr(ideal, name)))
    y = channels.iq_to_complex(ideal.iq)
    want = channels.adc_quantize(y, bits, clip)
    np.testing.assert_allclose(np.asarray(channels.iq_to_complex(got.iq)), np.asarray(want),
                               rtol=1e-5, atol=1e-7)
    assert max(np.unique(np.asarray(got.iq[i, :, 0])).size for i in range(8)) <= 2 ** bits
    one = channels.simulate_example(jax.random.split(key, 8)[2], cfg, task)
    np.testing.assert_allclose(np.asarray(one.iq), np.asarray(got.iq[2]), rtol=1e-6)


def _linear_snr_db(x, y):
  """SNR (dB) of the LMMSE linear estimate c y of x: rho^2 / (1 - rho^2), and rho."""
  rho2 = abs(np.vdot(x, y)) ** 2 / (np.vdot(x, x).real * np.vdot(y, y).real)
  return 10 * np.log10(rho2 / (1 - rho2)), math.sqrt(rho2)


def test_one_bit_adc_costs_the_linear_receiver_pi_over_2_at_low_snr():
  """QPSK over AWGN at Es/N0 = -15 dB: a 1-bit ADC costs the linear estimate ~1.96 dB.

  The LMMSE (Bussgang) estimate of x from a sample y is c y, c = E[x* y] / E|y|^2; its
  SNR is rho^2 / (1 - rho^2), rho = |E[x* y]| / sqrt(E|x|^2 E|y|^2), which this measures on
  the simulator's frames with and without the ADC (the same key: the same symbols and
  noise). Per real dimension rho = 1 - 2 Q(sqrt(Es/N0)) after a sign quantizer, so the
  loss is 10 log10(pi / 2) = 1.96 dB as Es/N0 -> 0 and 1.92 dB at -15 dB (Mezghani and
  Nossek, ISIT 2012). `receivers.lmmse_receiver` is not used: its pilot-based channel
  estimate solves a P x P system and needs P Es/N0 >> 1 (thousands of pilots here) for
  the estimate's own error not to dominate the loss; the linear estimate above is what
  its equalizer reduces to with a known one-tap channel.

  Tolerance: the sample correlation of n real pairs has a standard deviation of about
  1 / sqrt(n) at small rho, so 10 log10 rho^2 has sigma ~ (20 / ln 10) / (rho sqrt(n));
  3 sigma of each measurement, summed (99.7% or more, whatever their correlation), plus
  the gap between the closed form at -15 dB and the low-SNR limit.
  """
  snr_db, frames, seq = -15.0, 1024, 4096
  cfg = ChannelConfig(modulation="qpsk", profile="awgn", num_pilots=0, seq_len=seq,
                      snr_db=snr_db)
  key = jax.random.key(2024)
  snrs, rhos = [], []
  for bits in (0, 1):
    batch = channels.simulate(key, dataclasses.replace(cfg, adc_bits=bits), frames)
    x = np.asarray(channels.transmitted_symbols(batch, cfg)).ravel()
    snr, rho = _linear_snr_db(x, np.asarray(channels.iq_to_complex(batch.iq)).ravel())
    snrs.append(snr)
    rhos.append(rho)
  n = 2 * frames * seq
  sigma = [20 / math.log(10) / (r * math.sqrt(n)) for r in rhos]
  es_n0 = 10 ** (snr_db / 10)
  rho_1bit = 1 - 2 * stats.norm.sf(math.sqrt(es_n0))
  exact = snr_db - 10 * np.log10(rho_1bit ** 2 / (1 - rho_1bit ** 2))
  limit = 10 * np.log10(np.pi / 2)
  loss = snrs[0] - snrs[1]
  tol = 3 * (sigma[0] + sigma[1])
  assert abs(snrs[0] - snr_db) < 3 * sigma[0], snrs[0]
  assert abs(loss - exact) < tol, (loss, exact, tol)
  assert abs(loss - limit) < tol + (limit - exact), (loss, limit, tol + limit - exact)


def test_lmmse_receiver_on_fine_adc_frames_decides_as_without_it():
  """An 8-bit ADC keeps q(y) ~ y in the input's scale: the study's LMMSE receiver, built
  for ideal samples and the thermal N0, decides almost every payload symbol as without it
  (measured: 99.8% at Es/N0 = 20 dB), and a 2-bit one visibly does not (56%)."""
  cfg = ChannelConfig(seq_len=64, num_pilots=8, profile="inf_los", num_taps=4,
                      modulation_pilots=True, snr_db=20.0)
  key = jax.random.key(5)
  decide = lambda c: np.asarray(
      channels.run_batch(channels.simulate(key, c, 128), c, "lmmse").symbols)[:, 8:]
  ideal = decide(cfg)
  agree = {b: np.mean(decide(dataclasses.replace(cfg, adc_bits=b)) == ideal) for b in (2, 8)}
  assert agree[8] > 0.99 and agree[2] < 0.9, agree
