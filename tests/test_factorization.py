import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax import factorization


def _matrix(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _tree(w):
  return {"fc": {"kernel": jnp.asarray(w), "bias": jnp.arange(w.shape[1], dtype=jnp.float32)}}


def test_full_rank_reproduces_the_kernel():
  w = _matrix(0, (12, 7))
  got = factorization.svd_factorize(_tree(w), rank=7)["fc"]
  chex.assert_shape([got["u"]["kernel"], got["v"]["kernel"]], [(12, 7), (7, 7)])
  np.testing.assert_allclose(got["u"]["kernel"] @ got["v"]["kernel"], w, atol=1e-5)
  np.testing.assert_array_equal(got["bias"], np.arange(7))
  assert "kernel" not in got


@pytest.mark.parametrize("r", [1, 3, 5])
def test_truncation_error_is_the_tail_of_the_spectrum(r):
  w = _matrix(1, (16, 9))
  s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
  got = factorization.svd_factorize(_tree(w), rank=r)["fc"]
  err = w.astype(np.float64) - np.asarray(got["u"]["kernel"] @ got["v"]["kernel"], np.float64)
  # Eckart-Young: Frobenius error sqrt(sum_{i>r} s_i^2), spectral error s_{r+1}.
  np.testing.assert_allclose(np.linalg.norm(err), np.sqrt(np.sum(s[r:] ** 2)), rtol=1e-4)
  np.testing.assert_allclose(np.linalg.norm(err, 2), s[r], rtol=1e-4)


def test_energy_picks_the_fewest_singular_values():
  q1, _ = np.linalg.qr(_matrix(2, (8, 4)))
  q2, _ = np.linalg.qr(_matrix(3, (6, 4)))
  w = (q1 * np.array([4.0, 2.0, 1.0, 0.5])) @ q2.T  # s^2 = 16, 4, 1, 0.25 of 21.25
  for energy, want in ((0.75, 1), (0.76, 2), (0.94, 2), (0.95, 3), (0.99, 4), (1.0, 4)):
    got = factorization.svd_factorize(_tree(w), energy=energy)["fc"]["u"]["kernel"]
    assert got.shape[1] == want, (energy, got.shape)


class _Net(nn.Module):
  low_rank: int | None = None

  @nn.compact
  def __call__(self, x):
    if self.low_rank is None:
      x = nn.Dense(24, name="fc1")(x)
    else:
      x = factorization.LowRankDense(24, self.low_rank, name="fc1")(x)
    return nn.Dense(3, name="fc2")(nn.relu(x))


def test_factorized_tree_loads_into_low_rank_dense_with_fewer_parameters():
  x = jnp.asarray(_matrix(4, (5, 20)))
  params = _Net().init(jax.random.key(0), x)["params"]
  only_fc1 = lambda p: p == "fc1/kernel"
  count = lambda t: sum(a.size for a in jax.tree.leaves(t))
  full = factorization.svd_factorize(params, rank=20, where=only_fc1)
  low = factorization.svd_factorize(params, rank=4, where=only_fc1)
  template = _Net(low_rank=4).init(jax.random.key(0), x)["params"]
  assert jax.tree.structure(low) == jax.tree.structure(template)
  jax.tree.map(lambda a, b: chex.assert_equal_shape([a, b]), low, template)
  np.testing.assert_allclose(_Net(low_rank=20).apply({"params": full}, x),
                             _Net().apply({"params": params}, x), rtol=1e-4, atol=1e-4)
  assert count(params) - count(low) == 20 * 24 - 4 * (20 + 24)


def test_low_rank_dense_function_matches_dense_product():
  x, u, v = _matrix(5, (3, 6)), _matrix(6, (6, 2)), _matrix(7, (2, 4))
  b = np.ones(4, np.float32)
  np.testing.assert_allclose(factorization.low_rank_dense(x, u, v, b), x @ (u @ v) + b,
                             rtol=1e-5)


def test_default_selection_is_2d_kernels_only():
  p = {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}, "fc": {"kernel": jnp.ones((4, 3)),
                                                          "bias": jnp.ones(3)}}
  got = factorization.svd_factorize(p, rank=1)
  assert set(got["fc"]) == {"u", "v", "bias"}
  np.testing.assert_array_equal(got["conv"]["kernel"], p["conv"]["kernel"])


