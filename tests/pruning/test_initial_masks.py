"""`pruning.wrap(initial_masks=)`: a later stage keeps the exact set of pruned weights."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compressjax import pruning
from compressjax import quantization as q

SPEC = q.Spec(4, True, "channel")
STRUCTURES = {"unstructured": "unstructured", "n:m": "2:4", "neuron": "neuron",
              "channel": "channel", "head": "head"}
_is_masked = lambda x: isinstance(x, optax.MaskedNode)


def test_every_registered_structure_is_covered():
  assert set(STRUCTURES) == set(pruning.STRUCTURES)


def _params(seed=0, d=8, heads=2, dh=4):
  """A Dense layer and a Flax-layout attention module (the "head" structure prunes it)."""
  r = np.random.default_rng(seed)
  arr = lambda *s: jnp.asarray(r.normal(size=s) / np.sqrt(s[0]), jnp.float32)
  attn = {n: {"kernel": arr(d, heads, dh), "bias": arr(heads, dh)}
          for n in ("query", "key", "value")}
  attn["out"] = {"kernel": arr(heads, dh, d), "bias": arr(d)}
  return {"Dense_0": {"kernel": arr(8, 16), "bias": arr(16)}, "attn": attn}


_TARGETS = [_params(seed=100 + t) for t in range(4)]


def _grads(params, t):
  """Gradient of ``|p - target_t|^2 / 2`` (4 fixed targets): weights keep moving."""
  targets = jax.tree.map(lambda *xs: jnp.stack(xs)[t % 4], *_TARGETS)
  return jax.tree.map(lambda p, y: p - y, params, targets)


def _run(tx, params, steps, zero_grads=False):
  """``steps`` jitted updates; returns (params after each update, final state)."""
  @jax.jit
  def run(params):
    def body(carry, t):
      p, s = carry
      g = jax.tree.map(jnp.zeros_like, p) if zero_grads else _grads(p, t)
      u, s = tx.update(g, s, p)
      p = optax.apply_updates(p, u)
      return (p, s), p
    (_, s), hist = jax.lax.scan(body, (params, tx.init(params)), jnp.arange(steps))
    return hist, s
  return run(params)


def _prune(inner, score, structure, **kw):
  return pruning.wrap(inner, 0.5, score=score, structure=STRUCTURES[structure], **kw)


@functools.lru_cache
def _first_stage(score, structure):
  """The prune stage: 50% at update 2 of 4; returns (final params, its masks)."""
  hist, state = _run(_prune(optax.sgd(0.1), score, structure,
                            schedule=pruning.one_shot(2)), _params(), 4)
  return jax.tree.map(lambda x: x[-1], hist), pruning.masks(state)


def _assert_same_pruned_set(masks, reference, hist):
  """Masks equal (not just their counts) and every pruned weight 0 after every update."""
  assert jax.tree.structure(masks, is_leaf=_is_masked) == jax.tree.structure(
      reference, is_leaf=_is_masked)
  for m, ref in zip(jax.tree.leaves(masks), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(np.asarray(m), np.asarray(ref))
  flat = [np.asarray(h)[:, ~np.asarray(m)] for m, h in zip(
      jax.tree.leaves(reference, is_leaf=_is_masked), jax.tree.leaves(hist)) if not _is_masked(m)]
  assert flat and all(np.all(x == 0) for x in flat)
  assert sum(int(np.sum(~np.asarray(m))) for m in jax.tree.leaves(reference)) > 0


_fq_step = jax.jit(lambda k, spec: (q.fake_quant(k, spec), q.grid_of(k, spec).scale),
                   static_argnums=1)
_ptq = jax.jit(q.quantize_tree, static_argnums=1)   # every case's params have the same shapes


def _assert_on_grid(hist, spec):
  """Kernels equal fake_quant(kernels) after every update: within 1e-5 of a step (float32
  ``p + u`` can miss a sign-flipped value by an ulp), >= 99% bit for bit."""
  exact = total = 0
  for path, k in jax.tree_util.tree_leaves_with_path(hist):
    if jax.tree_util.keystr(path).endswith("['kernel']"):
      for kt in np.asarray(k):
        ref, step = map(np.asarray, _fq_step(kt, spec))
        assert np.all(np.abs(kt - ref) <= 1e-5 * step), path
        exact, total = exact + np.sum(kt == ref), total + kt.size
  assert total and exact >= 0.99 * total


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("score", list(pruning.SCORES))
def test_later_stages_keep_the_exact_pruned_set(score, structure):
  p1, masks1 = _first_stage(score, structure)
  prune = lambda inner: _prune(inner, score, structure, schedule=pruning.one_shot(0),
                               initial_masks=masks1)
  # Prune, then quantize (the quantizer outermost).
  hist, state = _run(q.wrap(prune(optax.sgd(0.1, momentum=0.9)), SPEC), p1, 4)
  _assert_same_pruned_set(pruning.masks(state), masks1, hist)
  # Quantize, then prune (pruning outermost): the set is kept and the weights stay on the grid.
  hist, state = _run(prune(q.wrap(optax.sgd(0.1, momentum=0.9), SPEC)), p1, 4)
  _assert_same_pruned_set(pruning.masks(state), masks1, hist)
  _assert_on_grid(hist, SPEC)
  # Post-training: one zero-gradient update (every gradient-based score ties), then PTQ.
  hist, state = _run(prune(optax.sgd(0.0)), p1, 1, zero_grads=True)
  _assert_same_pruned_set(pruning.masks(state), masks1, hist)
  ptq = _ptq(jax.tree.map(lambda x: x[-1], hist), SPEC)
  _assert_same_pruned_set(masks1, masks1, jax.tree.map(lambda x: x[None], ptq))


def _movement_repro(initial_masks):
  """64x64 kernel, 50% pruned by movement, then 5 steps of quantize(prune(sgd)), jitted."""
  r = np.random.default_rng(0)
  params = {"Dense_0": {"kernel": jnp.asarray(r.normal(size=(64, 64)), jnp.float32)}}
  xs = jnp.asarray(r.normal(size=(5, 16, 64)), jnp.float32)
  loss = lambda p, x: jnp.mean((x @ p["Dense_0"]["kernel"]) ** 2)

  def run(tx, p):
    def body(carry, x):
      p, s = carry
      u, s = tx.update(jax.grad(loss)(p, x), s, p)
      return (optax.apply_updates(p, u), s), None
    return jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), xs)[0])(p)
  mv = functools.partial(pruning.wrap, sparsity=0.5, score="movement",
                         schedule=pruning.one_shot(0))
  p1, s1 = run(mv(optax.sgd(0.01)), params)
  masks1 = pruning.masks(s1)
  init = masks1 if initial_masks else None
  p2, s2 = run(q.wrap(mv(optax.sgd(0.01), initial_masks=init), 8), p1)
  return (np.asarray(masks1["Dense_0"]["kernel"]),
          np.asarray(pruning.masks(s2)["Dense_0"]["kernel"]),
          np.asarray(p2["Dense_0"]["kernel"]))


def test_movement_repro_keeps_the_set_only_with_initial_masks():
  before, after, kernel = _movement_repro(initial_masks=True)
  assert np.sum(~before) == 2048
  np.testing.assert_array_equal(after, before)
  np.testing.assert_array_equal(kernel[~before], 0.0)
  # Without them the stage re-derives the masks with its own movement score: the same
  # count, a different set (the bug this option fixes).
  before, after, _ = _movement_repro(initial_masks=False)
  assert np.sum(~after) == np.sum(~before)
  assert np.sum(after & ~before) > 100


def test_a_schedule_that_prunes_further_only_adds_to_the_initial_set():
  _, masks1 = _first_stage("magnitude", "unstructured")
  hist, state = _run(pruning.wrap(optax.sgd(0.1), 0.75, score="random",
                                  schedule=pruning.polynomial(0, 4, 1),
                                  initial_masks=masks1), _params(), 5)
  for m, m1 in zip(jax.tree.leaves(pruning.masks(state)), jax.tree.leaves(masks1)):
    m, m1 = np.asarray(m), np.asarray(m1)
    assert not np.any(m & ~m1)                # nothing pruned comes back ...
    assert np.mean(~m) == 0.75                # ... and the final target is met exactly
  # Early events target less than the initial 50%: the initial masks hold from update 0.
  first = jax.tree.map(lambda x: x[0], hist)
  np.testing.assert_array_equal(np.asarray(first["Dense_0"]["kernel"])[
      ~np.asarray(masks1["Dense_0"]["kernel"])], 0.0)


def test_bias_of_pruned_units_follows_its_kernel_when_not_given():
  _, masks1 = _first_stage("magnitude", "neuron")
  kernels_only = jax.tree_util.tree_map_with_path(
      lambda path, m: m if jax.tree_util.keystr(path).endswith("['kernel']") else None,
      masks1, is_leaf=_is_masked)
  state = _prune(optax.sgd(0.1), "magnitude", "neuron", initial_masks=kernels_only).init(
      _params())
  for m, m1 in zip(jax.tree.leaves(state.masks), jax.tree.leaves(masks1)):
    np.testing.assert_array_equal(np.asarray(m), np.asarray(m1))
  assert not np.all(np.asarray(state.masks["Dense_0"]["bias"]))


def test_bad_initial_masks_raise_naming_the_path():
  params = _params()
  ok = pruning.masks(_prune(optax.sgd(0.1), "magnitude", "unstructured").init(params))
  with pytest.raises(ValueError, match=r"initial_masks\['Dense_0/kernel'\] must be a bool"):
    _prune(optax.sgd(0.1), "magnitude", "unstructured", initial_masks={
        **ok, "Dense_0": {"kernel": jnp.ones((8, 16)), "bias": None}})
  bad_shape = {**ok, "Dense_0": {"kernel": jnp.ones((16, 8), bool), "bias": None}}
  with pytest.raises(ValueError, match=r"Dense_0/kernel.*shape.*\(8, 16\), got \(16, 8\)"):
    _prune(optax.sgd(0.1), "magnitude", "unstructured", initial_masks=bad_shape).init(params)
  at_bias = {**ok, "Dense_0": {"kernel": None, "bias": jnp.ones((16,), bool)}}
  with pytest.raises(ValueError, match="'Dense_0/bias', which this wrapper does not prune"):
    _prune(optax.sgd(0.1), "magnitude", "unstructured", initial_masks=at_bias).init(params)
  unknown = {**ok, "Dense_9": {"kernel": jnp.ones((8, 16), bool)}}
  with pytest.raises(ValueError, match="'Dense_9/kernel', which is not a parameter path"):
    _prune(optax.sgd(0.1), "magnitude", "unstructured", initial_masks=unknown).init(params)
