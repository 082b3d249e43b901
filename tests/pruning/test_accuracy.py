"""Masked training on a simulator task keeps the dense accuracy (80% unstructured sparsity)."""

import jax
import jax.numpy as jnp
import optax
import pytest

from compressjax import channels
from compressjax import pruning
from compressjax.models.mlp import MLP
from tests import helpers

MODULATIONS = ("bpsk", "qpsk", "psk8", "qam16")


def _features(iq):
  """Order-free statistics of a frame: sorted |y|, Re y^2, Re y^4, Re y^8 per sample.

  The powers strip the PSK symbol phases (y^2 for BPSK, y^4 for QPSK, y^8 for 8-PSK),
  so a small MLP separates the classes in a CPU-sized run; raw I/Q needs far longer.
  """
  y = iq[..., 0] + 1j * iq[..., 1]
  stats = [jnp.abs(y), jnp.real(y ** 2), jnp.real(y ** 4), jnp.real(y ** 8)]
  return jnp.stack([jnp.sort(s, axis=-1) for s in stats], axis=-1)


@pytest.mark.slow
def test_masked_mlp_within_one_point_of_dense_at_80_percent():
  cfg = channels.ChannelConfig(modulations=MODULATIONS, seq_len=32, num_pilots=0,
                               profile="awgn", snr_db=(8.0, 18.0))
  model = MLP(hidden=(64, 32), num_outputs=len(MODULATIONS))
  apply_fn = lambda p, iq: model.apply({"params": p}, _features(iq))
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 4)))["params"]
  data = helpers.modulation_data(cfg, 128)  # fresh frames every step
  eval_iq, eval_labels = helpers.modulation_data(cfg, 4096)(jax.random.key(99))
  steps = 300
  sparse_tx = pruning.wrap(optax.adam(3e-3), 0.8,
                           schedule=pruning.polynomial(begin=0, end=steps // 2, every=15))
  acc = {}
  for name, tx in (("dense", optax.adam(3e-3)), ("sparse", sparse_tx)):
    trained, _ = helpers.train_classifier(apply_fn, params, tx, data, steps, jax.random.key(1))
    acc[name] = helpers.accuracy(apply_fn, trained, eval_iq, eval_labels)
    if name == "sparse":
      assert abs(float(pruning.sparsity(trained)["overall"]) - 0.8) < 1e-3
  # Both are scored on the same 4096 held-out frames. Seeds 0-3 gave dense ~98.4% and gaps of
  # 0.0-0.4 points when this test was written; the 1-point bound is the issue's.
  assert acc["dense"] > 0.9
  assert acc["sparse"] >= acc["dense"] - 0.01, acc
