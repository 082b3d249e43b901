"""Tests of evaluation on fixed batches: oracle and corrupted predictions, reference receivers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax.channels import theory
from compressjax.channels.config import ChannelConfig
from compressjax.channels.simulate import simulate
from compressjax.training import evaluation as ev
from compressjax.training import multitask
from compressjax.training import steps

EDGES = [0.0, 10.0, 20.0]


@pytest.fixture(scope="module")
def eval_batches(fake_data_fn):
  return ev.make_eval_batches(fake_data_fn, jax.random.key(11), 2)


def _oracle(corrupt_position=None):
  def predict(variables, batches):
    del variables
    sym = batches["symbols"].symbols
    if corrupt_position is not None:
      sym = sym.at[:, corrupt_position].add(1) % 4
    taps = batches["channel"].taps
    return {"modulation": jax.nn.one_hot(batches["modulation"].label, 3),
            "symbols": jax.nn.one_hot(sym, 4),
            "channel": jnp.stack([taps.real, taps.imag], -1)}
  return predict


def test_eval_batches_are_fixed_by_the_key(fake_data_fn, eval_batches):
  again = ev.make_eval_batches(fake_data_fn, jax.random.key(11), 2)
  for a, b in zip(jax.tree.leaves(eval_batches), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(eval_batches[0]["symbols"].iq, eval_batches[1]["symbols"].iq)


def test_oracle_predictions_score_perfectly(eval_batches):
  rep = ev.evaluate(_oracle(), {}, eval_batches, modulation="qpsk", num_classes=3,
                    snr_edges=EDGES)
  assert rep["modulation"]["accuracy"] == 1.0 and rep["modulation"]["macro_f1"] == 1.0
  assert np.trace(rep["modulation"]["confusion"]) == 16
  assert rep["symbols"]["ser"] == 0.0 and rep["symbols"]["ber"] == 0.0
  assert rep["channel"]["nmse"] == 0.0


def test_symbol_errors_count_data_positions_only(eval_batches):
  pilots = ev.evaluate(_oracle(corrupt_position=1), {}, eval_batches, modulation="qpsk",
                       num_classes=3, snr_edges=EDGES)
  assert pilots["symbols"]["ser"] == 0.0  # positions 0 and 1 are pilots
  rep = ev.evaluate(_oracle(corrupt_position=5), {}, eval_batches, modulation="qpsk",
                    num_classes=3, snr_edges=EDGES)
  assert rep["symbols"]["ser"] == pytest.approx(1 / 6)  # one of the 6 data positions
  true = np.concatenate([np.asarray(b["symbols"].symbols[:, 5]) for b in eval_batches])
  flipped_bits = np.array([bin(s ^ ((s + 1) % 4)).count("1") for s in true])
  assert rep["symbols"]["ber"] == pytest.approx(flipped_bits.sum() / (16 * 6 * 2))
  snr = np.concatenate([np.asarray(b["symbols"].snr_db) for b in eval_batches])
  low = snr < 10.0
  np.testing.assert_allclose(rep["symbols"]["ser_by_snr"]["rate"], [1 / 6, 1 / 6])
  assert rep["symbols"]["ser_by_snr"]["count"] == [6 * low.sum(), 6 * (~low).sum()]


def test_evaluate_runs_a_real_model(tiny_model, eval_batches):
  model, params = tiny_model
  predict = steps.make_predict_fn(multitask.multitask_forward(model.apply))
  rep = ev.evaluate(predict, {"params": params}, eval_batches, modulation="qpsk",
                    num_classes=3, snr_edges=EDGES)
  assert 0.0 <= rep["modulation"]["accuracy"] <= 1.0
  assert 0.0 < rep["symbols"]["ser"] <= 1.0 and rep["channel"]["nmse"] > 0.0
  assert len(rep["channel"]["nmse_by_snr"]["nmse"]) == 2


def test_reference_receivers_match_awgn_closed_forms():
  # AWGN, QPSK at Es/N0 = 4 dB, 128 frames x 16 data symbols. Perfect CSI is exact ML:
  # its SER must match theory within 4.4 sigma (99.999 %). LS from P = 16 unit pilots has
  # error variance N0 / P (|e|^2 exponential; 128 draws: 40 % is 4.5 sigma).
  cfg = ChannelConfig(modulation="qpsk", seq_len=32, num_pilots=16, profile="awgn",
                      snr_db=4.0)
  data_fn = multitask.multitask_data_fn(cfg, 128, tasks=("symbols",), simulate=simulate)
  batches = ev.make_eval_batches(data_fn, jax.random.key(0), 1)
  rep = ev.reference_receivers(batches, modulation="qpsk", snr_edges=[3.0, 5.0])
  ser = float(theory.qam_ser_awgn(4, 4.0))
  sigma = np.sqrt(ser * (1 - ser) / (128 * 16))
  assert abs(rep["perfect_csi"]["ser"] - ser) < 4.4 * sigma
  n0 = 10 ** -0.4
  assert rep["ls"]["nmse"] == pytest.approx(n0 / 16, rel=0.4)
  assert rep["lmmse"]["nmse"] == pytest.approx(n0 / (16 + n0), rel=0.4)
  for name in ("ls", "lmmse"):
    assert abs(rep[name]["ser"] - ser) < 0.05
    assert rep[name]["ser_by_snr"]["rate"] == [rep[name]["ser"]]


MOD_CFG = ChannelConfig(modulation="qam16", modulations=("bpsk", "qpsk", "psk8", "qam16", "qam64"),
                        seq_len=64, num_pilots=8, modulation_pilots=True, profile="inf_los",
                        num_taps=4, snr_db=0.0)


def _point_set(points, chunks=1, frames=64):
  at = lambda snr: multitask.multitask_data_fn(ev.with_snr(MOD_CFG, snr), frames,
                                               ("modulation", "symbols"))
  return ev.snr_point_batches(at, jax.random.key(5), points, chunks)


def test_snr_point_batches_draw_each_point_at_its_snr():
  batches = _point_set((0.0, 12.5, 30.0), chunks=2, frames=8)
  assert len(batches) == 6
  for i, snr in enumerate((0.0, 0.0, 12.5, 12.5, 30.0, 30.0)):
    for b in batches[i].values():
      np.testing.assert_array_equal(b.snr_db, np.float32(snr))
  # Chunks of one point are different frames; the same key gives the same set.
  assert not np.array_equal(batches[0]["symbols"].iq, batches[1]["symbols"].iq)
  again = _point_set((0.0, 12.5, 30.0), chunks=2, frames=8)
  np.testing.assert_array_equal(batches[5]["modulation"].iq, again[5]["modulation"].iq)
  with pytest.raises(ValueError, match="increasing"):
    _point_set((5.0, 0.0))


def test_point_edges_put_each_point_alone_in_its_bin():
  from compressjax.training import metrics
  edges = ev.point_edges((0.0, 2.5, 5.0, 10.0))
  np.testing.assert_allclose(edges, (-1.25, 1.25, 3.75, 7.5, 11.25))
  np.testing.assert_array_equal(metrics.snr_bin_index([0.0, 2.5, 5.0, 10.0], edges),
                                [0, 1, 2, 3])


def test_known_channel_classifier_is_near_perfect_at_high_snr_and_near_chance_at_low():
  batches = _point_set((-20.0, 30.0), frames=200)
  rep = ev.reference_classifier(batches, modulations=MOD_CFG.modulations,
                                snr_edges=ev.point_edges((-20.0, 30.0)))
  low, high = rep["accuracy_by_snr"]["accuracy"]
  assert high >= 0.98, high
  # At -20 dB the payload is noise: about 1 in 5 right (99% binomial band of 200 frames).
  assert 0.12 <= low <= 0.30, low
  with pytest.raises(ValueError, match="modulation"):
    ev.reference_classifier([{"symbols": batches[0]["symbols"]}],
                            modulations=MOD_CFG.modulations, snr_edges=(0.0, 1.0))
