"""Clipping-range methods and weight PTQ against NumPy references."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax import quantization as q

RATIOS = np.arange(1, 101) / 100


def _heavy(seed, shape):
  """Laplace weights with a few large outliers: clipping pays at low bits."""
  rng = np.random.default_rng(seed)
  x = rng.laplace(size=shape).astype(np.float32)
  x.flat[rng.choice(x.size, 4, replace=False)] *= 8.0
  return x


def _np_quant_error(x, lo, hi, bits):
  """NumPy symmetric quantizer on [-a, a], a = max(|lo|, |hi|): squared error summed on axis 0."""
  qmax = 2 ** (bits - 1) - 1
  s = np.maximum(np.maximum(-lo, hi), 1e-12) / qmax
  y = np.clip(np.round(x / s), -qmax, qmax) * s
  return ((y - x) ** 2).sum(0)


def test_percentile_matches_numpy():
  x = _heavy(0, (500, 3))
  spec = q.Spec(8, True, "channel")
  lo, hi = q.percentile(x, spec, (0,), pct=99.0)
  a = np.percentile(np.abs(x), 99.0, axis=0)
  np.testing.assert_allclose(np.asarray(hi).ravel(), a, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(lo).ravel(), -a, rtol=1e-5)
  lo, hi = q.percentile(x, q.Spec(8, False), (0, 1), pct=99.0)
  np.testing.assert_allclose([float(lo[0, 0]), float(hi[0, 0])],
                             np.percentile(x, [1.0, 99.0]), rtol=1e-5)


def test_mse_picks_the_best_clipping_ratio_per_channel():
  x = _heavy(1, (400, 4))
  spec = q.Spec(4, True, "channel")
  lo, hi = (np.asarray(v) for v in q.mse(x, spec, (0,)))
  amax = np.abs(x).max(0)
  errs = np.stack([_np_quant_error(x, -r * amax, r * amax, 4) for r in RATIOS])
  chosen = _np_quant_error(x, lo.ravel(), hi.ravel(), 4)
  np.testing.assert_array_less(chosen, errs.min(0) * (1 + 1e-3))
  assert np.all(chosen < 0.8 * errs[-1])  # far better than min/max on outlier-heavy weights


def test_ptq_is_on_its_own_grid_and_leaves_the_rest_alone():
  params = {"Dense_0": {"kernel": jnp.asarray(_heavy(2, (64, 8))), "bias": jnp.ones(8)}}
  for method in ("minmax", "percentile", "mse"):
    spec = q.Spec(4, method != "mse", "channel")
    out = q.ptq(params, spec, method=method)
    k = out["Dense_0"]["kernel"]
    np.testing.assert_array_equal(np.asarray(q.fake_quant(k, spec)), np.asarray(k))
    np.testing.assert_array_equal(np.asarray(out["Dense_0"]["bias"]), 1.0)
    for col in np.asarray(k).T:
      assert len(np.unique(col)) <= 2 ** 4
  np.testing.assert_array_equal(
      np.asarray(q.ptq(params, q.Spec(4), method="minmax")["Dense_0"]["kernel"]),
      np.asarray(q.fake_quant(params["Dense_0"]["kernel"], q.Spec(4))))


class _OneDense(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(6, use_bias=False, name="fc")(x)


def test_mse_with_calibration_data_minimizes_the_layer_output_error():
  rng = np.random.default_rng(3)
  w = _heavy(4, (16, 6))
  x = rng.standard_normal((256, 16)).astype(np.float32) * np.geomspace(0.05, 5.0, 16)
  params = {"fc": {"kernel": jnp.asarray(w)}}
  forward = lambda batch: _OneDense().apply({"params": params}, batch)
  spec = q.Spec(3, True, "channel")
  out_aware = q.ptq(params, spec, calib=(forward, [x[:128], x[128:]]), method="mse")
  weight_only = q.ptq(params, spec, method="mse")
  out_err = lambda wq: ((x @ (np.asarray(wq) - w)) ** 2).sum(0)  # per output channel
  amax = np.abs(w).max(0)
  best = np.full(6, np.inf)
  for r in RATIOS:  # NumPy brute force over the same clipping ratios
    s = r * amax / 3
    best = np.minimum(best, out_err(np.clip(np.round(w / s), -3, 3) * s))
  np.testing.assert_array_less(out_err(out_aware["fc"]["kernel"]), best * (1 + 1e-3))
  assert out_err(out_aware["fc"]["kernel"]).sum() < out_err(weight_only["fc"]["kernel"]).sum()


def test_bad_method_and_where_raise():
  params = {"Dense_0": {"kernel": jnp.ones((4, 4))}}
  with pytest.raises(ValueError,
                     match=r"method must be one of \('minmax', 'percentile', 'mse', 'pow2'.*\)"):
    q.ptq(params, 8, method="kl")
  with pytest.raises(ValueError, match="ptq: `where` selects no parameter"):
    q.ptq(params, 8, where=lambda p: False)
