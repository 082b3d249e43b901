"""Low-rank (SVD) factorization of kernels, and weight clustering (weight sharing).

Low rank: a Dense kernel W [in, out] is replaced by U [in, r] and V [r, out] with ``U V`` the
best rank-r approximation of W in Frobenius and spectral norm (Eckart & Young, 1936). The layer
then costs ``r (in + out)`` parameters and multiply-adds per input row instead of ``in * out``
(a saving when ``r < in out / (in + out)``). In the factorized tree a selected leaf
``.../fc/kernel`` becomes two Dense kernels ``.../fc/u/kernel`` and ``.../fc/v/kernel`` beside the
unchanged ``.../fc/bias``: exactly the parameters of `LowRankDense` named ``fc``, and the new
kernels are still ``kernel`` leaves that pruning and quantization select by default.

Clustering: k-means over the values of each selected tensor into 2^b shared values (Han et al.,
2016, "Deep Compression", with their linear centroid initialization), stored as b-bit indices
plus a float codebook (`Clustered`).
"""

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from compressjax import selection
from compressjax import quantization


def _default_matrix_where(params: Any) -> selection.Where:
  two_d = {selection.path_str(p) for p, x in jax.tree_util.tree_leaves_with_path(params)
           if jnp.ndim(x) == 2}
  return lambda path: selection.default_where(path) and path in two_d


def _rank_for(s: np.ndarray, rank: int | None, energy: float | None, path: str) -> int:
  if rank is not None:
    if rank > s.size:
      raise ValueError(f"rank must be <= min(in, out) = {s.size} for {path}, got {rank}")
    return rank
  cum = np.cumsum(np.asarray(s, np.float64) ** 2)
  if cum[-1] == 0:
    return 1
  # Smallest r whose leading singular values keep at least `energy` of sum(s^2).
  return int(min(np.searchsorted(cum / cum[-1], energy * (1 - 1e-9)) + 1, s.size))


def _rebuild(node: Any, prefix: str, factors: dict[str, tuple]) -> Any:
  """Copies ``node``, replacing each factored ``parent/k`` by ``parent/u/k`` and ``parent/v/k``."""
  if not isinstance(node, Mapping):
    return node
  out = {}
  for key, child in node.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    if path in factors:
      if "u" in node or "v" in node or "u" in out:
        raise ValueError(f"svd_factorize: cannot factor {path}: its parent already holds a "
                         "'u' or 'v' entry or a second selected kernel")
      out["u"], out["v"] = {key: factors[path][0]}, {key: factors[path][1]}
      del factors[path]
    else:
      out[key] = _rebuild(child, path, factors)
  return out


def svd_factorize(params: Any, rank: int | None = None, energy: float | None = None,
                  where: selection.Where | None = None) -> Any:
  """Factors selected 2-D kernels into truncated-SVD pairs (U sqrt(S), sqrt(S) V^T).

  The singular values are split evenly between the factors, which keeps both at similar scales
  (kinder to later quantization). Runs eagerly (with ``energy`` the shapes depend on values).

  Args:
    params: parameter pytree of nested mappings (e.g. a Flax ``params`` collection).
    rank: keep this many singular values per kernel (1 <= rank <= min(in, out)).
    energy: instead of ``rank``, keep the fewest singular values whose squares sum to at least
      this fraction of ``sum(s^2)`` (in (0, 1]), chosen per kernel.
    where: predicate on the '/'-joined path; default: 2-D leaves named ``kernel``.

  Returns:
    A new tree in which each selected ``.../name/kernel`` [in, out] is replaced by
    ``.../name/u/kernel`` [in, r] and ``.../name/v/kernel`` [r, out]; other leaves are kept.
    Read r back as ``tree[...]["u"]["kernel"].shape[1]``.

  Raises:
    ValueError: unless exactly one of rank / energy is given and valid, or if a selected leaf
      is not 2-D, or rank > min(in, out).
  """
  if (rank is None) == (energy is None):
    raise ValueError(f"exactly one of rank and energy must be given, got rank={rank!r}, "
                     f"energy={energy!r}")
  if rank is not None and (not isinstance(rank, int) or rank < 1):
    raise ValueError(f"rank must be a positive int, got {rank!r}")
  if energy is not None and not 0 < energy <= 1:
    raise ValueError(f"energy must be in (0, 1], got {energy}")
  where = where or _default_matrix_where(params)
  selection.check_selects_something(params, where, "svd_factorize")
  flat = dict(jax.tree_util.tree_leaves_with_path(params))
  factors = {}
  for path, w in flat.items():
    name = selection.path_str(path)
    if not where(name):
      continue
    if jnp.ndim(w) != 2:
      raise ValueError(f"svd_factorize: selected leaf {name} must be a 2-D kernel, got shape "
                       f"{jnp.shape(w)}")
    u, s, vt = jnp.linalg.svd(jnp.asarray(w, jnp.promote_types(w.dtype, jnp.float32)),
                              full_matrices=False)
    r = _rank_for(np.asarray(s), rank, energy, name)
    root = jnp.sqrt(s[:r])
    factors[name] = ((u[:, :r] * root).astype(w.dtype), (root[:, None] * vt[:r]).astype(w.dtype))
  out = _rebuild(params, "", factors)
  if factors:
    raise ValueError(f"svd_factorize: selected leaves {sorted(factors)} are not entries of a "
                     "mapping and cannot be replaced")
  return out


