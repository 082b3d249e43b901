"""Tests of ChannelConfig validation and derived values (compressjax/channels/config.py)."""

import dataclasses
import math
import warnings

import jax
import numpy as np
import pytest

from compressjax import channels
from compressjax.channels import config as config_lib
from compressjax.channels import fading

ChannelConfig = channels.ChannelConfig


def test_default_config_is_valid_hashable_and_static():
  cfg = channels.ChannelConfig()
  assert hash(cfg) == hash(channels.ChannelConfig())
  assert cfg == channels.ChannelConfig()
  assert cfg != channels.ChannelConfig(k_factor_db=3.0)
  # Usable as a jit static argument: the value reaches Python at trace time.
  out = jax.jit(lambda c: np.float32(c.seq_len), static_argnums=0)(cfg)
  assert float(out) == 128.0


def test_lists_are_normalized_to_tuples():
  cfg = channels.ChannelConfig(modulations=["bpsk", "qam16"], snr_db=[2, 4])
  assert cfg.modulations == ("bpsk", "qam16")
  assert cfg.snr_db == (2.0, 4.0)
  hash(cfg)


@pytest.mark.parametrize("kwargs, field, allowed", [
    (dict(modulation="qam8"), "modulation", "qam16"),           # M = 8 is not a square QAM
    (dict(modulation="QAM16"), "modulation", "qam64"),
    (dict(modulations=()), "modulations", "bpsk"),
    (dict(modulations=("qpsk", "qam32")), "modulations", "qam256"),
    (dict(modulations=("qpsk", "qpsk")), "modulations", "repeat"),
    (dict(delay_spread_ns=-1.0), "delay_spread_ns", ">= 0"),
    (dict(delay_spread_ns=math.nan), "delay_spread_ns", ">= 0"),
    (dict(snr_db=math.nan), "snr_db", "finite"),
    (dict(snr_db=(0.0, math.nan)), "snr_db", "finite"),
    (dict(snr_db=(20.0, 0.0)), "snr_db", "lo <= hi"),
    (dict(snr_db=(1.0, 2.0, 3.0)), "snr_db", "(lo, hi)"),
    (dict(profile="rayleigh"), "profile", "'inf_los'"),
    (dict(k_factor_db=math.nan), "k_factor_db", "-inf"),
    (dict(k_factor_db=math.inf), "k_factor_db", "-inf"),
    (dict(seq_len=0), "seq_len", "[1,"),
    (dict(num_pilots=128), "num_pilots", "[0, 127]"),
    (dict(num_taps=0), "num_taps", "[1, 64]"),
    (dict(sample_rate_hz=0.0), "sample_rate_hz", "> 0"),
    (dict(doppler_hz=-5.0), "doppler_hz", ">= 0"),
    (dict(doppler_hz=10e6), "doppler_hz", "sample_rate_hz / 2"),
    (dict(doppler_model="jakes"), "doppler_model", "'kl', 'sos'"),
    (dict(doppler_sinusoids=0), "doppler_sinusoids", "[1, 64]"),
    (dict(snr_type="snr"), "snr_type", "'es_n0', 'eb_n0'"),
])
def test_bad_config_names_field_and_allowed_values(kwargs, field, allowed):
  with pytest.raises(ValueError) as err:
    channels.ChannelConfig(**kwargs)
  msg = str(err.value)
  assert msg.startswith(field), msg
  assert allowed in msg, msg


def test_bad_task_and_batch_size_raise_at_the_boundary():
  cfg = channels.ChannelConfig(seq_len=8, num_pilots=2)
  with pytest.raises(ValueError, match=r"task must be one of \('modulation', 'symbols'"):
    channels.simulate(jax.random.key(0), cfg, 2, "detection")
  with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
    channels.simulate(jax.random.key(0), cfg, 0, "symbols")
  with pytest.raises(ValueError, match="cfg must be a ChannelConfig"):
    channels.simulate(jax.random.key(0), {"seq_len": 8}, 2, "symbols")


