"""Shared by the benchmarks: the jitted train step they time (the library's own step)."""

import jax
import jax.numpy as jnp
import optax

from compressjax import training


def modulation_step(model, tx):
  """Jitted ``step(params, state, iq, labels) -> (params, state)`` of ``tx`` on the
  modulation head's cross-entropy: `training.make_train_step`, the batch passed as the
  step's data (the same step for every variant compared, and the one the studies run)."""
  forward = lambda v, batch, *, train, rngs, mutable=(): model.apply(v, batch[0])
  loss = lambda out, batch: (optax.softmax_cross_entropy_with_integer_labels(
      out["modulation"], batch[1]).mean(), {})
  train_step = training.make_train_step(forward, tx, loss, lambda key, step, data: data,
                                        donate=False)
  key = jax.random.key(0)

  @jax.jit
  def step(params, state, iq, labels):
    s = training.TrainState(jnp.zeros((), jnp.int32), params, state, key, {})
    s, _ = train_step(s, None, (iq, labels))
    return s.params, s.opt_state

  return step
