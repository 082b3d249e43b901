"""Tests of orbax checkpointing of a TrainState: exact round trip onto the target structure."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compressjax.training import checkpoint
from compressjax.training import steps


def _state(seed=0):
  params = {"dense": {"kernel": jnp.arange(6.0).reshape(2, 3) + seed, "bias": jnp.ones(3)}}
  tx = optax.adam(1e-3)
  state = steps.create_train_state(params, tx, jax.random.key(seed),
                                   {"batch_stats": {"mean": jnp.full(3, 0.5 + seed)}})
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, state.opt_state, params)  # non-trivial moments
  return state._replace(step=jnp.int32(7 + seed), opt_state=opt_state)


def test_round_trip_onto_concrete_and_abstract_targets(tmp_path):
  state = _state(0)
  path = tmp_path / "train"
  assert not checkpoint.exists(path)
  checkpoint.save(path, state)
  assert checkpoint.exists(path)
  for target in (_state(1), jax.eval_shape(lambda: _state(1))):
    got = checkpoint.restore(path, target)
    assert jax.tree.structure(got) == jax.tree.structure(state)
    assert isinstance(got, steps.TrainState)
    assert isinstance(got.opt_state[0], optax.ScaleByAdamState)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(state)):
      if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        a, b = jax.random.key_data(a), jax.random.key_data(b)
      np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(jax.random.uniform(got.key, (3,)),
                                  jax.random.uniform(state.key, (3,)))


def test_existing_checkpoints_are_not_overwritten(tmp_path):
  path = tmp_path / "stage"
  checkpoint.save(path, _state(0))
  with pytest.raises(ValueError, match="overwrite=True"):
    checkpoint.save(path, _state(1))
  checkpoint.save(path, _state(1), overwrite=True)
  assert int(checkpoint.restore(path, _state(0)).step) == 8
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match="must be a directory"):
    checkpoint.save(tmp_path / "file", _state(0))
  with pytest.raises(ValueError, match="finished checkpoint"):
    checkpoint.restore(tmp_path / "missing", _state(0))
