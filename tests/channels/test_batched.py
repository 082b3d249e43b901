"""Batched receivers and the I/Q helpers (compressjax/channels/batched.py)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax import channels
from compressjax.channels import receivers as rx

B = 6
BLOCK = channels.ChannelConfig(modulation="qpsk", seq_len=32, num_pilots=8, num_taps=3,
                               snr_db=(10.0, 20.0))
MOVING = channels.ChannelConfig(modulation="qam16", seq_len=32, num_pilots=8, num_taps=2,
                                doppler_hz=2e5, snr_db=15.0)


def test_iq_complex_round_trip_matches_numpy():
  iq = np.random.default_rng(0).normal(size=(3, 5, 2)).astype(np.float32)
  z = channels.iq_to_complex(iq)
  assert z.dtype == jnp.complex64
  np.testing.assert_array_equal(np.asarray(z), iq[..., 0] + 1j * iq[..., 1])
  back = channels.complex_to_iq(z)
  assert back.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(back), iq)
  with pytest.raises(ValueError, match=r"last axis of size 2 .* got shape \(3, 5\)"):
    channels.iq_to_complex(iq[..., 0])


def _looped(batch, cfg, receiver):
  """The per-frame receivers, one frame at a time in a Python loop."""
  y = np.asarray(batch.iq[..., 0]) + 1j * np.asarray(batch.iq[..., 1])
  x_pilot = channels.pilot_symbols(cfg.num_pilots)
  outs = []
  for b in range(y.shape[0]):
    yb = jnp.asarray(y[b], jnp.complex64)
    n0 = batch.noise_var[b]
    if receiver == "ls":
      out = rx.ls_receiver(yb, x_pilot, cfg.tap_count, n0, cfg.modulation)
    elif receiver == "lmmse":
      out = rx.lmmse_receiver(yb, x_pilot, jnp.asarray(cfg.tap_powers, jnp.float32), n0,
                              cfg.modulation)
    else:
      out = rx.equalize_and_detect(yb, batch.taps[b], n0, cfg.modulation)
    outs.append(out)
  return jax.tree.map(lambda *xs: np.stack(xs), *outs)


@pytest.mark.parametrize("cfg", [BLOCK, MOVING], ids=["block", "doppler"])
@pytest.mark.parametrize("receiver", channels.RECEIVERS)
def test_run_batch_equals_the_per_frame_receivers_looped(cfg, receiver):
  batch = channels.simulate(jax.random.key(1), cfg, B)
  got = channels.run_batch(batch, cfg, receiver)
  want = _looped(batch, cfg, receiver)
  k = cfg.bits_per_symbol
  chex.assert_shape([got.symbols, got.llr, got.x_hat, got.sinr, got.taps],
                    [(B, 32), (B, 32, k), (B, 32), (B, 32), (B, cfg.tap_count)])
  np.testing.assert_array_equal(np.asarray(got.symbols), want.symbols)
  for field in ("llr", "x_hat", "sinr", "taps"):
    np.testing.assert_allclose(np.asarray(getattr(got, field)), getattr(want, field),
                               rtol=2e-4, atol=2e-4, err_msg=field)


def test_perfect_csi_at_high_snr_detects_every_symbol():
  cfg = channels.ChannelConfig(modulation="qpsk", seq_len=32, num_pilots=8, profile="flat",
                               snr_db=40.0)
  batch = channels.simulate(jax.random.key(2), cfg, B)
  out = channels.run_batch(batch, cfg, "perfect_csi")
  data = ~np.asarray(batch.pilot_mask)
  np.testing.assert_array_equal(np.asarray(out.symbols)[:, data],
                                np.asarray(batch.symbols)[:, data])


def test_bad_arguments_raise():
  batch = channels.simulate(jax.random.key(3), BLOCK, 2)
  with pytest.raises(ValueError, match=r"receiver must be one of \('ls', 'lmmse', "
                                       r"'perfect_csi'\), got 'zf'"):
    channels.run_batch(batch, BLOCK, "zf")
  other = channels.ChannelConfig(modulation="qpsk", seq_len=16, num_pilots=8, num_taps=3)
  with pytest.raises(ValueError, match=r"batch.iq must have shape \[B, 16, 2\]"):
    channels.run_batch(batch, other, "ls")
  blind = channels.simulate(jax.random.key(3), BLOCK, 2, task="modulation")
  with pytest.raises(ValueError, match="must mark cfg.num_pilots = 8 .* got 0"):
    channels.run_batch(blind, BLOCK, "lmmse")
  few = channels.ChannelConfig(modulation="qpsk", seq_len=32, num_pilots=2, num_taps=3)
  with pytest.raises(ValueError, match=r"'ls' needs cfg.num_pilots >= 3"):
    channels.run_batch(channels.simulate(jax.random.key(3), few, 2), few, "ls")
  with pytest.raises(ValueError, match=r"tap_powers must have shape \(3,\)"):
    channels.run_batch(batch, BLOCK, "lmmse", tap_powers=np.ones(4))
