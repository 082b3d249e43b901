"""A whole (small) image set on device, and batches drawn from it by index inside ``jit``.

CIFAR-10's 50,000 uint8 32x32x3 images take 150 MB, so the set lives on the accelerator and a
train step gathers its batch by index: no host loop, no transfer per step. Batch ``step`` is a
pure function of ``(key, step)``: epoch ``e = step // steps_per_epoch`` shuffles with
``jax.random.fold_in(key, e)`` and the step takes its slice of that permutation (the last
partial batch of each epoch is dropped), so resuming at a step reproduces the same batches.
Evaluation walks the set in order with fixed-size padded batches and a mask, so one compiled
step covers every batch and each example counts once.

Pass the `DeviceData` to the jitted step as an argument, not as a closure: a closed-over array
is baked into the compiled program as a constant.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from compressjax.datasets import augment


class DeviceData(NamedTuple):
  """Images and labels held on device.

  Attributes:
    images: uint8 ``[n, height, width, channels]``.
    labels: int32 ``[n]``.
  """
  images: jax.Array
  labels: jax.Array


def to_device(images: np.ndarray, labels: np.ndarray,
              device: jax.Device | None = None) -> DeviceData:
  """Copies a split (e.g. ``VisionData.train_images/train_labels``) to a device.

  Args:
    images: ``[n, height, width, channels]``, kept in its dtype (uint8 saves 4x memory).
    labels: integer ``[n]``.
    device: target device; ``None`` means the default device.

  Returns:
    A `DeviceData`.

  Raises:
    ValueError: if the shapes do not match or the set is empty.
  """
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim != 4 or images.shape[0] == 0:
    raise ValueError(f"images must be a non-empty NHWC array, got shape {images.shape}")
  if labels.shape != (images.shape[0],):
    raise ValueError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")
  return DeviceData(jax.device_put(images, device),
                    jax.device_put(labels.astype(np.int32), device))


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch (the remainder is dropped)."""
  if not 0 < batch_size <= num_examples:
    raise ValueError(f"batch_size must be in [1, {num_examples}] for {num_examples} "
                     f"examples, got {batch_size}")
  return num_examples // batch_size


def train_indices(key: chex.PRNGKey, step: chex.Array, num_examples: int,
                  batch_size: int) -> chex.Array:
  """Example indices of training batch ``step`` (shuffled without replacement per epoch).

  Args:
    key: PRNG key of the data order (fixed for the whole run).
    step: global step, int (may be traced).
    num_examples: size of the set (static).
    batch_size: examples per batch (static).

  Returns:
    int32 ``[batch_size]`` indices; within an epoch the batches are disjoint.
  """
  per_epoch = steps_per_epoch(num_examples, batch_size)
  step = jnp.asarray(step, jnp.int32)
  perm = jax.random.permutation(jax.random.fold_in(key, step // per_epoch), num_examples)
  start = (step % per_epoch) * batch_size
  return jax.lax.dynamic_slice_in_dim(perm, start, batch_size).astype(jnp.int32)


def train_batch(data: DeviceData, key: chex.PRNGKey, step: chex.Array,
                batch_size: int) -> tuple[chex.Array, chex.Array]:
  """Gathers training batch ``step`` (see `train_indices`); jittable with ``step`` traced.

  Args:
    data: the set on device.
    key: PRNG key of the data order.
    step: global step.
    batch_size: examples per batch (static).

  Returns:
    ``(images [batch_size, ...], labels [batch_size])``.
  """
  idx = train_indices(key, step, data.labels.shape[0], batch_size)
  return data.images[idx], data.labels[idx]


def num_eval_batches(num_examples: int, batch_size: int) -> int:
  """Batches that `eval_batch` needs to cover every example once (last one padded)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  return -(-num_examples // batch_size)


def eval_batch(data: DeviceData, index: chex.Array,
               batch_size: int) -> tuple[chex.Array, chex.Array, chex.Array]:
  """Batch ``index`` of the set in order, padded to ``batch_size`` with a validity mask.

  Args:
    data: the set on device.
    index: batch number in ``[0, num_eval_batches)`` (may be traced).
    batch_size: examples per batch (static).

  Returns:
    ``(images, labels, mask)``: padding rows repeat the last example and have mask False, so
    metrics weighted by ``mask`` count every example exactly once.
  """
  n = data.labels.shape[0]
  idx = jnp.asarray(index, jnp.int32) * batch_size + jnp.arange(batch_size, dtype=jnp.int32)
  mask = idx < n
  idx = jnp.minimum(idx, n - 1)
  return data.images[idx], data.labels[idx], mask


class TrainSet(NamedTuple):
  """A training set held on device and its data-order key: `image_data_fn`'s ``data``.

  Stack one per seed (`compressjax.training.stack`) for a ``vmap``-ed sweep: each seed
  then draws its own epoch order.
  """
  data: Any
  order_key: chex.PRNGKey


def image_data_fn(batch_size: int, mean: Any, std: Any, padding: int = 0,
                  flip: bool = False) -> Callable[..., dict[str, chex.Array]]:
  """``data_fn(key, step, data) -> {"image", "label"}`` for `training.make_train_step`.

  Batch ``step`` of ``data`` (a `TrainSet`) by index (`train_batch`: a pure
  function of the order key and the step, so a resumed run draws the same batches),
  augmented with ``key`` (random crop with ``padding``, horizontal ``flip``) and
  normalized with the per-channel ``mean`` and ``std``, all inside ``jit``.
  """
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

  def data_fn(key, step, data: TrainSet):
    images, labels = train_batch(data.data, data.order_key, step, batch_size)
    if padding or flip:
      images = augment.augment_batch(key, images, padding, flip)
    return {"image": augment.normalize(images, mean, std), "label": labels}

  return data_fn
