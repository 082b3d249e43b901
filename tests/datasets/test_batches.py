"""Tests of the on-device dataset and index-drawn batches (compressjax/datasets/batches.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax.datasets import batches


def _data(n=10):
  images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1) * np.ones((1, 2, 2, 3), np.uint8)
  return batches.to_device(images, np.arange(n) % 7)


def test_train_batches_cover_each_epoch_without_repeats():
  n, bs = 10, 3
  draw = jax.jit(functools.partial(batches.train_indices, num_examples=n, batch_size=bs))
  key = jax.random.key(0)
  idx = np.stack([np.asarray(draw(key, jnp.int32(s))) for s in range(9)])
  for epoch in range(3):
    seen = idx[3 * epoch:3 * epoch + 3].ravel()
    assert len(set(seen.tolist())) == 9 and seen.min() >= 0 and seen.max() < n
  assert not np.array_equal(idx[:3], idx[3:6])  # each epoch reshuffles
  # Resuming at step 4 gives the same batch; another key gives another order.
  np.testing.assert_array_equal(draw(key, jnp.int32(4)), idx[4])
  assert not np.array_equal(draw(jax.random.key(1), jnp.int32(0)), idx[0])


def test_train_batch_gathers_images_and_labels():
  data = _data()
  step = jax.jit(functools.partial(batches.train_batch, batch_size=4))
  x, y = step(data, jax.random.key(2), jnp.int32(1))
  idx = np.asarray(batches.train_indices(jax.random.key(2), 1, 10, 4))
  np.testing.assert_array_equal(x[:, 0, 0, 0], idx)
  np.testing.assert_array_equal(y, idx % 7)
  assert x.dtype == jnp.uint8 and x.shape == (4, 2, 2, 3)


def test_eval_batches_visit_every_example_once():
  data = _data()
  assert batches.num_eval_batches(10, 4) == 3
  step = jax.jit(functools.partial(batches.eval_batch, batch_size=4))
  parts = [step(data, jnp.int32(i)) for i in range(3)]
  mask = np.concatenate([np.asarray(m) for _, _, m in parts])
  labels = np.concatenate([np.asarray(y) for _, y, _ in parts])
  firsts = np.concatenate([np.asarray(x)[:, 0, 0, 0] for x, _, _ in parts])
  np.testing.assert_array_equal(mask, [True] * 10 + [False] * 2)
  np.testing.assert_array_equal(firsts[mask], np.arange(10))
  np.testing.assert_array_equal(labels[mask], np.arange(10) % 7)


def test_rejects_bad_arguments():
  with pytest.raises(ValueError, match="batch_size must be in"):
    batches.steps_per_epoch(10, 11)
  with pytest.raises(ValueError, match="labels must have shape"):
    batches.to_device(np.zeros((3, 2, 2, 1), np.uint8), np.zeros(4))
  with pytest.raises(ValueError, match="non-empty NHWC"):
    batches.to_device(np.zeros((3, 2, 2), np.uint8), np.zeros(3))
  with pytest.raises(ValueError, match="batch_size must be"):
    batches.num_eval_batches(10, 0)
