"""The grid registry: built-ins, a grid added from outside the library, and one grid from QAT
through export and files, against NumPy references."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compressjax import quantization as q

BUILT_INS = ("minmax", "percentile", "mse", "pow2")


def three_sigma(x, spec, axes):
  """Clips at three standard deviations per tensor or channel: a grid from outside the library."""
  a = 3.0 * jnp.std(x, axes, keepdims=True)
  return -a, a


# As a user's module would, at import: every quantization entry point sees it from here on.
q.register_grid("3sigma", three_sigma, clips=True)


def _heavy(seed, shape):
  """Gaussian columns of different scales with a few outliers (so clipping grids clip)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape) * rng.uniform(0.2, 2.0, shape[-1])
  x.flat[rng.choice(x.size, 4, replace=False)] *= 6.0
  return x.astype(np.float32)


def _bits(x):
  """The float32 bit patterns, -0.0 taken as 0.0 (fake_quant may give -0.0, files hold 0.0)."""
  return (np.asarray(x, np.float32) + np.float32(0.0)).view(np.uint32)


# --- (a) the registry ----------------------------------------------------------------------


def test_registry_lists_the_built_ins_and_the_clipping_ones():
  assert tuple(q.GRIDS)[:4] == BUILT_INS and "3sigma" in q.GRIDS
  assert {"percentile", "mse", "3sigma"} <= q.CLIPPING_GRIDS
  assert not {"minmax", "pow2"} & q.CLIPPING_GRIDS
  assert q.RANGE_METHODS is q.GRIDS  # the earlier name, the same registry
  assert q.get_grid("pow2") is q.pow2 and q.get_grid("3sigma") is three_sigma
  assert q.Spec(4).grid == "minmax" and repr(q.Spec(4)) == (
      "Spec(bits=4, symmetric=True, granularity='tensor', axis=-1)")
  assert repr(q.Spec(4, grid="pow2")).endswith("axis=-1, grid='pow2')")


def test_unknown_names_raise_listing_the_registered_ones_at_every_entry_point():
  params = {"Dense_0": {"kernel": jnp.asarray(_heavy(0, (8, 4)))}}
  bad = q.Spec(8, grid="kl")
  listed = r"grid must be one of \('minmax', 'percentile', 'mse', 'pow2'.*\).*got 'kl'"
  with pytest.raises(ValueError, match=listed):
    q.get_grid("kl")
  with pytest.raises(ValueError, match=listed):
    q.fake_quant(params["Dense_0"]["kernel"], bad)
  with pytest.raises(ValueError, match=listed):
    q.wrap(optax.sgd(0.1), bad)
  with pytest.raises(ValueError, match=listed):
    q.ptq(params, bad)
  with pytest.raises(ValueError, match=listed):
    q.export(params, bad)
  with pytest.raises(ValueError, match=listed):
    q.quantize_activations(lambda p, x: x, bad)
  with pytest.raises(ValueError, match=r"method must be one of \('minmax'.*got 'kl'"):
    q.ptq(params, 8, method="kl")
  for grid in ("", 3, None):
    with pytest.raises(ValueError, match="grid must be a non-empty str"):
      q.Spec(8, grid=grid)


def test_duplicate_and_bad_registrations_raise():
  with pytest.raises(ValueError, match=r"grid 'mse' is already registered \(registered: "
                                       r"\('minmax', .*\)\); pass overwrite=True"):
    q.register_grid("mse", three_sigma)
  with pytest.raises(ValueError, match="name must be a non-empty str"):
    q.register_grid("", three_sigma)
  with pytest.raises(ValueError, match="method must be callable"):
    q.register_grid("three", 3.0)
  with pytest.raises(ValueError, match="clips must be True or False, got 'yes'"):
    q.register_grid("three", three_sigma, clips="yes")
  assert "three" not in q.GRIDS