def test_derived_tap_counts_and_powers():
  # 50 ns at 20 MHz: tau = 1 sample, r = e^-1, the tail r^T < 1e-3 needs T = 7 (hand count).
  cfg = channels.ChannelConfig()
  assert cfg.tap_count == 7
  np.testing.assert_allclose(cfg.pdp, np.exp(-np.arange(7)) / np.exp(-np.arange(7)).sum())
  k = 10.0
  np.testing.assert_allclose(cfg.tap_powers[0], (k + cfg.pdp[0]) / (k + 1))
  np.testing.assert_allclose(cfg.tap_powers[1:], cfg.pdp[1:] / (k + 1))
  np.testing.assert_allclose(cfg.tap_powers.sum(), 1.0)
  assert channels.ChannelConfig(profile="flat").tap_count == 1
  assert channels.ChannelConfig(profile="awgn", num_taps=3).tap_count == 3
  assert channels.ChannelConfig(delay_spread_ns=0.0).tap_count == 1
  assert channels.ChannelConfig(delay_spread_ns=1000.0).tap_count == fading.MAX_DERIVED_TAPS
  assert channels.ChannelConfig(num_taps=4).tap_count == 4
  assert channels.ChannelConfig(profile="awgn").k_factor == math.inf
  assert channels.ChannelConfig(k_factor_db=-math.inf).k_factor == 0.0


def test_inf_los_profile_fixes_its_k_factor_and_delay_spread():
  cfg = channels.ChannelConfig(profile="inf_los", k_factor_db=-3.0, delay_spread_ns=300.0)
  assert cfg.effective_k_factor_db == 7.0
  np.testing.assert_allclose(cfg.k_factor, 10 ** 0.7)
  np.testing.assert_allclose(cfg.effective_delay_spread_ns, 52.7, atol=0.05)
  # ceil(52.7 / 50 * ln 1000) = ceil(7.28) = 8 taps at 20 MHz.
  assert cfg.tap_count == 8


def test_time_varying_flag():
  assert not channels.ChannelConfig().time_varying
  assert channels.ChannelConfig(doppler_hz=100.0).time_varying
  assert not channels.ChannelConfig(profile="awgn", doppler_hz=100.0).time_varying
  cfg = dataclasses.replace(channels.ChannelConfig(), doppler_hz=200.0, sample_rate_hz=1e5)
  assert cfg.doppler_norm == pytest.approx(2e-3)
  assert config_lib.SNR_TYPES == ("es_n0", "eb_n0")


@pytest.mark.parametrize("profile, fields", [
    ("inf_los", {"k_factor_db": 3.0}), ("inf_los", {"delay_spread_ns": 20.0}),
    ("awgn", {"k_factor_db": 0.0}), ("awgn", {"delay_spread_ns": 10.0}),
    ("awgn", {"doppler_hz": 100.0}), ("flat", {"delay_spread_ns": 10.0})])
def test_a_field_the_profile_ignores_warns_naming_field_and_profile(profile, fields):
  (name, value), = fields.items()
  with pytest.warns(UserWarning, match=f"profile '{profile}' ignores {name} .* got "
                                       f"{name}={value!r}") as caught:
    ChannelConfig(profile=profile, **fields)
  assert len(caught) == 1


@pytest.mark.parametrize("fields", [
    {"profile": "inf_los"}, {"profile": "inf_los", "k_factor_db": 7.0},  # its own K
    {"profile": "flat", "k_factor_db": -math.inf, "doppler_hz": 100.0},
    {"profile": "flat", "delay_spread_ns": 0.0}, {"profile": "awgn"},
    {"profile": "exponential", "k_factor_db": 3.0, "delay_spread_ns": 20.0}])
def test_fields_in_use_or_at_their_default_do_not_warn(fields):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ChannelConfig(**fields)
  assert not caught, [str(w.message) for w in caught]


def test_flat_profile_is_rician_with_k_10_db_unless_set():
  assert ChannelConfig(profile="flat").effective_k_factor_db == 10.0
  assert ChannelConfig(profile="flat", k_factor_db=-math.inf).k_factor == 0.0  # Rayleigh


@pytest.mark.parametrize("size", ["cpu", "full", "tiny"])
def test_the_experiments_channel_configs_do_not_warn(size):
  from experiments import common  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ChannelConfig(**dict(common.base_config(size).channel))
  assert not caught, [str(w.message) for w in caught]
