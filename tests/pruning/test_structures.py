"""Tests of the sparsity structures: exact counts, N:M groups, whole units."""

import jax.numpy as jnp
import numpy as np
import pytest

from compressjax.pruning import structures


def _np_keep(scores, k):
  """NumPy reference: prune the k lowest, ties broken by position."""
  keep = np.ones(scores.size, bool)
  keep[np.argsort(scores, kind="stable")[:k]] = False
  return keep


@pytest.mark.parametrize("levels", [None, 3, 1])  # continuous, quantized, all equal
def test_keep_mask_prunes_exactly_k_with_ties(levels):
  r = np.random.default_rng(0)
  s = r.normal(size=101).astype(np.float32)
  if levels is not None:
    s = np.round(s * (levels - 1)) if levels > 1 else np.zeros_like(s)
  for k in (0, 1, 37, 100, 101):
    got = np.asarray(structures.keep_mask(jnp.asarray(s), jnp.int32(k)))
    assert (~got).sum() == k
    np.testing.assert_array_equal(got, _np_keep(s, k))


def test_num_to_prune_rounds_like_numpy():
  for s, n in [(0.9, 1000), (0.5, 7), (0.25, 10), (0.333, 3)]:
    assert int(structures.num_to_prune(s, n)) == int(np.round(s * n))


@pytest.mark.parametrize("shape, axis", [((16, 5), 0), ((3, 3, 8, 4), 2), ((4, 8, 3), 1)])
def test_nm_mask_keeps_the_top_n_of_every_group(shape, axis):
  r = np.random.default_rng(1)
  s = np.round(r.normal(size=shape) * 2).astype(np.float32)  # many ties
  got = np.asarray(structures.nm_mask(jnp.asarray(s), 2, 4, axis))
  moved_s, moved_k = np.moveaxis(s, axis, -1), np.moveaxis(got, axis, -1)
  groups_s = moved_s.reshape(-1, 4)
  groups_k = moved_k.reshape(-1, 4)
  assert np.all(groups_k.sum(-1) == 2)
  for gs, gk in zip(groups_s, groups_k):
    np.testing.assert_array_equal(gk, _np_keep(gs, 2))


@pytest.mark.parametrize("bad", ["3:2", "2:2", "0:4", "2:", "a:b", "2:4:8", "blocks", 4])
def test_parse_rejects_malformed_structures(bad):
  with pytest.raises(ValueError, match="structure"):
    structures.parse(bad)


def test_parse_and_layout_detection():
  assert structures.parse("2:4") == structures.Structure("n:m", 2, 4)
  assert structures.parse("neuron").kind == "neuron"
  q = structures.layout("block_0/attn/query/kernel", (8, 4, 2))
  o = structures.layout("block_0/attn/out/kernel", (4, 2, 8))
  fc = structures.layout("block_0/mlp/fc1/kernel", (8, 16))
  conv = structures.layout("Conv_0/kernel", (3, 3, 4, 8))
  assert (q.head_axis, q.out_axes, q.nm_axis) == (1, (1, 2), 0)
  assert (o.head_axis, o.out_axes, o.nm_axis) == (0, (2,), 1)
  assert (fc.head_axis, fc.out_axes, fc.nm_axis) == (None, (1,), 0)
  assert (conv.out_axes, conv.nm_axis) == ((3,), 2)


def test_neuron_masks_remove_whole_columns_ranked_by_mean_score():
  r = np.random.default_rng(2)
  s = np.abs(r.normal(size=(3, 3, 4, 10))).astype(np.float32)
  lay = structures.layout("Conv_0/kernel", s.shape)
  [m] = structures.masks_from_scores([jnp.asarray(s)], [jnp.ones(s.shape, bool)],
                                     structures.parse("channel"), [lay], [[0]], [0.3], "layer")
  m = np.asarray(m)
  per_channel = m.reshape(-1, 10)
  assert np.all(per_channel.all(0) | ~per_channel.any(0))  # each channel all-or-nothing
  np.testing.assert_array_equal(per_channel[0], _np_keep(s.reshape(-1, 10).mean(0), 3))


def test_head_groups_lose_the_same_heads_in_qkv_and_out():
  r = np.random.default_rng(3)
  d, h, dh = 8, 4, 2
  paths = [f"block_0/attn/{n}/kernel" for n in ("query", "key", "value", "out")]
  shapes = [(d, h, dh)] * 3 + [(h, dh, d)]
  s = [np.abs(r.normal(size=sh)).astype(np.float32) for sh in shapes]
  lays = [structures.layout(p, sh) for p, sh in zip(paths, shapes)]
  groups = structures.group_units("head", paths, lays, shapes)
  assert groups == [[0, 1, 2, 3]]
  ms = structures.masks_from_scores([jnp.asarray(x) for x in s],
                                    [jnp.ones(sh, bool) for sh in shapes],
                                    structures.parse("head"), lays, groups, [0.5], "layer")
  head_score = sum(x.mean(axis=tuple(a for a in range(3) if a != l.head_axis))
                   for x, l in zip(s, lays))
  want_heads = _np_keep(head_score, 2)
  for m, lay in zip(ms, lays):
    m = np.moveaxis(np.asarray(m), lay.head_axis, 0).reshape(h, -1)
    np.testing.assert_array_equal(m.all(1), want_heads)
    np.testing.assert_array_equal(m.any(1), want_heads)


def test_global_scope_one_threshold_over_tensors():
  small = np.linspace(0.01, 0.1, 20).astype(np.float32).reshape(4, 5)
  large = np.linspace(0.05, 1.0, 30).astype(np.float32).reshape(5, 6)
  scores = [jnp.asarray(small), jnp.asarray(large)]
  alive = [jnp.ones(small.shape, bool), jnp.ones(large.shape, bool)]
  lays = [structures.layout("a/kernel", small.shape), structures.layout("b/kernel", large.shape)]
  args = (scores, alive, structures.parse("unstructured"), lays, [[0], [1]])
  glob = [np.asarray(m) for m in structures.masks_from_scores(*args, [0.5], "global")]
  layer = [np.asarray(m) for m in structures.masks_from_scores(*args, [0.5, 0.5], "layer")]
  both = np.concatenate([small.ravel(), large.ravel()])
  np.testing.assert_array_equal(np.concatenate([g.ravel() for g in glob]), _np_keep(both, 25))
  assert [int((~m).sum()) for m in layer] == [10, 15]
  assert [int((~m).sum()) for m in glob] != [10, 15]
  assert sum(int((~m).sum()) for m in glob) == 25


def test_masks_only_shrink():
  s = jnp.asarray(np.arange(10, dtype=np.float32))
  alive = jnp.asarray(np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 0], bool))  # top score pruned
  [m] = structures.masks_from_scores([s], [alive], structures.parse("unstructured"),
                                     [structures.layout("k", (10,))], [[0]], [0.3], "layer")
  assert not bool(m[9]) and int((~np.asarray(m)).sum()) == 3
  np.testing.assert_array_equal(np.flatnonzero(~np.asarray(m)), [0, 1, 9])