def test_overwrite_replaces_a_method_even_after_it_was_traced():
  x = _heavy(1, (16, 4))
  spec = q.Spec(4, grid="test_overwrite")
  half = lambda x, spec, axes: tuple(0.5 * r for r in q.minmax_range(x, spec, axes))
  q.register_grid("test_overwrite", q.minmax_range)
  np.testing.assert_array_equal(q.fake_quant(x, spec), q.fake_quant(x, q.Spec(4)))  # traced
  with pytest.raises(ValueError, match="already registered"):
    q.register_grid("test_overwrite", half, clips=True)
  q.register_grid("test_overwrite", half, clips=True, overwrite=True)
  assert "test_overwrite" in q.CLIPPING_GRIDS
  s = np.asarray(q.grid_of(x, spec).scale)
  np.testing.assert_allclose(s, 0.5 * np.abs(x).max() / 7, rtol=2.0 ** -19)  # the new one


# --- (b) power-of-two scales -----------------------------------------------------------------


@pytest.mark.parametrize("spec", [q.Spec(4, grid="pow2"), q.Spec(8, True, "channel", grid="pow2"),
                                  q.Spec(3, True, "channel", 0, grid="pow2")], ids=str)
def test_pow2_scales_are_powers_of_two_and_nothing_clips(spec):
  x = _heavy(2, (40, 6)).astype(np.float64)
  x[:, 1] *= 7.0 * 0.25 / np.abs(x[:, 1]).max()  # max|x| = qmax s exactly for 3-bit s = 1/4
  x[:, 3] = 0.0
  x = x.astype(np.float32)
  axes = (0, 1) if spec.granularity == "tensor" else (1 - spec.axis % 2,)
  amax = np.abs(x).max(axes, keepdims=True).astype(np.float64)
  with np.errstate(divide="ignore"):  # the all-zero channel: scale 1
    s_ref = np.where(amax > 0, 2.0 ** np.ceil(np.log2(amax / spec.qmax)), 1.0)
  s = np.asarray(q.grid_of(x, spec).scale, np.float64)
  np.testing.assert_array_equal(s, s_ref)
  assert np.all(np.frexp(s)[0] == 0.5)  # a power of two
  assert np.all(amax <= spec.qmax * s) and np.all((amax > spec.qmax * s / 2) | (amax == 0))
  y = np.asarray(q.fake_quant(x, spec), np.float64)
  np.testing.assert_array_equal(y, np.round(x / s) * s)  # NumPy: round, no clip needed
  assert np.all(np.abs(y - x) <= s / 2) and np.all(np.abs(y / s) <= spec.qmax)


def test_pow2_refuses_asymmetric_specs_at_the_boundary():
  params = {"Dense_0": {"kernel": jnp.asarray(_heavy(3, (8, 4)))}}
  spec = q.Spec(4, False, grid="pow2")
  with pytest.raises(ValueError, match="grid 'pow2' needs a symmetric spec"):
    q.wrap(optax.sgd(0.1), spec).init(params)
  with pytest.raises(ValueError, match="grid 'pow2' needs a symmetric spec"):
    q.export(params, spec)


def test_weights_on_a_pow2_grid_are_never_regridded_silently():
  h = _heavy(4, (24, 8))
  x = 2.1 * h / np.abs(h).max()  # max|x| / qmax = 0.3: s = 0.5, the largest code 4 of 7
  pow2 = q.Spec(4, grid="pow2")
  params = q.ptq({"Dense_0": {"kernel": jnp.asarray(x)}}, pow2)
  k = np.asarray(params["Dense_0"]["kernel"])
  np.testing.assert_array_equal(q.load(q.export(params, pow2))["Dense_0"]["kernel"], k)
  with pytest.raises(ValueError, match=r"already on the grid of Spec\(bits=4, .*grid='pow2'\)"):
    q.export(params, q.Spec(4))  # the min/max grid would move them


# --- every registered grid: found again from the values it quantized -------------------------


