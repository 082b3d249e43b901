"""Post-training quantization: grid methods beyond min/max, weight PTQ, activation calibration.

A grid method is one small function ``method(x, spec, axes) -> (lo, hi)`` giving the clipping
range over ``axes`` (kept as dims). ``"percentile"``, ``"mse"`` and ``"pow2"`` are registered
here in `grids.GRIDS` (beside ``"minmax"``), as any method from outside the library is,
with `grids.register_grid`; `RANGE_METHODS` is that registry. Weights use them per tensor
or per channel (`ptq`, and QAT and export through ``Spec.grid``); activations per layer over a
few calibration batches (`calibrate`).
"""

import dataclasses
import functools
from typing import Any, Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from compressjax import selection
from compressjax.quantization import activations
from compressjax.quantization import grids
from compressjax.quantization import quantizers
from compressjax.quantization import wrapper

Where = selection.Where


def minmax(x: chex.Array, spec: quantizers.Spec, axes: tuple[int, ...]):
  """The full range: min and max of ``x`` over ``axes``."""
  return quantizers.minmax_range(x, spec, axes)


def percentile(x: chex.Array, spec: quantizers.Spec, axes: tuple[int, ...],
               pct: float = 99.99):
  """Clips the tails: the ``pct``-th percentile of ``|x|`` (symmetric specs), or the
  ``(100 - pct)``-th and ``pct``-th percentiles of ``x`` (asymmetric), over ``axes``."""
  x = jnp.asarray(x, jnp.float32)
  if spec.symmetric:
    a = jnp.quantile(jnp.abs(x), pct / 100.0, axis=axes, keepdims=True)
    return -a, a
  return (jnp.quantile(x, 1.0 - pct / 100.0, axis=axes, keepdims=True),
          jnp.quantile(x, pct / 100.0, axis=axes, keepdims=True))


def mse(x: chex.Array, spec: quantizers.Spec, axes: tuple[int, ...], num_ratios: int = 100,
        error: Callable[[chex.Array], chex.Array] | None = None):
  """MSE-optimal clipping: the range ``alpha * [min, max]`` minimizing the squared error.

  A grid search over ``alpha in {1/n, 2/n, ..., 1}`` per tensor or channel (Banner et al. 2019,
  "Post Training 4-bit Quantization of Convolutional Networks for Rapid-Deployment", solve the
  same problem in closed form under a Laplace prior; Sung et al. 2015 search it, as here).

  Args:
    x: the values to quantize.
    spec: the quantizer.
    axes: axes the range is shared over.
    num_ratios: number of clipping ratios tried.
    error: maps the error ``fake_quant(x) - x`` to the loss over ``axes`` (kept as dims);
      default the sum of squares.

  Returns:
    ``(lo, hi)`` kept as dims over ``axes``.
  """
  x = jnp.asarray(x, jnp.float32)
  lo, hi = quantizers.minmax_range(x, spec, axes)
  if error is None:
    error = lambda d: jnp.sum(d * d, axes, keepdims=True)

  def loss(alpha):
    grid = quantizers.grid_from_range(alpha * lo, alpha * hi, spec)
    return error(quantizers.quantize(x, spec, grid=grid) - x)

  ratios = jnp.arange(1, num_ratios + 1, dtype=jnp.float32) / num_ratios
  losses = jax.lax.map(loss, ratios)
  best = ratios[jnp.argmin(losses, axis=0)]
  return best * lo, best * hi


def pow2(x: chex.Array, spec: quantizers.Spec, axes: tuple[int, ...]):
  """Power-of-two scales: ``s = 2^k``, the smallest with ``max|x| <= qmax * s`` over ``axes``,
  given as the range ``[-qmax s, qmax s]`` (whose grid has exactly that scale).

  Nothing clips, and rescaling is a bit shift on fixed-point hardware (Jain et al. 2020,
  "Trained Quantization Thresholds for Accurate and Efficient Fixed-Point Inference of Deep
  Neural Networks", power-of-2 scale factors). The values quantized on it give the same scale
  back: their largest magnitude is ``s`` times a code above ``qmax / 2``.

  Raises:
    ValueError: for an asymmetric spec (a power-of-two scale here comes with zero point 0).
  """
  if not spec.symmetric:
    raise ValueError("grid 'pow2' needs a symmetric spec (zero point 0), got symmetric=False")
  x = jnp.asarray(x, jnp.float32)
  amax = jnp.max(jnp.abs(x), axes, keepdims=True)
  _, e = jnp.frexp(amax / spec.qmax)  # amax / qmax in [2^(e-1), 2^e)
  s = jnp.ldexp(jnp.ones_like(amax), e)
  # Exact comparisons (qmax * s is exact) settle the rounding of the division.
  s = jnp.where(amax <= spec.qmax * (s / 2), s / 2, s)
  s = jnp.where(amax > spec.qmax * s, 2 * s, s)
  a = spec.qmax * jnp.where(amax > 0, s, 1.0)
  return -a, a


grids.register_grid("percentile", percentile, clips=True)
grids.register_grid("mse", mse, clips=True)
grids.register_grid("pow2", pow2)
# The grid registry under its earlier name (custom grids appear here too).
RANGE_METHODS: dict[str, Callable[..., Any]] = grids.GRIDS


@functools.partial(jax.jit, static_argnums=(1,))
def _ptq_leaf(x, spec, hessian=None):
  if spec.grid == "mse" and hessian is not None:
    # Output error of a Dense layer: sum over inputs of d^T H d per output column.
    axes = quantizers.reduce_axes(x.ndim, spec)
    err = lambda d: jnp.sum(d * (hessian @ d), axes, keepdims=True)
    lo, hi = mse(x, spec, axes, error=err)
    return quantizers.quantize(x, spec, grid=quantizers.grid_from_range(lo, hi, spec))
  return quantizers.quantize(x, spec)


