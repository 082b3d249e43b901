"""Tests of on-device normalization and augmentation (compressjax/datasets/augment.py)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax.datasets import augment

# 4x4 one-channel image with values 1..16 (row-major), so every crop is identifiable.
IMAGE = np.arange(1, 17, dtype=np.uint8).reshape(4, 4, 1)


def test_normalize_matches_numpy():
  x = np.random.default_rng(0).integers(0, 256, (2, 3, 3, 3), dtype=np.uint8)
  mean, std = np.array([0.4, 0.5, 0.6]), np.array([0.2, 0.25, 0.3])
  got = augment.normalize(x, mean, std)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, (x / 255.0 - mean) / std, rtol=1e-5, atol=1e-6)


def test_crop_and_flip_by_hand():
  shifted_down_right = [[0, 0, 0, 0], [0, 1, 2, 3], [0, 5, 6, 7], [0, 9, 10, 11]]
  shifted_up_left = [[6, 7, 8, 0], [10, 11, 12, 0], [14, 15, 16, 0], [0, 0, 0, 0]]
  np.testing.assert_array_equal(augment.crop(IMAGE, 0, 0, 1)[..., 0], shifted_down_right)
  np.testing.assert_array_equal(augment.crop(IMAGE, 2, 2, 1)[..., 0], shifted_up_left)
  np.testing.assert_array_equal(augment.crop(IMAGE, 1, 1, 1), IMAGE)
  np.testing.assert_array_equal(augment.crop(IMAGE, 4, 0, 2)[..., 0],
                                [[0, 0, 9, 10], [0, 0, 13, 14], [0] * 4, [0] * 4])
  np.testing.assert_array_equal(
      augment.flip_lr(IMAGE)[..., 0],
      [[4, 3, 2, 1], [8, 7, 6, 5], [12, 11, 10, 9], [16, 15, 14, 13]])


def _numpy_crops(image, padding):
  h, w, _ = image.shape
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  return {(dy, dx): padded[dy:dy + h, dx:dx + w]
          for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)}


def test_random_crop_and_flip_draw_every_outcome():
  n = 400
  keys = jax.random.split(jax.random.key(0), n)
  crops = np.asarray(jax.jit(jax.vmap(lambda k: augment.random_crop(k, IMAGE, 1)))(keys))
  reference = _numpy_crops(IMAGE, 1)
  seen = [[o for o, ref in reference.items() if np.array_equal(c, ref)] for c in crops]
  assert all(len(s) == 1 for s in seen)  # each output is exactly one valid crop
  # Every one of the 9 offsets appears: P(some offset missed) <= 9 (8/9)^400 < 1e-19.
  assert {s[0] for s in seen} == set(reference)
  flips = np.asarray(jax.jit(jax.vmap(lambda k: augment.random_flip(k, IMAGE)))(keys))
  flipped = np.array([np.array_equal(f, IMAGE[:, ::-1]) for f in flips])
  kept = np.array([np.array_equal(f, IMAGE) for f in flips])
  assert np.all(flipped ^ kept)
  # Binomial(400, 1/2): 0.5 +- 0.1 is 4 standard deviations (two-sided level > 99.99%).
  assert abs(flipped.mean() - 0.5) < 0.1


def test_augment_batch_is_per_example_and_deterministic():
  images = np.random.default_rng(1).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
  key = jax.random.key(3)
  batch_fn = jax.jit(augment.augment_batch, static_argnums=(2, 3))
  out = batch_fn(key, images, 2, True)
  chex.assert_shape(out, images.shape)
  assert out.dtype == jnp.uint8
  one = jax.jit(augment.augment_image, static_argnums=(2, 3))
  keys = jax.random.split(key, 5)
  for i in range(5):
    np.testing.assert_array_equal(out[i], one(keys[i], images[i], 2, True))
  np.testing.assert_array_equal(out, batch_fn(key, images, 2, True))
  assert not np.array_equal(out, batch_fn(jax.random.key(4), images, 2, True))
  np.testing.assert_array_equal(batch_fn(key, images, 0, False), images)


def test_augment_batch_rejects_bad_arguments():
  with pytest.raises(ValueError, match="padding must be"):
    augment.augment_batch(jax.random.key(0), np.zeros((1, 4, 4, 1)), padding=-1)
  with pytest.raises(ValueError, match="4 dimensions"):
    augment.augment_batch(jax.random.key(0), np.zeros((4, 4, 1)))
