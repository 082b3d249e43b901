"""Tests of the pruning score functions against NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compressjax.pruning import scores
from compressjax.pruning import wrapper


def _state(count=0, movement=()):
  rng = jax.random.key_data(jax.random.key(3))
  return wrapper.PruningState((), jnp.int32(count), (), movement, (), rng)


def _tree(seed):
  r = np.random.default_rng(seed)
  return {"a": {"kernel": r.normal(size=(4, 6)).astype(np.float32),
                "bias": optax.MaskedNode()},
          "b": {"kernel": r.normal(size=(6, 3)).astype(np.float32)}}


def test_magnitude_and_saliency_match_numpy():
  w, g = _tree(0), _tree(1)
  mag = scores.magnitude(w, g, _state())
  sal = scores.saliency(w, g, _state())
  for k in ("a", "b"):
    np.testing.assert_allclose(mag[k]["kernel"], np.abs(w[k]["kernel"]))
    np.testing.assert_allclose(sal[k]["kernel"], np.abs(w[k]["kernel"] * g[k]["kernel"]),
                               rtol=1e-6)
  assert isinstance(sal["a"]["bias"], optax.MaskedNode)


def test_movement_accumulates_minus_grad_times_weight():
  w1, g1, w2, g2 = _tree(0), _tree(1), _tree(2), _tree(3)
  acc = jax.tree.map(np.zeros_like, w1)
  acc = scores.accumulate_movement(acc, w1, g1)
  acc = scores.accumulate_movement(acc, w2, g2)
  got = scores.movement(w2, g2, _state(movement=acc))
  for k in ("a", "b"):
    want = -(g1[k]["kernel"] * w1[k]["kernel"]) - g2[k]["kernel"] * w2[k]["kernel"]
    np.testing.assert_allclose(got[k]["kernel"], want, rtol=1e-6)


def test_random_is_deterministic_per_step_and_uniform():
  w = _tree(0)
  a = scores.random(w, None, _state(count=5))
  b = scores.random(w, None, _state(count=5))
  c = scores.random(w, None, _state(count=6))
  np.testing.assert_array_equal(a["b"]["kernel"], b["b"]["kernel"])
  assert not np.array_equal(a["b"]["kernel"], c["b"]["kernel"])
  # The two leaves draw different numbers (not the same stream reshaped).
  assert not np.allclose(np.ravel(a["a"]["kernel"])[:18], np.ravel(a["b"]["kernel"]))
  flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)])
  assert flat.min() >= 0 and flat.max() < 1


def test_normalize_per_tensor_unit_mean_abs_keeps_order():
  s = {"a": jnp.asarray([1.0, -3.0, 2.0]), "b": jnp.asarray([100.0, 300.0])}
  n = scores.normalize_per_tensor(s)
  np.testing.assert_allclose(n["a"], np.array([1.0, -3.0, 2.0]) / 2.0, rtol=1e-6)
  np.testing.assert_allclose(n["b"], np.array([0.5, 1.5]), rtol=1e-6)


def test_get_score_rejects_unknown_names():
  assert scores.get_score("magnitude") is scores.magnitude
  with pytest.raises(ValueError, match=r"score must be one of .*'magnitude'.*got 'l3'"):
    scores.get_score("l3")
