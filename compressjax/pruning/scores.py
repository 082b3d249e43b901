"""Pruning scores: one small pure function per method, and their registry.

A score is ``score(params, grads, state) -> scores``: ``params`` and ``grads`` are
pytrees of the scored (selected) leaves, with ``optax.MaskedNode()`` in place of the
others, and ``state`` is the wrapper's `PruningState` (read for its ``count``,
``rng`` and ``movement`` fields). The result has the structure of ``params``;
higher scores are kept, the lowest are pruned. A new method is one function here,
one line in `SCORES` and one test.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

ScoreFn = Callable[[optax.Params, optax.Updates, Any], Any]


def magnitude(params: optax.Params, grads: optax.Updates, state: Any) -> Any:
  """Magnitude score ``|w|`` (Han et al. 2015, "Learning both Weights and Connections").

  Args:
    params: scored weights (``MaskedNode`` elsewhere).
    grads: unused.
    state: unused.

  Returns:
    ``|w|`` per weight.
  """
  del grads, state
  return jax.tree.map(jnp.abs, params)


def random(params: optax.Params, grads: optax.Updates, state: Any) -> Any:
  """Uniform random score: the random-pruning baseline.

  Deterministic in ``(state.rng, state.count, leaf position)``: the same seed and
  step give the same mask, and each prune event draws afresh.

  Args:
    params: scored weights (``MaskedNode`` elsewhere).
    grads: unused.
    state: a `PruningState`; its ``rng`` (raw key data) and ``count`` are read.

  Returns:
    Uniform [0, 1) scores with the shapes of ``params``.
  """
  del grads
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.count)
  leaves, treedef = jax.tree.flatten(params)
  drawn = [jax.random.uniform(jax.random.fold_in(key, i), x.shape, jnp.float32)
           for i, x in enumerate(leaves)]
  return jax.tree.unflatten(treedef, drawn)


def saliency(params: optax.Params, grads: optax.Updates, state: Any) -> Any:
  """First-order Taylor saliency ``|w * g|`` of the loss change when ``w`` is removed.

  Molchanov et al. (2017), "Pruning Convolutional Neural Networks for Resource
  Efficient Inference" (the elementwise form).

  Args:
    params: scored weights (``MaskedNode`` elsewhere).
    grads: gradients (or the updates the wrapper receives) with the same structure.
    state: unused.

  Returns:
    ``|w * g|`` per weight.
  """
  del state
  return jax.tree.map(lambda w, g: jnp.abs(w * g), params, grads)


def movement(params: optax.Params, grads: optax.Updates, state: Any) -> Any:
  """Movement score ``S = -sum_t g_t * w_t`` (Sanh et al. 2020, "Movement Pruning").

  Weights moving away from zero score high, those moving towards zero score low.
  The sum over steps is kept in ``state.movement`` by the wrapper (see
  `accumulate_movement`), already including the current step.

  Args:
    params: unused (the accumulator already holds the products).
    grads: unused.
    state: a `PruningState` whose ``movement`` holds the accumulated scores.

  Returns:
    The accumulated movement scores.
  """
  del params, grads
  return state.movement


def accumulate_movement(acc: Any, params: optax.Params, grads: optax.Updates) -> Any:
  """Adds this step's ``-g * w`` to the movement accumulator (Sanh et al. 2020, eq. 3)."""
  return jax.tree.map(lambda s, w, g: s - (g * w).astype(s.dtype), acc, params, grads)


SCORES: dict[str, ScoreFn] = {
    "magnitude": magnitude,
    "random": random,
    "saliency": saliency,
    "movement": movement,
}

# Scores whose scale differs between tensors (it follows the gradient scale of each
# layer): with scope="global" each tensor's scores are divided by their mean
# absolute value first, so that one threshold compares like with like.
GLOBAL_NORMALIZED = frozenset({"saliency", "movement"})


def normalize_per_tensor(scores: Any) -> Any:
  """Divides each tensor's scores by their mean absolute value (order kept within it)."""
  def norm(s):
    scale = jnp.mean(jnp.abs(s))
    return s / jnp.where(scale > 0, scale, 1.0)
  return jax.tree.map(norm, scores)


def get_score(score: str | ScoreFn) -> ScoreFn:
  """Resolves a score name (or passes a custom score function through).

  Args:
    score: a key of `SCORES`, or a function ``score(params, grads, state)``.

  Returns:
    The score function.

  Raises:
    ValueError: for an unknown name.
  """
  if callable(score):
    return score
  if score not in SCORES:
    raise ValueError(f"score must be one of {tuple(SCORES)} or a function, got {score!r}")
  return SCORES[score]
