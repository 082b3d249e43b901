"""The vision train step split over 8 devices matches one device (batch norm included)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from compressjax import datasets
from compressjax import training
from compressjax import vision_train
from compressjax.training import parallel

BATCH = 16


class _TinyBN(nn.Module):

  @nn.compact
  def __call__(self, x, train=False):
    # No bias before batch norm: its gradient is exactly zero there, and Adam would turn
    # the rounding noise of any reduction order into +-lr steps.
    x = nn.Conv(4, (3, 3), use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(3)(jnp.mean(nn.relu(x), axis=(1, 2)))


def _run(num_devices):
  mesh = parallel.make_mesh(num_devices)
  model = _TinyBN()
  rng = np.random.default_rng(0)
  data = parallel.replicate(datasets.to_device(
      rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8), rng.integers(0, 3, 64)), mesh)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
  tx = optax.adam(1e-2)
  step = vision_train.make_step(vision_train.model_forward(model), tx,
                                vision_train.cross_entropy, batch_size=BATCH,
                                mean=(0.5,) * 3, std=(0.25,) * 3,
                                order_key=jax.random.key(1), padding=1, flip=True, mesh=mesh)
  state = parallel.replicate(training.create_train_state(
      variables["params"], tx, jax.random.key(2), {"batch_stats": variables["batch_stats"]}),
                             mesh)
  state, history = training.train(state, step, 5, log_every=1, step_args=(data, None),
                                  max_in_flight=parallel.safe_in_flight(mesh))
  return state, [h["loss"] for h in history]


def test_eight_devices_train_like_one_including_batch_norm_statistics():
  s1, l1 = _run(1)
  s8, l8 = _run(8)
  assert len(set(l1)) > 1
  np.testing.assert_allclose(l8, l1, rtol=1e-4)
  # Batch norm normalizes over the global batch, across devices: the running statistics agree.
  for a, b in zip(jax.tree.leaves(s8.model_state), jax.tree.leaves(s1.model_state)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree.leaves(s8.params), jax.tree.leaves(s1.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5)
  assert jax.tree.leaves(s8.params)[0].sharding.is_fully_replicated
  assert len(jax.tree.leaves(s8.params)[0].sharding.device_set) == 8