def low_rank_dense(x: chex.Array, u: chex.Array, v: chex.Array,
                   bias: chex.Array | None = None) -> chex.Array:
  """``(x U) V + bias``: a Dense layer with a factored kernel, never forming ``U V``."""
  y = (x @ u) @ v
  return y if bias is None else y + bias


class LowRankDense(nn.Module):
  """A Dense layer with kernel ``U V`` (U [in, rank], V [rank, out]) and an optional bias.

  Its parameters ``{"u": {"kernel"}, "v": {"kernel"}, "bias"}`` are the layout that
  `svd_factorize` produces, so a model that swaps ``nn.Dense(features, name="fc")`` for
  ``LowRankDense(features, rank, name="fc")`` loads the factorized tree directly.

  Attributes:
    features: output width.
    rank: inner width r.
    use_bias: whether to add a bias.
  """
  features: int
  rank: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    y = nn.Dense(self.rank, use_bias=False, name="u")(x)
    y = nn.Dense(self.features, use_bias=False, name="v")(y)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,))
    return y


class Clustered(NamedTuple):
  """A clustered tensor: ``codebook[indices]`` rebuilds it.

  Attributes:
    indices: uint8 array of the tensor's shape, values in [0, 2^bits).
    codebook: [2^bits] centroids, ascending, in the tensor's dtype.
  """
  indices: chex.Array
  codebook: chex.Array


@functools.partial(jax.jit, static_argnames=("k", "iters"))
def kmeans_1d(x: chex.Array, k: int, iters: int = 30) -> Clustered:
  """Lloyd's k-means over the scalar values of ``x``, jit-able (``k``, ``iters`` static).

  Centroids start linearly spaced over [min, max] (Han et al. 2016). In one dimension Lloyd's
  iterations keep the centroids sorted, so assignment is a binary search against the midpoints
  (``O(n log k)`` time, ``O(n)`` memory); an empty cluster keeps its previous centroid. Ties go
  to the lower centroid.

  Args:
    x: a float array of any shape.
    k: number of centroids.
    iters: Lloyd iterations (a fixed count, so the loop compiles once).

  Returns:
    `Clustered` with indices of ``x``'s shape and the [k] codebook.
  """
  flat = jnp.ravel(x).astype(jnp.float32)

  def assign(c):
    return jnp.searchsorted((c[1:] + c[:-1]) / 2, flat, side="left")

  def step(_, c):
    idx = assign(c)
    sums = jax.ops.segment_sum(flat, idx, num_segments=k)
    counts = jax.ops.segment_sum(jnp.ones_like(flat), idx, num_segments=k)
    return jnp.where(counts > 0, sums / jnp.maximum(counts, 1), c)

  c = jax.lax.fori_loop(0, iters, step, jnp.linspace(flat.min(), flat.max(), k))
  idx = assign(c).astype(jnp.uint8).reshape(jnp.shape(x))
  return Clustered(idx, c.astype(jnp.result_type(x)))


def cluster(params: Any, bits: int, where: selection.Where | None = None,
            iters: int = 30) -> tuple[Any, Any]:
  """Weight sharing: each selected tensor is rounded to its own 2^bits k-means centroids.

  Jit-able (``bits``, ``iters`` and ``where`` static).

  Args:
    params: parameter pytree.
    bits: index width b in [1, 8]; each tensor gets 2^b shared values.
    where: predicate on the '/'-joined path; default Dense/Conv kernels.
    iters: Lloyd iterations per tensor.

  Returns:
    ``(clustered_params, records)``: params with every selected tensor replaced by
    ``codebook[indices]`` (at most 2^b distinct values), and a tree like ``params`` holding a
    `Clustered` at each selected leaf and ``None`` elsewhere.

  Raises:
    ValueError: on bits outside [1, 8], iters < 1, or a ``where`` selecting nothing.
  """
  if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
    raise ValueError(f"bits must be an int in [1, 8], got {bits!r}")
  if not isinstance(iters, int) or iters < 1:
    raise ValueError(f"iters must be a positive int, got {iters!r}")
  selection.check_selects_something(params, where, "cluster")
  flags = selection.select(params, where)
  records = jax.tree.map(lambda w, on: kmeans_1d(w, 2**bits, iters) if on else None,
                         params, flags)
  clustered = jax.tree.map(lambda w, rec: w if rec is None else rec.codebook[rec.indices],
                           params, records)
  return clustered, records


def clustered_nbytes(records: Any, bits: int) -> int:
  """Exact storage of clustered tensors, counted as ``quantization.nbytes`` counts exports.

  Per tensor: the indices packed ``bits`` each by the real packer
  (`quantization.pack_bits`), the float codebook, and the per-tensor header of
  `quantization.header_bytes` (8 bytes + 4 per dimension), so the figure compares
  directly with a quantized export of the same tree.

  Args:
    records: the second output of `cluster`.
    bits: the index width used by `cluster`.

  Returns:
    Total bytes over every `Clustered` in ``records``.
  """
  total = 0
  for rec in jax.tree.leaves(records, is_leaf=lambda r: isinstance(r, Clustered)):
    packed = quantization.pack_bits(np.asarray(rec.indices), bits)
    header = quantization.header_bytes(np.ndim(rec.indices))
    total += packed.nbytes + np.asarray(rec.codebook).nbytes + header
  return total
