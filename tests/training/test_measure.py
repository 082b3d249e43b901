"""Tests of the cost measurements: parameter counts, bytes, XLA FLOPs, latency."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax.training import measure


def test_param_counts_and_bytes_by_hand():
  tree = {"a": jnp.array([[1.0, 0.0], [0.0, 2.0]]), "b": {"c": jnp.array([0.0, 0.0, 3.0])}}
  assert measure.param_counts(tree) == {"params": 7, "nonzero": 3}
  assert measure.packed_bytes(tree) == 7 * 4
  assert measure.packed_bytes(tree, nbytes_fn=lambda p: 5) == 5


def test_flops_of_a_matmul_is_two_mnk():
  a, b = jnp.ones((8, 16)), jnp.ones((16, 4))
  assert measure.flops(lambda x, y: x @ y, a, b) == pytest.approx(2 * 8 * 16 * 4)


def test_model_flops_scale_linearly_with_batch(tiny_model):
  model, params = tiny_model
  f = lambda v, x: model.apply(v, x)
  small = measure.flops(f, {"params": params}, jax.ShapeDtypeStruct((2, 8, 2), jnp.float32))
  large = measure.flops(f, {"params": params}, jax.ShapeDtypeStruct((8, 8, 2), jnp.float32))
  assert small > 0
  assert 3.6 < large / small <= 4.0  # per-example work dominates; shared work is tiny


def test_model_cost_reports_every_field(tiny_model):
  model, params = tiny_model
  cost = measure.model_cost(model.apply, {"params": params}, jnp.zeros((2, 8, 2)), repeats=3)
  n = sum(x.size for x in jax.tree.leaves(params))
  assert cost["params"] == n and cost["bytes"] == 4 * n
  assert 0 < cost["nonzero"] <= n
  assert cost["flops"] > 0 and np.isfinite(cost["latency_ms"]) and cost["latency_ms"] > 0
  with pytest.raises(ValueError, match="repeats"):
    measure.latency(lambda x: x, jnp.ones(2), repeats=0)


def test_latency_ratio_is_the_median_of_per_round_ratios_by_hand():
  base = np.array([1.0, 2.0, 1.0, 4.0])
  times = np.array([2.0, 2.0, 3.0, 4.0])       # per-round ratios 2, 1, 3, 1
  r = measure.latency_ratio(times, base)
  # Sorted ratios 1, 1, 2, 3: percentiles 10 / 50 / 90 interpolate to 1, 1.5, 2.7.
  assert r["ratio"] == 1.5 and r["lo"] == 1.0 and r["hi"] == pytest.approx(2.7)
  assert r["noisy"]
  clear = measure.latency_ratio(np.array([2.0, 4.0, 2.2]), np.array([1.0, 2.0, 1.0]))
  assert clear["ratio"] == 2.0 and not clear["noisy"]


def test_interleaved_rounds_time_every_call_once_per_round():
  calls = []

  def fn(x):
    calls.append(1)   # runs once, at trace time: the jitted program is reused
    return jnp.sum(x @ x)

  x = jnp.ones((64, 64))
  other = lambda y: jnp.sum(y * 2.0)
  times = measure.interleaved_latency([(fn, (x,)), (other, (x,))], rounds=5, warmup=1)
  assert times.shape == (5, 2) and np.all(times > 0) and len(calls) == 1
  with pytest.raises(ValueError, match="rounds"):
    measure.interleaved_latency([(fn, (x,))], rounds=0)


def test_interleaved_rounds_shuffle_the_order_and_take_the_fastest_repeat():
  order = []

  def tagged(i):
    def fn(x):
      jax.experimental.io_callback(lambda: order.append(i), None, ordered=True)
      return x + i
    return fn

  x = jnp.ones(())
  times = measure.interleaved_latency([(tagged(i), (x,)) for i in range(3)], rounds=6,
                                      warmup=1, repeats=2)
  assert times.shape == (6, 3) and np.all(np.isfinite(times))
  timed = order[3:]   # after one warm-up round, in the given order
  assert order[:3] == [0, 1, 2] and len(timed) == 6 * 3 * 2
  rounds = [tuple(timed[k:k + 6:2]) for k in range(0, len(timed), 6)]
  assert all(sorted(r) == [0, 1, 2] for r in rounds)          # each once per round...
  assert all(timed[k] == timed[k + 1] for k in range(0, len(timed), 2))  # ...back to back
  assert len(set(rounds)) > 1                                  # in orders that vary
