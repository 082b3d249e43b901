"""Post-training quantization: clipping-range methods, weight PTQ, activation calibration.

A range method is one small function ``method(x, spec, axes) -> (lo, hi)`` giving the clipping
range over ``axes`` (kept as dims); `RANGE_METHODS` names them. Weights use them per tensor or
per channel (`ptq`); activations per layer over a few calibration batches (`calibrate`).
"""

import functools
from typing import Any, Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from compressjax import selection
from compressjax.quantization import activations
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


RANGE_METHODS: dict[str, Callable[..., Any]] = {
    "minmax": minmax, "percentile": percentile, "mse": mse}


def _check_method(method: str) -> Callable[..., Any]:
  if method not in RANGE_METHODS:
    raise ValueError(f"method must be one of {tuple(RANGE_METHODS)}, got {method!r}")
  return RANGE_METHODS[method]


@functools.partial(jax.jit, static_argnums=(1, 2))
def _ptq_leaf(x, spec, method, hessian=None):
  axes = quantizers.reduce_axes(x.ndim, spec)
  if method == "mse" and hessian is not None:
    # Output error of a Dense layer: sum over inputs of d^T H d per output column.
    err = lambda d: jnp.sum(d * (hessian @ d), axes, keepdims=True)
    lo, hi = mse(x, spec, axes, error=err)
  else:
    lo, hi = RANGE_METHODS[method](x, spec, axes)
  return quantizers.quantize(x, spec, grid=quantizers.grid_from_range(lo, hi, spec))


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


def ptq(params: Any, spec: quantizers.Spec | int, calib=None, method: str = "minmax",
        where: Where | None = None) -> Any:
  """Post-training weight quantization of the leaves ``where`` selects.

  Each selected leaf goes to the grid of the clipping range from ``method`` (`RANGE_METHODS`:
  ``"minmax"``, ``"percentile"``, ``"mse"``), per tensor or per channel. The result is on its own
  min/max grid, so ``export`` stores it exactly and `fake_quant` leaves it unchanged.

  Args:
    params: a parameter pytree.
    spec: a `Spec`, or a bit width.
    calib: optional ``(forward, batches)``, ``forward(batch)`` running the float model (for
      example ``lambda x: model.apply({"params": params}, x)``). With ``method="mse"`` the
      clipping of each 2-D Dense kernel (channel axis -1, or per tensor) then minimizes the
      layer's output error on the batches' inputs, ``sum_j d_j^T (X^T X) d_j``, instead of the
      weight error; other leaves and methods do not use it.
    method: the clipping-range method.
    where: predicate on the parameter path (default: Dense/Conv kernels).

  Returns:
    The quantized params (same structure and dtypes).
  """
  spec = quantizers.as_spec(spec)
  _check_method(method)
  flags = wrapper.select_leaves(params, spec, where, "ptq")
  hessians = {}
  if calib is not None and method == "mse":
    hessians = _layer_hessians(calib, selection.selected_paths(params, where))

  def leaf(path, x, on):
    if not on:
      return x
    h = hessians.get(selection.path_str(path))
    use_h = (h is not None and jnp.ndim(x) == 2 and h.shape[0] == x.shape[0]
             and (spec.granularity == "tensor" or spec.axis % 2 == 1))
    return _ptq_leaf(x, spec, method, jnp.asarray(h) if use_h else None).astype(x.dtype)

  return jax.tree_util.tree_map_with_path(leaf, params, flags)


def calibrate(forward: Callable[[Any], Any], batches: Sequence[Any], spec: quantizers.Spec | int,
              method: str = "minmax", where: activations.LayerWhere | None = None
              ) -> dict[str, tuple[float, float]]:
  """Static activation ranges: the clipping range of each selected layer's inputs.

  Args:
    forward: ``forward(batch)`` running the model, e.g. ``lambda x: model.apply(variables, x)``
      (not jitted; it is jitted here with the recording interception).
    batches: a few calibration batches.
    spec: a `Spec` or a bit width (``bits`` and ``symmetric`` matter for ``"mse"``).
    method: a `RANGE_METHODS` name; the range is per tensor over all the batches' inputs.
    where: predicate on the layer path (default: every Dense/DenseGeneral/Conv/ConvTranspose).

  Returns:
    A dict layer path -> ``(lo, hi)`` floats, for `quantize_activations` ``mode="static"``.
  """
  spec = quantizers.as_spec(spec)
  fn = _check_method(method)
  rec = jax.jit(activations.record_inputs(forward, where))
  seen: dict[str, list[np.ndarray]] = {}
  for batch in batches:
    for layer, xs in rec(batch)[1].items():
      seen.setdefault(layer, []).extend(np.asarray(x, np.float32).ravel() for x in xs)
  if not seen:
    raise ValueError("calibrate: `where` selects no Dense/Conv layer input, got none recorded")
  out = {}
  for layer, xs in seen.items():
    lo, hi = fn(jnp.concatenate(xs), spec, (0,))
    out[layer] = (float(lo[0]), float(hi[0]))
  return out
