"""Tests of `pruning.wrap`: exact zeros, schedule targets, structures, scopes, rewinding."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compressjax import pruning
from tests import helpers

WIDTHS = (8, 16, 8, 4)


def _params(seed=0, widths=WIDTHS):
  r = np.random.default_rng(seed)
  return {f"Dense_{i}": {"kernel": jnp.asarray(r.normal(size=(a, b)) / np.sqrt(a), jnp.float32),
                         "bias": jnp.asarray(r.normal(size=(b,)) * 0.1, jnp.float32)}
          for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))}


def _loss(params, x, y):
  h = x
  for i in range(len(params)):
    h = h @ params[f"Dense_{i}"]["kernel"] + params[f"Dense_{i}"]["bias"]
    h = jax.nn.relu(h) if i < len(params) - 1 else h
  return jnp.mean((h - y) ** 2)


_X = np.random.default_rng(42).normal(size=(4, 16, WIDTHS[0])).astype(np.float32)


def _data(step):
  """Batch ``step % 4`` of a fixed data set (NumPy-made: no PRNG to compile)."""
  x = jnp.asarray(_X)[step % 4]
  return x, jnp.tanh(x[:, :WIDTHS[-1]] * 2.0)


def _train(tx, params, steps, on_step=None):
  """Runs jitted steps; calls ``on_step(t, params, state)`` after update number t."""
  @jax.jit
  def step(params, state, t):
    grads = jax.grad(_loss)(params, *_data(t))
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = jax.jit(tx.init)(params)
  for t in range(steps):
    params, state = step(params, state, jnp.int32(t))
    if on_step is not None:
      on_step(t, params, state)
  return params, state


def _zeros(x):
  return int(np.sum(np.asarray(x) == 0))


@pytest.mark.parametrize("inner", [
    optax.adamw(1e-2, weight_decay=0.1),
    optax.sgd(0.1, momentum=0.9),
], ids=["adamw", "sgd_momentum"])
def test_pruned_weights_exactly_zero_and_sparsity_follows_schedule(inner):
  final, begin, end, every = 0.8, 1, 7, 2
  tx = pruning.wrap(inner, final, schedule=pruning.polynomial(begin, end, every))
  history = {}

  def check(t, params, state):
    fired = [f for f in range(begin, end + 1, every) if f <= t]
    frac = (fired[-1] - begin) / (end - begin) if fired else 0.0
    target = final * (1 - (1 - frac) ** 3)  # Zhu & Gupta (2017), independent of the code
    masks = pruning.masks(state)
    for name, layer in params.items():
      kernel, mask = np.asarray(layer["kernel"]), np.asarray(masks[name]["kernel"])
      assert _zeros(kernel) == round(target * kernel.size), (t, name)
      np.testing.assert_array_equal(kernel == 0, ~mask)
      assert _zeros(layer["bias"]) == 0  # biases are not selected
      if name in history:
        assert np.all(kernel[history[name]] == 0)  # once pruned, stays zero
      history[name] = kernel == 0

  _train(tx, _params(), 10, check)


def test_per_path_sparsity_and_overall_report():
  tx = pruning.wrap(optax.sgd(0.1), lambda path: 0.5 if "Dense_0" in path else 0.25)
  params, _ = _train(tx, _params(), 2)
  sp = pruning.sparsity(params)
  np.testing.assert_allclose(float(sp["Dense_0/kernel"]), 0.5)
  np.testing.assert_allclose(float(sp["Dense_1/kernel"]), 0.25)
  sizes = [8 * 16, 16 * 8, 8 * 4]
  want = (0.5 * sizes[0] + 0.25 * sizes[1] + 0.25 * sizes[2]) / sum(sizes)
  np.testing.assert_allclose(float(sp["overall"]), want, rtol=1e-6)


def test_n_m_keeps_exactly_n_per_group_through_training():
  tx = pruning.wrap(optax.adamw(1e-2), None, structure="2:4",
                    schedule=pruning.polynomial(0, 4, 2))
  params, _ = _train(tx, _params(), 6)
  for layer in params.values():
    groups = np.asarray(layer["kernel"]).T.reshape(-1, 4)  # runs of 4 along the input axis
    np.testing.assert_array_equal((groups != 0).sum(-1), 2)


def test_neuron_pruning_removes_whole_units_with_their_bias():
  where = lambda p: p in ("Dense_0/kernel", "Dense_1/kernel")
  tx = pruning.wrap(optax.adamw(1e-2), 0.5, structure="neuron", where=where)
  params, _ = _train(tx, _params(), 3)
  for name, units in (("Dense_0", 16), ("Dense_1", 8)):
    k, b = np.asarray(params[name]["kernel"]), np.asarray(params[name]["bias"])
    dead = np.all(k == 0, axis=0)
    assert dead.sum() == units // 2
    assert np.all(k[:, ~dead] != 0)
    np.testing.assert_array_equal(b[dead], 0)
    assert np.all(b[~dead] != 0)
  assert _zeros(params["Dense_2"]["kernel"]) == 0


def _attention_params(seed=0, d=8, h=4, dh=2, f=12):
  r = np.random.default_rng(seed)
  n = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)
  attn = {name: {"kernel": n(d, h, dh), "bias": n(h, dh)} for name in ("query", "key", "value")}
  attn["out"] = {"kernel": n(h, dh, d), "bias": n(d)}
  return {"block_0": {"attn": attn, "mlp": {"fc1": {"kernel": n(d, f), "bias": n(f)},
                                            "fc2": {"kernel": n(f, d), "bias": n(d)}}}}


def test_head_pruning_default_where_drops_the_same_heads_in_qkv_and_out():
  params = _attention_params()
  tx = pruning.wrap(optax.sgd(0.1), 0.5, structure="head")
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  new = optax.apply_updates(params, updates)
  attn = new["block_0"]["attn"]
  dead_q = np.all(np.asarray(attn["query"]["kernel"]) == 0, axis=(0, 2))
  assert dead_q.sum() == 2
  for name in ("query", "key", "value"):
    k = np.asarray(attn[name]["kernel"])
    np.testing.assert_array_equal(np.all(k == 0, axis=(0, 2)), dead_q)
    np.testing.assert_array_equal(np.any(k != 0, axis=(0, 2)), ~dead_q)
    np.testing.assert_array_equal(np.all(np.asarray(attn[name]["bias"]) == 0, axis=1), dead_q)
  np.testing.assert_array_equal(np.all(np.asarray(attn["out"]["kernel"]) == 0, axis=(1, 2)),
                                dead_q)
  assert _zeros(attn["out"]["bias"]) == 0
  assert _zeros(new["block_0"]["mlp"]["fc1"]["kernel"]) == 0  # not an attention kernel
  masks = pruning.masks(state)
  assert isinstance(masks["block_0"]["mlp"]["fc1"]["kernel"], optax.MaskedNode)


def test_global_and_layer_scope_differ_per_tensor_with_equal_overall():
  params = _params()
  params["Dense_1"]["kernel"] = params["Dense_1"]["kernel"] * 3.0  # a larger-scale layer
  out = {}
  for scope in ("layer", "global"):
    new, _ = _train(pruning.wrap(optax.sgd(0.0), 0.6, scope=scope), params, 1)
    out[scope] = pruning.sparsity(new)
  total = 8 * 16 + 16 * 8 + 8 * 4
  for scope in ("layer", "global"):
    np.testing.assert_allclose(float(out[scope]["overall"]) * total, round(0.6 * total), atol=2)
  np.testing.assert_allclose(float(out["global"]["overall"]) * total, round(0.6 * total))
  assert float(out["global"]["Dense_1/kernel"]) < 0.6 - 0.1  # large weights survive
  assert float(out["global"]["Dense_0/kernel"]) > 0.6 + 0.1
  np.testing.assert_allclose(float(out["layer"]["Dense_1/kernel"]), round(0.6 * 128) / 128)


def test_rewinding_restores_survivors_to_their_recorded_values():
  every, rewind_step = 3, 1
  tx = pruning.wrap(optax.adam(1e-2), 0.75,
                    schedule=pruning.iterative(every=every, rounds=2, rewind_step=rewind_step))
  seen = {}

  def record(t, params, state):
    seen[t] = jax.tree.map(np.asarray, params)

  _train(tx, _params(), 2 * every + 1, record)
  for round_, t in enumerate((every, 2 * every), start=1):
    recorded = seen[rewind_step - 1]  # the params the update with count=rewind_step received
    for name, layer in seen[t].items():
      k = layer["kernel"]
      live = k != 0
      assert live.sum() == k.size - round((1 - 0.25 ** (round_ / 2)) * k.size)
      np.testing.assert_allclose(k[live], recorded[name]["kernel"][live], rtol=1e-6, atol=1e-7)
      # Survivors moved away from the recorded values in between (so the rewind did work).
      assert not np.allclose(seen[t - 1][name]["kernel"][live], recorded[name]["kernel"][live])


@pytest.mark.parametrize("score", sorted(pruning.SCORES))
def test_every_registered_score_prunes_exactly_under_both_scopes(score):
  txs = [pruning.wrap(optax.sgd(0.05), 0.7, score=score, scope=scope)
         for scope in ("layer", "global")]
  params = _params()

  @jax.jit  # both scopes in one compilation
  def prune(params, grads):
    return [optax.apply_updates(params, tx.update(grads, tx.init(params), params)[0])
            for tx in txs]

  grads = jax.tree.map(lambda x: jnp.cos(x * 7.0), params)  # saliency/movement need g != 0
  layer, glob = prune(params, grads)
  sizes = [p["kernel"].size for p in params.values()]
  assert [_zeros(p["kernel"]) for p in layer.values()] == [round(0.7 * n) for n in sizes]
  assert sum(_zeros(p["kernel"]) for p in glob.values()) == round(0.7 * sum(sizes))


def test_non_floating_selected_leaf_is_rejected_at_init():
  params = {"Dense_0": {"kernel": jnp.ones((4, 4), jnp.int32), "bias": jnp.ones((4,))}}
  with pytest.raises(ValueError, match=r"pruning.wrap: selected leaf Dense_0/kernel must be "
                                       r"floating .* got int32"):
    pruning.wrap(optax.sgd(0.1), 0.5).init(params)
  with pytest.raises(ValueError, match=r"selected leaf step must be floating"):
    pruning.wrap(optax.sgd(0.1), 0.5, where=lambda p: True).init(
        {**_params(), "step": jnp.zeros((2, 2), jnp.int32)})
  pruning.wrap(optax.sgd(0.1), 0.5).init(  # an unselected int leaf is fine
      {**_params(), "step": jnp.zeros((2, 2), jnp.int32)})


def test_nan_gradients_reach_weights_unless_apply_if_finite():
  """The wrapper's docstring: NaN gradients are not filtered; apply_if_finite skips them."""
  params = _params()
  unguarded, guarded = helpers.nan_gradient_step(lambda: pruning.wrap(optax.sgd(0.1), 0.5), params)
  assert np.isnan(np.asarray(unguarded["Dense_0"]["kernel"])).any()
  jax.tree.map(np.testing.assert_array_equal, guarded, params)