"""`quantization.wrap` under jit, optax.chain, MultiSteps, inject_hyperparams, orbax, and
nested with `pruning.wrap` in both orders."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from compressjax import pruning
from compressjax import quantization as q
from tests.quantization.test_wrapper import _params, _run, adam_run, assert_on_grid, SPEC


def test_under_chain_with_the_wrapper_last():
  spec = q.Spec(8)
  tx = optax.chain(optax.clip_by_global_norm(0.5), q.wrap(optax.adam(3e-2), spec))
  _, _, hist = _run(tx, _params(), 5)
  assert_on_grid(hist, spec, 5)


def test_under_multisteps_params_move_every_k_and_stay_on_grid():
  tx = optax.MultiSteps(q.wrap(optax.adam(3e-2), SPEC), every_k_schedule=2)
  _, _, hist = _run(tx, _params(), 6)
  assert_on_grid(jax.tree.map(lambda x: x[1::2], hist), SPEC, 3)  # updates land on 1, 3, 5
  steps = [jax.tree.map(lambda x: x[t], hist) for t in range(6)]
  for t in (2, 4):  # the mini-steps change nothing
    np.testing.assert_array_equal(steps[t]["Dense_0"]["kernel"], steps[t - 1]["Dense_0"]["kernel"])
  assert not np.array_equal(steps[3]["Dense_0"]["kernel"], steps[1]["Dense_0"]["kernel"])


def test_under_inject_hyperparams():
  tx = optax.inject_hyperparams(lambda learning_rate: q.wrap(optax.sgd(learning_rate), SPEC))(
      learning_rate=0.1)
  params = _params()
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  step = jax.jit(tx.update)
  u, state = step(grads, state, params)
  p1 = optax.apply_updates(params, u)
  assert_on_grid(jax.tree.map(lambda x: x[None], p1), SPEC, 1)
  state.hyperparams["learning_rate"] = jnp.asarray(0.0)
  u, state = step(grads, state, p1)
  p2 = optax.apply_updates(p1, u)  # lr 0: latent unchanged, so the params stay put
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_orbax_round_trip_of_the_state(tmp_path):
  tx = q.wrap(optax.adam(3e-2), SPEC)
  params, state, _ = adam_run()
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
  for a, b in zip(jax.tree.leaves(step(grads, state, params)[0]),
                  jax.tree.leaves(step(grads, restored, params)[0])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _check_nested(tx, spec, steps=8):
  params = _params()
  _, state, hist = _run(tx, params, steps)
  assert_on_grid(hist, spec, steps)
  mask = pruning.masks(state)
  for name in params:  # half of each kernel exactly zero from the first step on
    k = np.asarray(hist[name]["kernel"])  # [steps, ...]
    np.testing.assert_array_equal(k[:, ~np.asarray(mask[name]["kernel"])], 0.0)
    assert np.mean(~np.asarray(mask[name]["kernel"])) >= 0.5
  return state


SYM = q.Spec(4, True, "channel")


def test_quantize_outside_pruning_inside():
  """Pruning masks the latent floats; the quantizer puts the survivors on the grid."""
  state = _check_nested(q.wrap(pruning.wrap(optax.adam(3e-2), 0.5), SPEC), SPEC)
  latent = state.latent["Dense_0"]["kernel"]
  mask = pruning.masks(state)["Dense_0"]["kernel"]
  np.testing.assert_array_equal(np.asarray(latent)[~np.asarray(mask)], 0.0)


def test_pruning_outside_quantize_inside():
  """The params are quantized, then pruned to exact zeros (on every grid)."""
  # Symmetric: magnitude pruning never removes the entry that sets a channel's range (or
  # removes the whole channel), so the params are on their own grid at every step.
  _check_nested(pruning.wrap(q.wrap(optax.adam(3e-2), SYM), 0.5), SYM)
