"""Shared by the benchmarks: the jitted train step they time."""

import jax
import optax


def modulation_step(model, tx):
  """Jitted ``step(params, state, iq, labels) -> (params, state)`` of ``tx`` on the
  modulation head's cross-entropy (the same step for every variant compared)."""

  def loss_fn(params, iq, labels):
    logits = model.apply({"params": params}, iq)["modulation"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def step(params, state, iq, labels):
    grads = jax.grad(loss_fn)(params, iq, labels)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step
