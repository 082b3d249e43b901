"""Per-layer precision: a per-path spec in `wrap`, `quantize_tree`, `export`/`load`, the
entropy export, with `pruning.wrap` in both orders, and the payload bytes of the export."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compressjax import pruning
from compressjax import quantization as q

SPECS = {"a/kernel": q.Spec(2),                           # 2-bit per tensor
         "b/kernel": q.Spec(4, True, "channel"),          # 4-bit per output channel
         "c/kernel": q.Spec(8, True, "channel", 0),       # 8-bit per input row
         "d/kernel": q.Spec(3, False, "channel"),         # 3-bit asymmetric per channel
         "e/kernel": None}                                # stays float
SPARSITY = {"a/kernel": 0.5, "b/kernel": 0.25, "c/kernel": 0.0, "d/kernel": 0.75,
            "e/kernel": 0.5}


def _params(seed=0):
  rng = np.random.default_rng(seed)
  shapes = {"a": (12, 16), "b": (16, 16), "c": (16, 8), "d": (8, 8), "e": (8, 4)}
  return {n: {"kernel": jnp.asarray(rng.standard_normal(s), jnp.float32),
              "bias": jnp.asarray(rng.standard_normal(s[1]), jnp.float32)}
          for n, s in shapes.items()}


def _np_quantize(x, spec):
  """An independent NumPy min/max quantizer (the 20-bit scale rounding aside, exact)."""
  x = np.asarray(x, np.float64)
  axes = tuple(range(x.ndim)) if spec.granularity == "tensor" else tuple(
      a for a in range(x.ndim) if a != spec.axis % x.ndim)
  lo = np.minimum(x.min(axes, keepdims=True), 0)
  hi = np.maximum(x.max(axes, keepdims=True), 0)
  if spec.symmetric:
    s = np.maximum(-lo, hi) / spec.qmax
    return np.clip(np.round(x / s), spec.qmin, spec.qmax) * s
  s = (hi - lo) / spec.qmax
  z = np.round(-lo / s)
  return (np.clip(np.round(x / s) + z, spec.qmin, spec.qmax) - z) * s


def _levels(x, spec):
  """The most distinct values in one tensor or channel of ``x``."""
  x = np.moveaxis(np.asarray(x), spec.axis, -1) if spec.granularity == "channel" else (
      np.asarray(x).reshape(-1, 1))
  x = x.reshape(-1, x.shape[-1])
  return max(np.unique(x[:, j]).size for j in range(x.shape[1]))


def test_quantize_tree_puts_each_leaf_on_its_own_grid():
  params = _params()
  out = q.quantize_tree(params, SPECS.get)
  for name in "abcde":
    path, k = f"{name}/kernel", params[name]["kernel"]
    spec = SPECS[path]
    if spec is None:
      np.testing.assert_array_equal(out[name]["kernel"], k)
    else:
      np.testing.assert_allclose(out[name]["kernel"], _np_quantize(k, spec), rtol=1e-5, atol=1e-6)
      assert _levels(out[name]["kernel"], spec) <= 2 ** spec.bits - (1 if spec.symmetric else 0)
    np.testing.assert_array_equal(out[name]["bias"], params[name]["bias"])


def test_mixed_export_round_trips_exactly_and_records_each_spec():
  params = _params(1)
  packed = q.export(params, SPECS.get)
  assert packed.spec == {p: s for p, s in SPECS.items() if s is not None}
  back = q.load(packed)
  for name in "abcde":
    path, k = f"{name}/kernel", params[name]["kernel"]
    spec = SPECS[path]
    want = k if spec is None else q.fake_quant(k, spec)
    np.testing.assert_array_equal(back[name]["kernel"], np.asarray(want))
    np.testing.assert_array_equal(back[name]["bias"], np.asarray(params[name]["bias"]))
    if spec is not None:
      assert packed.tree[name]["kernel"].bits == spec.bits
  # Bytes add up leaf by leaf: each leaf exported alone under its own spec.
  alone = sum(q.nbytes(q.export({"w": params[n]["kernel"]}, SPECS[f"{n}/kernel"],
                                where=lambda _: True)) for n in "abcd")
  alone += sum(q.nbytes(q.export({"w": x}, None)) for x in
               [params["e"]["kernel"]] + [params[n]["bias"] for n in "abcde"])
  assert q.nbytes(packed) == alone
  # The entropy-coded export keeps the per-path specs and the values.
  decoded = q.decode(q.encode(packed))
  assert decoded.spec == packed.spec
  for name in "abcde":
    np.testing.assert_array_equal(q.load(decoded)[name]["kernel"], back[name]["kernel"])


def test_a_constant_per_path_spec_exports_as_the_spec_does():
  params = _params(2)
  spec = q.Spec(4, True, "channel")
  one, per_path = q.export(params, spec), q.export(params, lambda _: spec)
  assert q.nbytes(one) == q.nbytes(per_path)
  assert per_path.spec == {f"{n}/kernel": spec for n in "abcde"}
  jax.tree.map(np.testing.assert_array_equal, q.load(one), q.load(per_path))


def test_qat_keeps_each_leaf_on_its_own_grid_and_float_leaves_follow_inner():
  params = _params(3)
  tx = q.wrap(optax.adam(3e-2), SPECS.get)
  plain = optax.adam(3e-2)

  @jax.jit
  def step(p, s, ps, g):
    u, s = tx.update(g, s, p)
    pu, ps = plain.update(g, ps, p)
    return optax.apply_updates(p, u), s, ps, pu

  p, s, ps = params, tx.init(params), plain.init(params)
  for i in range(4):
    g = jax.tree.map(lambda x, i=i: jax.random.normal(jax.random.key(i), x.shape), p)
    before = p
    p, s, ps, pu = step(p, s, ps, g)
    for name in "abcde":
      spec = SPECS[f"{name}/kernel"]
      k = p[name]["kernel"]
      if spec is None:  # a float leaf: updated by the inner optimizer alone
        np.testing.assert_allclose(k, before[name]["kernel"] + pu[name]["kernel"], rtol=1e-6)
      else:
        _assert_on_grid(k, spec)
  _assert_round_trip(p)


def _assert_on_grid(k, spec):
  """``k`` is on ``spec``'s grid: an entry whose update flipped its sign may sit a few ulps
  off its grid point (`quantization.exact_delta`; 2 seen here); zeros are exact."""
  fq = np.asarray(q.fake_quant(k, spec))
  np.testing.assert_array_max_ulp(np.asarray(k), fq, maxulp=4)
  assert np.mean(np.asarray(k) == fq) > 0.95
  np.testing.assert_array_equal(np.asarray(k) == 0, fq == 0)


def _assert_round_trip(p):
  """Export with the per-path spec moves nothing (no re-quantization raises) and `load`
  gives each leaf's fake quantization under its own spec, exactly."""
  back = q.load(q.export(p, SPECS.get))
  for name in "abcde":
    spec, k = SPECS[f"{name}/kernel"], p[name]["kernel"]
    want = np.asarray(k if spec is None else q.fake_quant(k, spec))
    np.testing.assert_array_equal(back[name]["kernel"], want)
    np.testing.assert_array_equal(back[name]["bias"], np.asarray(p[name]["bias"]))