def test_svd_bad_inputs_raise():
  t = _tree(_matrix(8, (6, 4)))
  with pytest.raises(ValueError, match="rank must be <= min\\(in, out\\) = 4 for fc/kernel"):
    factorization.svd_factorize(t, rank=5)
  with pytest.raises(ValueError, match="rank must be a positive int, got 0"):
    factorization.svd_factorize(t, rank=0)
  with pytest.raises(ValueError, match="exactly one of rank and energy"):
    factorization.svd_factorize(t)
  with pytest.raises(ValueError, match="exactly one of rank and energy"):
    factorization.svd_factorize(t, rank=2, energy=0.9)
  with pytest.raises(ValueError, match="energy must be in \\(0, 1\\], got 1.5"):
    factorization.svd_factorize(t, energy=1.5)
  with pytest.raises(ValueError, match="selected leaf fc/bias must be a 2-D kernel"):
    factorization.svd_factorize(t, rank=1, where=lambda p: p.startswith("fc/b"))


def _np_lloyd(x, k, iters):
  """Reference: argmin assignment, linear init, empty clusters keep their centroid."""
  x = x.ravel().astype(np.float64)
  c = np.linspace(x.min(), x.max(), k)
  for _ in range(iters):
    idx = np.argmin(np.abs(x[:, None] - c[None, :]), axis=1)
    for j in range(k):
      if np.any(idx == j):
        c[j] = x[idx == j].mean()
  return np.argmin(np.abs(x[:, None] - c[None, :]), axis=1), c


def test_kmeans_matches_numpy_lloyd():
  # A skewed mixture so some clusters start empty or lopsided.
  rng = np.random.default_rng(9)
  x = np.concatenate([rng.normal(0, 0.1, 150), rng.normal(2, 0.5, 40), [6.0]]).astype(np.float32)
  for k, iters in ((4, 10), (8, 25)):
    got = factorization.kmeans_1d(x.reshape(1, -1), k, iters)
    idx, c = _np_lloyd(x, k, iters)
    chex.assert_shape(got.indices, (1, x.size))
    np.testing.assert_allclose(got.codebook, c, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.indices.ravel(), idx)


def test_cluster_leaves_at_most_2_pow_b_values_and_records_rebuild_it():
  params = {"fc": {"kernel": jnp.asarray(_matrix(10, (32, 16))), "bias": jnp.linspace(0, 1, 16)},
            "conv": {"kernel": jnp.asarray(_matrix(11, (3, 3, 2, 8)))}}
  for bits in (1, 3):
    clustered, records = factorization.cluster(params, bits)
    for name in ("fc", "conv"):
      assert np.unique(np.asarray(clustered[name]["kernel"])).size <= 2**bits
      rec = records[name]["kernel"]
      assert rec.indices.dtype == jnp.uint8 and int(rec.indices.max()) < 2**bits
      np.testing.assert_array_equal(rec.codebook[rec.indices], clustered[name]["kernel"])
    np.testing.assert_array_equal(clustered["fc"]["bias"], params["fc"]["bias"])
    assert records["fc"]["bias"] is None
  jitted, _ = jax.jit(lambda p: factorization.cluster(p, 3))(params)
  jax.tree.map(np.testing.assert_array_equal, jitted, clustered)


def test_clustering_beats_the_uniform_grid_it_starts_from():
  x = np.random.default_rng(12).standard_normal(2000).astype(np.float32)
  grid = np.linspace(x.min(), x.max(), 8)
  uniform_mse = np.mean(np.min((x[:, None] - grid) ** 2, axis=1))
  got = factorization.kmeans_1d(x, 8, 30)
  mse = float(np.mean((np.asarray(got.codebook)[np.asarray(got.indices)] - x) ** 2))
  assert mse < 0.8 * uniform_mse, (mse, uniform_mse)


def test_cluster_bad_inputs_raise():
  p = _tree(_matrix(13, (4, 4)))
  with pytest.raises(ValueError, match="bits must be an int in \\[1, 8\\], got 9"):
    factorization.cluster(p, 9)
  with pytest.raises(ValueError, match="bits must be an int in \\[1, 8\\], got 0"):
    factorization.cluster(p, 0)
  with pytest.raises(ValueError, match="cluster: `where` selects no parameter"):
    factorization.cluster(p, 2, where=lambda s: False)


def test_clustered_nbytes_counts_packed_indices_codebooks_and_headers():
  params = {"a": {"kernel": jnp.asarray(_matrix(14, (10, 7)))},
            "b": {"kernel": jnp.asarray(_matrix(15, (3, 3)))}}
  _, records = factorization.cluster(params, 3)
  # 70 and 9 three-bit indices pack into ceil(210 / 8) + ceil(27 / 8) bytes; two float32
  # codebooks of 8 entries; two 2-D headers of 8 + 4 * 2 bytes.
  want = math.ceil(70 * 3 / 8) + math.ceil(9 * 3 / 8) + 2 * 8 * 4 + 2 * 16
  assert factorization.clustered_nbytes(records, 3) == want
