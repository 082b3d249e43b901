"""The simulator agrees with communication theory (channels.simulate vs channels.theory).

Error counts are checked against 99% intervals of the closed forms, with fixed seeds. In
AWGN the symbol errors are independent, so the interval is binomial over symbols. Under
block fading the symbols of a frame share one channel, so the interval is a CLT interval
over frames (independent realizations), from the spread of the per-frame error rates.
Each check is at 99%, so about one (seed, point) pair in a hundred misses by chance; the
seeds are fixed, so the outcome is deterministic.
"""

import math

import jax
import numpy as np
import pytest
from scipy import stats

from compressjax import channels
from compressjax.channels import theory

Z99 = stats.norm.ppf(0.995)


def _received(batch):
  return np.asarray(batch.iq[..., 0]) + 1j * np.asarray(batch.iq[..., 1])


@pytest.mark.parametrize("m, snrs", [(4, (2.0, 6.0, 9.0)), (16, (10.0, 14.0, 17.0)),
                                     (64, (16.0, 20.0, 23.0))])
def test_qam_ser_in_awgn_within_binomial_interval(m, snrs):
  name = f"qam{m}"
  for i, snr in enumerate(snrs):    # one compilation per modulation: the SNR is data
    cfg = channels.ChannelConfig(modulation=name, profile="awgn", seq_len=256, num_pilots=0,
                                 snr_db=snr)
    b = channels.simulate(jax.random.key(10 * m + i), cfg, 1024, "symbols")
    detected = np.asarray(channels.detect(_received(b), name))
    errors = int(np.sum(detected != np.asarray(b.symbols)))
    n = detected.size
    lo, hi = stats.binom.interval(0.99, n, float(theory.qam_ser_awgn(m, snr)))
    assert lo <= errors <= hi, f"{name} at {snr} dB: {errors} errors of {n}, [{lo}, {hi}]"


@pytest.mark.parametrize("k_db, eb_n0s, ber", [
    (-math.inf, (5.0, 15.0), lambda eb: theory.qpsk_ber_rayleigh(eb)),
    (10.0, (5.0, 10.0), lambda eb: theory.ber_rician("qpsk", eb, 10.0)),
])
def test_qpsk_ber_flat_fading_perfect_csi_within_clt_interval(k_db, eb_n0s, ber):
  frames = 1 << 15
  for i, eb in enumerate(eb_n0s):
    cfg = channels.ChannelConfig(modulation="qpsk", profile="flat", k_factor_db=k_db,
                                 seq_len=8, num_pilots=0, snr_db=eb, snr_type="eb_n0")
    b = channels.simulate(jax.random.key(200 + i), cfg, frames, "symbols")
    h = np.asarray(b.taps)[:, :1]                          # [B, 1] block-fading gain
    # Perfect CSI on a flat channel: argmin |y - h s|^2 = nearest point to y / h (exact ML).
    detected = np.asarray(channels.detect(_received(b) / h, "qpsk"))
    bits = np.asarray(channels.indices_to_bits(detected, "qpsk"))
    per_frame = np.mean(bits != np.asarray(b.bits), axis=(1, 2))
    want = float(ber(eb))
    half = Z99 * per_frame.std(ddof=1) / math.sqrt(frames)
    assert abs(per_frame.mean() - want) <= half, (
        f"K={k_db} dB, Eb/N0={eb} dB: BER {per_frame.mean():.5f} vs {want:.5f} +- {half:.5f}")
