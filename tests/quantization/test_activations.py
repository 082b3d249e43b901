"""`quantize_activations` and `calibrate` against a hand-written forward with explicit
fake_quant."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax import quantization as q

SPEC = q.Spec(4, False)


class Net(nn.Module):

  @nn.compact
  def __call__(self, x):  # x [B, L, 2]
    h = nn.relu(nn.Conv(8, (3,), name="conv")(x))
    h = nn.relu(nn.Dense(16, name="fc1")(h))
    return nn.DenseGeneral((2, 3), name="head")(h.mean(1))


MODEL = Net()
X = jax.random.normal(jax.random.key(0), (4, 10, 2))
PARAMS = MODEL.init(jax.random.key(1), X)["params"]


def _tok(x):
  """Per-token grid written out: the range over the last axis."""
  x = np.asarray(x)
  return q.grid_from_range(x.min(-1, keepdims=True), x.max(-1, keepdims=True), SPEC)


def _forward(p, x, grid_fn):
  """The same network by hand; grid_fn(name, x) -> the grid for that layer's input, or None."""
  def fq(name, x):
    grid = grid_fn(name, x)
    return x if grid is None else q.fake_quant(x, SPEC, grid=grid)

  h = nn.Conv(8, (3,)).apply({"params": p["conv"]}, fq("conv", x))
  h = jax.nn.relu(h)
  h = jax.nn.relu(fq("fc1", h) @ p["fc1"]["kernel"] + p["fc1"]["bias"])
  h = fq("head", h.mean(1))
  return jnp.einsum("bi,ijk->bjk", h, p["head"]["kernel"]) + p["head"]["bias"]


def _apply(p, x):
  return MODEL.apply({"params": p}, x)


def test_dynamic_mode_matches_hand_written_forward():
  got = jax.jit(q.quantize_activations(_apply, SPEC))(PARAMS, X)
  want = _forward(PARAMS, X, lambda name, x: _tok(x))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  float_out = _apply(PARAMS, X)
  assert np.max(np.abs(np.asarray(got - float_out))) > 1e-3  # 4-bit inputs change the output


def test_where_selects_layers_by_path():
  got = q.quantize_activations(_apply, SPEC, where=lambda path: path == "fc1")(PARAMS, X)
  want = _forward(PARAMS, X, lambda name, x: _tok(x) if name == "fc1" else None)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_calibrate_minmax_and_static_mode_match_hand_written_forward():
  batches = [X, 2.0 * X[:2]]
  ranges = q.calibrate(lambda x: _apply(PARAMS, x), batches, SPEC)
  assert sorted(ranges) == ["conv", "fc1", "head"]
  seen = {}

  def record(name, x):
    lo, hi = seen.get(name, (np.inf, -np.inf))
    seen[name] = (min(lo, float(x.min())), max(hi, float(x.max())))

  for b in batches:
    _forward(PARAMS, b, lambda name, x: record(name, x))
  for name in seen:
    np.testing.assert_allclose(ranges[name], seen[name], rtol=1e-6)
  got = q.quantize_activations(_apply, SPEC, mode="static", ranges=ranges)(PARAMS, X)
  want = _forward(PARAMS, X, lambda name, x: q.grid_from_range(*ranges[name], SPEC))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_static_mode_clips_and_passes_gradients_straight_through():
  ranges = {"conv": (-0.5, 0.5), "fc1": (0.0, 1.0), "head": (0.0, 1.0)}
  apply_q = q.quantize_activations(_apply, q.Spec(8), mode="static", ranges=ranges)
  g = jax.grad(lambda x: jnp.sum(apply_q(PARAMS, x)))(X)
  g_conv_input = np.asarray(g)
  # Inputs beyond the conv range (plus half a step) are clipped: they get no gradient.
  outside = np.abs(np.asarray(X)) > 0.5 + 0.5 * 0.5 / 127
  assert outside.any() and np.all(g_conv_input[outside] == 0.0)
  assert np.any(g_conv_input[~outside] != 0.0)


def test_bad_input_raises():
  with pytest.raises(ValueError, match="mode must be one of"):
    q.quantize_activations(_apply, SPEC, mode="fixed")
  with pytest.raises(ValueError, match="ranges must be a dict"):
    q.quantize_activations(_apply, SPEC, mode="static")
  with pytest.raises(ValueError, match=r"ranges\['fc1'\] must be finite with lo <= hi"):
    q.quantize_activations(_apply, SPEC, mode="static", ranges={"fc1": (1.0, 0.0)})
  with pytest.raises(ValueError, match="ranges has no entry for layer 'conv'"):
    q.quantize_activations(_apply, SPEC, mode="static", ranges={"fc1": (0.0, 1.0)})(PARAMS, X)
  with pytest.raises(ValueError, match="method must be one of"):
    q.calibrate(lambda x: _apply(PARAMS, x), [X], SPEC, method="kl")
