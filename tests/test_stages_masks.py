"""`stages.compose(masks=)`: the prune stage's masks hold, exactly, in every later stage."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compressjax import pruning
from compressjax import quantization as q
from compressjax import stages
from compressjax.studies import wireless
from experiments import sweep
from tests import helpers
from tests.pruning.test_initial_masks import _params

_is_masked = lambda x: isinstance(x, optax.MaskedNode)


def _setup(**override):
  c = sweep.get_config("tiny")
  helpers.set_fields(c, {f"prune.{k}": v for k, v in override.items()})
  return c, wireless.validate(c)


def _teacher(setup, seed=0):
  """A small stand-in for the teacher's params (a Dense layer and an attention module):
  `compose` reads only the config and the spec, and the transformer would compile slowly."""
  del setup
  return _params(seed)


def _run(tx, params, steps, target, zero_grads=False):
  """``steps`` jitted updates towards ``target`` (gradient ``p - target``), as a stage."""
  @jax.jit
  def run(params):
    def body(carry, _):
      p, s = carry
      g = jax.tree.map(lambda a, b: jnp.zeros_like(a) if zero_grads else a - b, p, target)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), None
    return jax.lax.scan(body, (params, tx.init(params)), None, length=steps)[0]
  return run(params)


def _assert_kept(masks, reference, params):
  """Same masks as ``reference`` (compared entry by entry) and 0 wherever it prunes."""
  assert masks is not None
  ref_leaves = jax.tree.leaves(reference, is_leaf=_is_masked)
  for m, ref, p in zip(jax.tree.leaves(masks, is_leaf=_is_masked), ref_leaves,
                       jax.tree.leaves(params)):
    if _is_masked(ref):
      assert _is_masked(m)
      continue
    np.testing.assert_array_equal(np.asarray(m), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(p)[~np.asarray(ref)], 0.0)
  assert sum(int(np.sum(~np.asarray(r))) for r in jax.tree.leaves(reference)) > 0


@pytest.mark.parametrize("score", list(pruning.SCORES))
def test_prune_quantize_distill_carries_the_prune_stage_masks(score):
  config, setup = _setup(score=score)
  params, target = _teacher(setup), _teacher(setup, seed=1)
  opt = optax.adamw(3e-2)
  p1, s1 = _run(stages.compose(opt, ("prune",), setup.prune, setup.spec, fresh="prune", steps=6),
                params, 6, target)
  masks = stages.carried_masks(s1)
  # The quantize and distill stages stack the same wrappers: one optimizer, two stages.
  later = stages.compose(opt, ("prune", "quantize"), setup.prune, setup.spec, fresh="quantize",
                         steps=3, masks=masks)
  p2, s2 = _run(later, p1, 3, target)
  _assert_kept(stages.carried_masks(s2), masks, p2)
  p3, s3 = _run(later, p2, 3, target)
  _assert_kept(stages.carried_masks(s3), masks, p3)
  # On float weights the prune stage's zeros are its masks: read back from the params alone.
  from_params = stages.compose(opt, ("prune",), setup.prune, setup.spec,
                               masks=stages.masks_from_params(p1, setup.prune)).init(p1)
  _assert_kept(pruning.masks(from_params), masks, p1)


def test_quantize_prune_distill_keeps_the_set_and_the_grid():
  config, setup = _setup(score="movement", structure="neuron")
  params, target = _teacher(setup), _teacher(setup, seed=1)
  opt = optax.adamw(3e-2)
  p1, _ = _run(stages.compose(opt, ("quantize",), setup.prune, setup.spec, fresh="quantize"),
               params, 3, target)
  p2, s2 = _run(stages.compose(opt, ("quantize", "prune"), setup.prune, setup.spec, fresh="prune",
                               steps=4), p1, 4, target)
  masks = stages.carried_masks(s2)
  p3, s3 = _run(stages.compose(opt, ("quantize", "prune"), setup.prune, setup.spec, masks=masks),
                p2, 3, target)
  _assert_kept(stages.carried_masks(s3), masks, p3)
  for path, k in jax.tree_util.tree_leaves_with_path(p3):
    if jax.tree_util.keystr(path).endswith("['kernel']"):
      k = np.asarray(k)
      ref = np.asarray(q.fake_quant(k, setup.spec))
      step = np.asarray(q.grid_of(k, setup.spec).scale)
      assert np.all(np.abs(k - ref) <= 1e-5 * step), path


@pytest.mark.parametrize("score", ["saliency", "movement"])
def test_post_training_quantization_keeps_the_set_where_scores_tie(score):
  """``quantize.steps=0``: one zero-gradient step of the stack, then PTQ. Every gradient
  score is 0 there; without the masks the stable sort prunes by position instead."""
  config, setup = _setup(score=score)
  params, target = _teacher(setup), _teacher(setup, seed=1)
  p1, s1 = _run(stages.compose(optax.adamw(3e-2), ("prune",), setup.prune, setup.spec,
                               fresh="prune", steps=6), params, 6, target)
  masks = stages.carried_masks(s1)
  start = lambda m: _run(stages.compose(optax.sgd(0.0), ("prune",), setup.prune,
                                        setup.spec, masks=m), p1, 1, target, zero_grads=True)
  p2, s2 = start(masks)
  _assert_kept(stages.carried_masks(s2), masks, q.quantize_tree(p2, setup.spec))
  _, rederived = start(None)  # the old behaviour: a different set of pruned weights
  assert any(np.any(np.asarray(a) != np.asarray(b)) for a, b in zip(
      jax.tree.leaves(stages.carried_masks(rederived)), jax.tree.leaves(masks)))


def test_carried_masks_is_none_without_a_pruning_wrapper():
  config, setup = _setup()
  tx = stages.compose(optax.sgd(0.1), ("quantize",), setup.prune, setup.spec)
  assert stages.carried_masks(tx.init(_teacher(setup))) is None