SPECS = [q.with_method(base, name) for name in q.GRIDS  # "3sigma" included
         for base in (q.Spec(4), q.Spec(4, True, "channel"), q.Spec(3, False, "channel", 0))
         if base.symmetric or name != "pow2"]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_every_grid_gives_back_its_grid_and_exports_exactly(spec):
  x = _heavy(5, (48, 6))
  g = q.grid_of(x, spec)
  y = q.fake_quant(x, spec)
  again = q.grid_of(y, spec)
  np.testing.assert_array_equal(_bits(again.scale), _bits(g.scale))
  np.testing.assert_array_equal(again.zero_point, g.zero_point)
  np.testing.assert_array_equal(_bits(q.fake_quant(y, spec)), _bits(y))
  back = q.load(q.export({"Dense_0": {"kernel": y}}, spec))["Dense_0"]["kernel"]
  np.testing.assert_array_equal(_bits(back), _bits(y))


# --- (c) a grid from outside the library, from QAT through export and files ------------------


class _Net(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(8, name="Dense_0")(x)


@pytest.mark.parametrize("symmetric", [True, False])
def test_an_outside_grid_round_trips_exactly_through_qat_export_and_files(tmp_path, symmetric):
  spec = q.Spec(4, symmetric, "channel", grid="3sigma")
  model = _Net()
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
  target = jnp.asarray(rng.standard_normal((64, 8)), jnp.float32)
  params = model.init(jax.random.key(0), x)["params"]
  params["Dense_0"]["kernel"] = jnp.asarray(_heavy(7, (32, 8)) / 4)
  tx = q.wrap(optax.adam(1e-2), spec)
  state = tx.init(params)
  loss = lambda p: jnp.mean((model.apply({"params": p}, x) - target) ** 2)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(5):
    prev = params
    params, state = step(params, state)
  k = np.asarray(params["Dense_0"]["kernel"])

  # The grid of the last update, by NumPy: 3 sigma of the latent weights (entries that were
  # zero in the params before it counted as zeros), cut back to the data's range.
  latent = np.asarray(state.latent["Dense_0"]["kernel"], np.float64)
  use = np.asarray(prev["Dense_0"]["kernel"]) != 0
  lat = np.where(use | ~use.any(0), latent, 0.0)
  a = 3 * lat.std(0)
  if symmetric:
    s_ref = np.minimum(a, np.abs(lat).max(0)) / spec.qmax
  else:
    lo, hi = np.maximum(-a, lat.min(0)), np.minimum(a, lat.max(0))
    s_ref = (np.maximum(hi, 0) - np.minimum(lo, 0)) / spec.qmax
  assert np.any(a < np.abs(lat).max(0))  # 3 sigma clipped some channel: not min/max

  packed = q.export(params, spec)
  t = packed.tree["Dense_0"]["kernel"]
  np.testing.assert_allclose(t.scale, s_ref, rtol=1e-5)
  back = q.load(packed)["Dense_0"]["kernel"]
  # Bit for bit the QAT model's fake-quantized weights; and its weights themselves, but for
  # entries that a sign flip left an ulp off (see `wrap`).
  np.testing.assert_array_equal(_bits(back), _bits(q.fake_quant(k, spec)))
  assert np.all(np.abs(back - k) <= np.spacing(np.abs(k))) and np.mean(back == k) >= 0.99
  np.testing.assert_array_equal(q.load(packed)["Dense_0"]["bias"], params["Dense_0"]["bias"])

  path = q.save(tmp_path / "m.npz", packed)
  with np.load(path) as z:
    header = json.loads(z["header"].tobytes())
  assert header["version"] == 2 and header["spec"]["grid"] == "3sigma"
  again = q.load_file(path)
  assert again.spec == spec
  np.testing.assert_array_equal(_bits(q.load(again)["Dense_0"]["kernel"]), _bits(back))
  # A clipping grid's weights lie on their own min/max grid: the min/max spec keeps them too.
  plain = q.Spec(4, symmetric, "channel")
  np.testing.assert_array_equal(_bits(q.load(q.export(params, plain))["Dense_0"]["kernel"]),
                                _bits(back))


# --- (d) PTQ and calibration numbers are those of the methods themselves ---------------------


@pytest.mark.parametrize("method", ["mse", "percentile", "minmax"])
@pytest.mark.parametrize("spec", [q.Spec(4, True, "channel"), q.Spec(4, False, "channel"),
                                  q.Spec(3, False)], ids=str)
def test_ptq_method_matches_the_range_function_bit_for_bit(method, spec):
  x = _heavy(8, (64, 8))
  x[:, 2] = np.abs(x[:, 2]) + 0.1  # an all-positive channel
  axes = q.reduce_axes(2, spec)
  want = q.quantize(x, spec, grid=q.grid_from_range(*q.RANGE_METHODS[method](x, spec, axes),
                                                    spec))
  params = {"Dense_0": {"kernel": jnp.asarray(x)}}
  by_method = q.ptq(params, spec, method=method)["Dense_0"]["kernel"]
  by_spec = q.ptq(params, q.with_method(spec, method))["Dense_0"]["kernel"]
  np.testing.assert_array_equal(_bits(by_method), _bits(want))
  np.testing.assert_array_equal(_bits(by_spec), _bits(want))


def test_calibrate_and_dynamic_activations_read_the_registry():
  model = _Net()
  x = jax.nn.relu(jax.random.normal(jax.random.key(1), (16, 32)))  # inputs >= 0, min 0
  variables = model.init(jax.random.key(2), x)
  forward = lambda b: model.apply(variables, b)
  for method in ("mse", "percentile"):
    got = q.calibrate(forward, [x], q.Spec(8), method=method)["Dense_0"]
    lo, hi = q.RANGE_METHODS[method](jnp.ravel(x), q.Spec(8), (0,))
    assert got == (float(lo[0]), float(hi[0]))  # the method's own numbers
  lo, hi = q.calibrate(forward, [x], q.Spec(8, grid="pow2"))["Dense_0"]
  s = hi / 127
  assert lo == -hi and np.frexp(s)[0] == 0.5 and float(jnp.max(x)) <= hi < 2 * float(jnp.max(x))
  # Dynamic mode: each token's grid from the spec's method.
  spec = q.Spec(8, grid="pow2")
  got = q.quantize_activations(model.apply, spec)(variables, x)
  grid = q.grid_from_range(*q.pow2(x, spec, (1,)), spec)
  p = variables["params"]["Dense_0"]
  want = q.fake_quant(x, spec, grid=grid) @ p["kernel"] + p["bias"]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert np.all(np.frexp(np.asarray(grid.scale))[0] == 0.5)


def test_default_qat_grid_is_the_min_max_of_the_survivors():
  """The default stays what it was: the min/max grid over the entries non-zero in the params."""
  rng = np.random.default_rng(9)
  latent = rng.standard_normal((12, 5)).astype(np.float32) + 0.5
  params = rng.standard_normal((12, 5)).astype(np.float32)
  params[rng.random((12, 5)) < 0.4] = 0.0
  params[:, 4] = 0.0  # all zero: the channel uses all its entries
  for spec in (q.Spec(4, False, "channel"), q.Spec(8)):
    g = q.grid_of_survivors(jnp.asarray(latent), jnp.asarray(params), spec)
    axes = q.reduce_axes(2, spec)
    use = params != 0
    use = use | ~use.any(axes, keepdims=True)
    lo = np.where(use, latent, np.inf).min(axes, keepdims=True)
    hi = np.where(use, latent, -np.inf).max(axes, keepdims=True)
    want = q.grid_from_range(lo, hi, spec)
    for a, b in zip(g, want):
      np.testing.assert_array_equal(_bits(a), _bits(b))