@pytest.mark.parametrize("order", ["quantize_outside", "prune_outside"])
def test_per_path_pruning_and_quantization_compose_in_both_orders(order):
  params = _params(4)
  if order == "quantize_outside":
    tx = q.wrap(pruning.wrap(optax.adam(1e-2), SPARSITY.get), SPECS.get)
  else:
    tx = pruning.wrap(q.wrap(optax.adam(1e-2), SPECS.get), SPARSITY.get)

  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  p, s = params, tx.init(params)
  for i in range(3):
    g = jax.tree.map(lambda x, i=i: jax.random.normal(jax.random.key(i), x.shape), p)
    p, s = step(p, s, g)
  for name in "abcde":
    path, k = f"{name}/kernel", np.asarray(p[name]["kernel"])
    assert (k == 0).sum() >= round(SPARSITY[path] * k.size), path
    if SPECS[path] is not None:
      _assert_on_grid(k, SPECS[path])
  _assert_round_trip(p)


def test_bad_per_path_specs_raise_naming_the_path():
  params = _params()
  with pytest.raises(ValueError, match="spec\\('a/kernel'\\) must be a Spec"):
    q.export(params, lambda p: "int4")
  with pytest.raises(ValueError, match="gives None"):
    q.wrap(optax.sgd(0.1), lambda p: None).init(params)
  with pytest.raises(ValueError, match="spec must be a Spec, an int bit width or a function"):
    q.quantize_tree(params, "int4")
  with pytest.raises(ValueError, match="axis must be in"):
    q.quantize_tree(params, {"a/kernel": q.Spec(4, True, "channel", 2)}.get)


# 256 x 256 = 65536 values: the header (16 bytes) and the byte padding of the codes are at
# most 0.2% of the payload here (the smallest, 8.4 kB: 2 bits per tensor, where min/max
# rounds 98% of a Gaussian's values to 0, so a mask and few codes). Measured worst: 1.0020.
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("density", [1.0, 0.5])
def test_export_bytes_are_within_2_percent_of_the_payload(granularity, bits, density):
  rng = np.random.default_rng(bits)
  x = rng.standard_normal((256, 256)).astype(np.float32)
  x.flat[rng.permutation(x.size)[:round((1 - density) * x.size)]] = 0.0
  spec = q.Spec(bits, True, granularity)
  got = q.nbytes(q.export({"w": x}, spec, where=lambda _: True))
  # The payload from NumPy: codes of the non-zeros (every value when dense is smaller), a
  # bit of mask per value when stored sparse, a float32 scale per tensor or channel. Under
  # a mask a 2-bit symmetric non-zero is -1 or +1: one bit.
  n, nnz = x.size, int(np.count_nonzero(_np_quantize(x, spec)))
  codes = min(bits * n / 8, n / 8 + (1 if bits == 2 else bits) * nnz / 8)
  payload = codes + 4 * (1 if granularity == "tensor" else 256)
  assert payload <= got <= 1.02 * payload, (got, payload)