def _layer_hessians(calib, paths: list[str]) -> dict[str, np.ndarray]:
  """``X^T X / n`` of each Dense layer's inputs over the calibration batches, by kernel path."""
  forward, batches = calib
  rec = jax.jit(activations.record_inputs(forward))
  seen: dict[str, list[np.ndarray]] = {}
  for batch in batches:
    for layer, xs in rec(batch)[1].items():
      seen.setdefault(layer, []).extend(np.asarray(x, np.float32) for x in xs)
  out = {}
  for path in paths:
    layer = path.removesuffix("/kernel")
    for key in (layer, layer.removeprefix("params/")):
      if key in seen:
        x = np.concatenate([a.reshape(-1, a.shape[-1]) for a in seen[key]])
        out[path] = x.T @ x / x.shape[0]
        break
  return out


def with_method(spec: quantizers.Spec | int, method: str | None) -> quantizers.Spec:
  """``spec`` with ``grid=method`` (``method=None`` keeps ``spec.grid``), both names checked.

  Raises:
    ValueError: naming ``method`` (or ``grid``) and the registered names, for an unknown one.
  """
  spec = quantizers.as_spec(spec)
  if method is not None:
    grids.get_grid(method, "method")
    spec = dataclasses.replace(spec, grid=method)
  grids.get_grid(spec.grid)
  return spec


def ptq(params: Any, spec: quantizers.Spec | int, calib=None, method: str | None = None,
        where: Where | None = None) -> Any:
  """Post-training weight quantization of the leaves ``where`` selects.

  Each selected leaf goes to its grid under ``spec`` (`quantizers.grid_of`: ``spec.grid``'s
  method, or ``method``'s), per tensor or per channel. The result is on the grid of
  ``with_method(spec, method)``, so `export` with that spec stores it exactly and `fake_quant`
  leaves it unchanged. Clipping methods (``"minmax"``, ``"percentile"``, ``"mse"``) leave it on
  its own min/max grid too, so the min/max spec also exports it exactly, as before grids had
  names; export raises rather than re-quantize weights on another registered grid.

  Args:
    params: a parameter pytree.
    spec: a `Spec`, or a bit width.
    calib: optional ``(forward, batches)``, ``forward(batch)`` running the float model (for
      example ``lambda x: model.apply({"params": params}, x)``). With the ``"mse"`` grid the
      clipping of each 2-D Dense kernel (channel axis -1, or per tensor) then minimizes the
      layer's output error on the batches' inputs, ``sum_j d_j^T (X^T X) d_j``, instead of the
      weight error; other leaves and methods do not use it.
    method: a registered grid name (`grids.GRIDS`) used instead of ``spec.grid``; None
      (default) uses ``spec.grid``.
    where: predicate on the parameter path (default: Dense/Conv kernels).

  Returns:
    The quantized params (same structure and dtypes).
  """
  spec = with_method(spec, method)
  flags = wrapper.select_leaves(params, spec, where, "ptq")
  hessians = {}
  if calib is not None and spec.grid == "mse":
    hessians = _layer_hessians(calib, selection.selected_paths(params, where))

  def leaf(path, x, on):
    if not on:
      return x
    h = hessians.get(selection.path_str(path))
    use_h = (h is not None and jnp.ndim(x) == 2 and h.shape[0] == x.shape[0]
             and (spec.granularity == "tensor" or spec.axis % 2 == 1))
    return _ptq_leaf(x, spec, jnp.asarray(h) if use_h else None).astype(x.dtype)

  return jax.tree_util.tree_map_with_path(leaf, params, flags)


def calibrate(forward: Callable[[Any], Any], batches: Sequence[Any], spec: quantizers.Spec | int,
              method: str | None = None, where: activations.LayerWhere | None = None
              ) -> dict[str, tuple[float, float]]:
  """Static activation ranges: the clipping range of each selected layer's inputs.

  Args:
    forward: ``forward(batch)`` running the model, e.g. ``lambda x: model.apply(variables, x)``
      (not jitted; it is jitted here with the recording interception).
    batches: a few calibration batches.
    spec: a `Spec` or a bit width (``grid``, ``bits`` and ``symmetric`` are used).
    method: a registered grid name used instead of ``spec.grid`` (None: ``spec.grid``); the
      range (`quantizers.grid_range`) is per tensor over all the batches' inputs.
    where: predicate on the layer path (default: every Dense/DenseGeneral/Conv/ConvTranspose).

  Returns:
    A dict layer path -> ``(lo, hi)`` floats, for `quantize_activations` ``mode="static"``:
    ``grid_from_range(lo, hi, spec)`` is the layer's grid.
  """
  spec = with_method(spec, method)
  rec = jax.jit(activations.record_inputs(forward, where))
  seen: dict[str, list[np.ndarray]] = {}
  for batch in batches:
    for layer, xs in rec(batch)[1].items():
      seen.setdefault(layer, []).extend(np.asarray(x, np.float32).ravel() for x in xs)
  if not seen:
    raise ValueError("calibrate: `where` selects no Dense/Conv layer input, got none recorded")
  out = {}
  for layer, xs in seen.items():
    lo, hi = quantizers.grid_range(jnp.concatenate(xs), spec, (0,))
    out[layer] = (float(lo[0]), float(hi[0]))
  return out
