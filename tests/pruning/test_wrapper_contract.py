"""`pruning.wrap` under jit, optax.chain, MultiSteps, inject_hyperparams, orbax; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from compressjax import pruning
from tests.pruning.test_wrapper import _attention_params, _params, _train, _zeros


def _kernel_zeros(params):
  return [_zeros(layer["kernel"]) for layer in params.values()]


def test_inside_chain_masks_found_and_zeros_exact():
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   pruning.wrap(optax.chain(optax.add_decayed_weights(0.1), optax.adam(1e-2)),
                                0.5, schedule=pruning.polynomial(0, 3, 1)))
  params, state = _train(tx, _params(), 5)
  masks = pruning.masks(state)
  for name, layer in params.items():
    np.testing.assert_array_equal(np.asarray(layer["kernel"]) == 0,
                                  ~np.asarray(masks[name]["kernel"]))
  assert _kernel_zeros(params) == [64, 64, 16]


def test_multisteps_applies_masks_on_emitted_updates():
  inner = pruning.wrap(optax.adamw(1e-2, weight_decay=0.1), 0.5,
                       schedule=pruning.polynomial(0, 2, 1))
  tx = optax.MultiSteps(inner, every_k_schedule=2)
  seen = []
  _train(tx, _params(), 6, lambda t, p, s: seen.append(_kernel_zeros(p)))
  # Emitted updates are the 2nd, 4th, 6th mini-steps, with inner counts 0, 1, 2.
  targets = [0.0, 0.5 * (1 - 0.5 ** 3), 0.5]
  sizes = np.array([128, 128, 32])
  want = [[0, 0, 0]] + [list(np.round(t * sizes).astype(int)) for t in targets for _ in (0, 1)]
  assert seen == want[:6]


def test_inject_hyperparams_outer_sparsity_and_inner_learning_rate():
  make = optax.inject_hyperparams(pruning.wrap)
  tx = make(optax.sgd(0.1), 0.5, schedule=pruning.polynomial(0, 4, 1))

  @jax.jit
  def step(params, state, t):
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params, state = _params(), tx.init(_params())
  for t in range(5):
    if t == 2:
      state.hyperparams["sparsity"] = jnp.asarray(0.75)
    params, state = step(params, state, t)
  assert _kernel_zeros(params) == [96, 96, 24]

  inner = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
  tx2 = pruning.wrap(inner, 0.5)
  state2 = tx2.init(params)
  state2.inner_state.hyperparams["learning_rate"] = jnp.asarray(0.0)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(tx2.update)(grads, state2, params)
  new = optax.apply_updates(params, updates)
  for name in params:  # lr 0: survivors unchanged, at least half pruned
    k, k0 = np.asarray(new[name]["kernel"]), np.asarray(params[name]["kernel"])
    np.testing.assert_array_equal(k[k != 0], k0[k != 0])
    assert _zeros(k) == max(_zeros(k0), round(0.5 * k.size))


def test_orbax_round_trip_of_the_state(tmp_path):
  tx = pruning.wrap(optax.adamw(1e-2), 0.5, score="movement",
                    schedule=pruning.iterative(every=2, rounds=2, rewind_step=1))
  params, state = _train(tx, _params(), 3)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "state", state)
  ckpt.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = ckpt.restore(tmp_path / "state", abstract)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  grads = jax.tree.map(jnp.ones_like, params)
  step = jax.jit(tx.update)
  # Orbax returns committed arrays; commit the original too, so one compilation serves both.
  u1, _ = step(grads, jax.device_put(state, jax.devices()[0]), params)
  u2, _ = step(grads, restored, params)
  for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparsity=1.0), r"sparsity must be in \[0, 1\), got 1.0"),
    (dict(sparsity=-0.1), r"sparsity must be in \[0, 1\), got -0.1"),
    (dict(sparsity=None), r"sparsity must be a float"),
    (dict(structure="3:2"), r"structure N:M needs 0 < N < M, got '3:2'"),
    (dict(structure="2-4"), r"structure must be .*N:M.*got '2-4'"),
    (dict(structure="blocks"), r"structure must be .*head, got 'blocks'"),
    (dict(score="l3"), r"score must be one of \('magnitude', 'random', 'saliency', 'movement'\)"),
    (dict(scope="tensor"), r"scope must be one of \('layer', 'global'\), got 'tensor'"),
    (dict(schedule="cubic"), r"schedule must be a pruning Schedule"),
    (dict(structure="2:4", sparsity=0.9), r"sparsity must be None or 0.5 for structure '2:4'"),
    (dict(structure="2:4", sparsity=None, scope="global"), r"scope must be 'layer'"),
    (dict(sparsity=lambda p: 0.5, scope="global"), r"sparsity must be a single float"),
])
def test_bad_arguments_raise_at_wrap(kwargs, match):
  args = dict(sparsity=0.5) | kwargs
  with pytest.raises(ValueError, match=match):
    pruning.wrap(optax.sgd(0.1), **args)


@pytest.mark.parametrize("kwargs, params, match", [
    (dict(where=lambda p: p.startswith("nothing")), _params(), r"pruning.wrap: `where` selects"),
    (dict(structure="head"), _params(), r"attention kernels with a head axis"),
    (dict(structure="head", where=lambda p: p.endswith("kernel")), _attention_params(),
     r"structure='head' needs a head axis; 'block_0/mlp/fc1/kernel'"),
    (dict(structure="3:16", sparsity=None), _params(), r"Dense_0/kernel.*multiple of 16"),
    (dict(sparsity=lambda p: 1.5), _params(), r"sparsity\('Dense_0/kernel'\) must be in \[0, 1\)"),
])
def test_bad_arguments_raise_at_init(kwargs, params, match):
  args = dict(sparsity=0.5) | kwargs
  tx = pruning.wrap(optax.sgd(0.1), **args)
  with pytest.raises(ValueError, match=match):
    tx.init(params)


def test_update_without_params_raises():
  tx = pruning.wrap(optax.sgd(0.1), 0.5)
  params = _params()
  with pytest.raises(ValueError, match="params must be passed"):
    tx.update(params, tx.init(params))
