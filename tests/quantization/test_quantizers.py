import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax import quantization as q

SPECS = [q.Spec(8), q.Spec(4, False), q.Spec(3, True, "channel"), q.Spec(4, False, "channel", 0)]


def _x(seed=0, shape=(33, 7)):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal(shape) * rng.uniform(0.5, 3.0, shape[-1]) + 0.3).astype(np.float32)


def _np_reference(x, spec, scale, zp):
  """NumPy uniform quantizer for a given grid: clip(round(x/s) + z) - z, times s."""
  codes = np.clip(np.round(x / scale) + zp, spec.qmin, spec.qmax)
  return ((codes - zp) * scale).astype(np.float32)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_values_match_numpy_reference_and_scale_matches_closed_form(spec):
  x = _x()
  g = q.grid_of(x, spec)
  s, z = np.asarray(g.scale), np.asarray(g.zero_point)
  axes = tuple(range(x.ndim)) if spec.granularity == "tensor" else (1 - spec.axis % 2,)
  lo = np.minimum(x.min(axes, keepdims=True), 0)
  hi = np.maximum(x.max(axes, keepdims=True), 0)
  if spec.symmetric:
    s_ref = np.maximum(-lo, hi) / spec.qmax
    np.testing.assert_array_equal(z, 0)
  else:
    s_ref = (hi - lo) / spec.qmax
    np.testing.assert_array_equal(z, np.round(-lo / s))
  np.testing.assert_allclose(s, s_ref, rtol=2.0 ** -19)  # scale rounded to 20 significant bits
  np.testing.assert_array_equal(np.asarray(q.fake_quant(x, spec)), _np_reference(x, spec, s, z))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_at_most_2_to_the_bits_values_per_channel_or_tensor(spec):
  x = _x(1, (200, 6))
  y = np.asarray(q.fake_quant(x, spec))
  if spec.granularity == "tensor":
    groups = [y]
  else:
    groups = list(np.moveaxis(y, spec.axis, 0))
  for grp in groups:
    assert len(np.unique(grp)) <= 2 ** spec.bits - (1 if spec.symmetric else 0)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_round_trip_error_at_most_half_a_step_inside_the_range(spec):
  x = _x(2)
  g = q.grid_of(x, spec)
  s = np.asarray(g.scale)
  err = np.abs(np.asarray(q.fake_quant(x, spec)) - x)
  # The min/max grid clips nothing: every value is within half a step of a grid point (up to
  # 1e-3 of a step from float32 rounding of x / s and the 20-bit scale).
  assert np.all(err <= np.broadcast_to(s, x.shape) * (0.5 + 1e-3))
  assert np.all(err[x == 0.0] == 0.0)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_idempotent_and_zero_stays_zero(spec):
  x = _x(3)
  x[::3] = 0.0
  y = q.fake_quant(x, spec)
  np.testing.assert_array_equal(np.asarray(q.fake_quant(y, spec)), np.asarray(y))
  assert np.all(np.asarray(y)[::3] == 0.0)


def test_clipped_ste_gradient_is_identity_inside_and_zero_outside():
  spec = q.Spec(4, False)
  x = jnp.linspace(-3.0, 5.0, 101)
  scale, zp = 0.25, 5.0  # grid range [(0 - 5) 0.25, (15 - 5) 0.25] = [-1.25, 2.5]
  w = jnp.arange(101.0)
  grad = jax.grad(lambda x: jnp.sum(q.fake_quant(x, spec, scale, zp) * w))(x)
  inside = (np.asarray(x) >= -1.25 - 0.125) & (np.asarray(x) <= 2.5 + 0.125)
  np.testing.assert_array_equal(np.asarray(grad), np.where(inside, np.asarray(w), 0.0))
  ref = _np_reference(np.asarray(x), spec, np.float32(scale), np.float32(zp))
  np.testing.assert_array_equal(np.asarray(q.fake_quant(x, spec, scale, zp)), ref)


def test_minmax_gradient_is_identity_everywhere():
  x = jnp.asarray(_x(4))
  grad = jax.grad(lambda x: jnp.sum(q.fake_quant(x, q.Spec(4, True, "channel"))))(x)
  np.testing.assert_array_equal(np.asarray(grad), 1.0)


def test_lsq_forward_and_gradients_follow_esser_et_al():
  spec = q.Spec(3)  # Qn = Qp = 3
  x = jnp.asarray([-1.3, -0.45, -0.1, 0.0, 0.26, 0.5, 0.74, 0.9, 2.0])
  s = jnp.float32(0.25)
  gx, gs = jax.grad(lambda x, s: jnp.sum(q.lsq(x, s, spec)), (0, 1))(x, s)
  v = np.asarray(x) / 0.25
  np.testing.assert_allclose(np.asarray(q.lsq(x, s, spec)), np.clip(np.round(v), -3, 3) * 0.25)
  inside = (v > -3) & (v < 3)
  np.testing.assert_array_equal(np.asarray(gx), inside.astype(np.float32))
  per_elem = np.where(v <= -3, -3.0, np.where(v >= 3, 3.0, np.round(v) - v))
  np.testing.assert_allclose(float(gs), per_elem.sum() / np.sqrt(x.size * 3), rtol=1e-5)


def test_lsq_module_learns_a_per_channel_step():
  spec = q.Spec(4, True, "channel")
  x = jnp.asarray(_x(5, (16, 3)))
  layer = q.LSQ(spec)
  variables = jax.jit(layer.init)(jax.random.key(0), x)
  step = variables["params"]["step"]
  np.testing.assert_allclose(
      np.asarray(step).ravel(), 2 * np.abs(np.asarray(x)).mean(0) / np.sqrt(7), rtol=1e-6)
  g = jax.jit(jax.grad(lambda v: jnp.sum(layer.apply(v, x) ** 2)))(variables)
  assert g["params"]["step"].shape == (1, 3) and np.all(np.asarray(g["params"]["step"]) != 0)


@pytest.mark.parametrize("kwargs, field", [
    ({"bits": 0}, "bits"), ({"bits": 33}, "bits"), ({"bits": 1}, "bits"),
    ({"granularity": "row"}, "granularity"), ({"symmetric": 1}, "symmetric"),
    ({"axis": 1.0}, "axis")])
def test_bad_spec_raises_naming_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    q.Spec(**kwargs)


def test_axis_out_of_range_raises():
  with pytest.raises(ValueError, match="axis must be in"):
    q.fake_quant(jnp.ones((3, 4)), q.Spec(8, True, "channel", 2))
  with pytest.raises(ValueError, match="spec must be"):
    q.as_spec("int8")


def test_spec_is_hashable_and_static_under_jit():
  f = jax.jit(q.fake_quant, static_argnums=1)
  x = _x(6)
  np.testing.assert_array_equal(np.asarray(f(x, q.Spec(5))), np.asarray(q.fake_quant(x, q.Spec(5))))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_all_zero_tensor_or_channel_stays_zero(spec):
  x = _x(7)
  x[:, 2] = 0.0
  x[5, :] = 0.0
  y = np.asarray(q.fake_quant(x, spec))
  np.testing.assert_array_equal(y[:, 2], 0.0)
  np.testing.assert_array_equal(y[5, :], 0.0)
  np.testing.assert_array_equal(np.asarray(q.fake_quant(np.zeros((3, 4), np.float32), spec)), 0.0)
