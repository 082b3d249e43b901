"""Quantization-aware training as an optax wrapper: latent float weights, params on the grid."""

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from compressjax import selection
from compressjax.quantization import grids
from compressjax.quantization import quantizers

Where = selection.Where


class QuantizationState(NamedTuple):
  """State of `wrap`.

  Attributes:
    inner_state: the wrapped transform's state.
    latent: float weights of the selected leaves (``optax.MaskedNode()`` elsewhere).
    count: number of updates so far, int32.
  """
  inner_state: Any
  latent: Any
  count: chex.Array


def select_leaves(params: Any, spec: quantizers.Spec, where: Where | None, name: str) -> Any:
  """Selects leaves for quantization, or raises ``ValueError`` naming ``name``.

  The selection must be non-empty, and every selected leaf floating with ``spec.axis`` in
  range for its rank; ``spec.grid`` must be registered and its method must accept the leaf
  (traced abstractly: `pow2` refuses asymmetric specs).

  Returns:
    The bool pytree of `compressjax.selection.select`.
  """
  selection.check_selects_something(params, where, name)
  flags = selection.select(params, where)
  selection.check_floating(params, flags, name)
  grids.get_grid(spec.grid)
  for (path, x), on in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(flags)):
    if on:
      spec.check(jnp.ndim(x), selection.path_str(path))
      jax.eval_shape(lambda a: quantizers.grid_of(a, spec), x)
  return flags


def quantize_tree(params: Any, spec: quantizers.Spec | int, where: Where | None = None) -> Any:
  """Puts the leaves ``where`` selects on their grid (`quantize`); others pass through.

  The same as ``ptq(params, spec)``: a QAT starting point already on the grid.
  """
  spec = quantizers.as_spec(spec)
  flags = select_leaves(params, spec, where, "quantize_tree")
  return jax.tree.map(lambda x, on: quantizers.quantize(x, spec) if on else x, params, flags)


def grid_of_survivors(latent: chex.Array, params: chex.Array,
                      spec: quantizers.Spec) -> quantizers.Grid:
  """The grid (`quantizers.grid_of`) of ``latent`` with the entries that are zero in ``params``
  set to zero.

  Exact zeros of the current params (pruned weights) stay zero, so their latent values do not
  set the grid (under min/max, a zero never stretches it); a tensor or channel whose params are
  all zero (zero-initialized, or pruned whole) uses all its entries.

  Args:
    latent: the new latent float weights.
    params: the current params (same shape).
    spec: the quantizer.

  Returns:
    The `Grid` (per tensor, or per channel of ``spec.axis``).
  """
  axes = quantizers.reduce_axes(latent.ndim, spec)
  latent = jnp.asarray(latent, jnp.float32)
  use = params != 0
  use = use | ~jnp.any(use, axis=axes, keepdims=True)
  return quantizers.grid_of(jnp.where(use, latent, 0.0), spec)


def exact_delta(new: chex.Array, old: chex.Array) -> chex.Array:
  """An update ``u`` such that ``old + u`` rounds to ``new`` wherever float arithmetic allows.

  ``new - old`` is exact, and so is ``old + (new - old)``, when the two are within a factor of
  two (Sterbenz's lemma): the usual case of a small step between grid points. When ``|u|``
  exceeds ``|new|`` (a sign flip, or a jump away from near zero) the sums ``old + u`` over
  float32 ``u`` are spaced wider than ``new``'s ulp and may miss it by one ulp whatever ``u`` is;
  one compensation step (``u + (new - (old + u))``) removes some of the remaining misses.
  """
  u = new - old
  return u + (new - (old + u))


def wrap(inner: optax.GradientTransformation, spec: quantizers.Spec | int,
         where: Where | None = None) -> optax.GradientTransformationExtraArgs:
  """Quantization-aware training: params stay exactly on the quantization grid.

  The state keeps latent float weights for the selected leaves. Each update runs ``inner`` on
  the gradients (taken at the quantized params) with the latent weights as its ``params``, adds
  its updates to the latent weights, and returns ``quantize(latent') - params`` for the
  selected leaves (``inner``'s updates for the others): the straight-through estimator
  (Courbariaux et al. 2015, "BinaryConnect"; Jacob et al. 2018). The grid is ``spec.grid``'s
  (min/max by default) of the new latent weights, with the entries that are zero in the
  current params as zeros (`grid_of_survivors`: pruned weights do not set it), so after
  ``optax.apply_updates`` the params equal ``fake_quant(params)`` and ``export(params, spec)``
  stores them as they are (`grids.register_grid` says what a method needs for this): bit for
  bit, except that an entry whose update exceeds its new value in magnitude (a sign flip) can
  land one ulp off, since float32 ``p + u`` cannot always reach it (`exact_delta`). Zeros are
  always exact. Before the first update the params are the float initial ones. Put this
  wrapper last in an ``optax.chain``: a transform after it would move the params off the grid.

  Nesting with `compressjax.pruning.wrap` (both orders keep pruned zeros exactly zero, because
  0.0 is on every grid):

  - ``wrap(pruning.wrap(adam), spec)``: pruning scores and masks the latent float weights
    (pruned latents become exactly 0); the quantizer then puts the survivors on their grid.
    The params equal ``fake_quant(params)`` after every update.
  - ``pruning.wrap(wrap(adam, spec))``: the params are quantized, then pruning scores the
    quantized params and zeroes the pruned ones. The latent weights of pruned entries keep
    training but, being zero in the params, no longer set the grid. At an update where the mask
    changes, the params are on the grid of the weights before pruning; if pruning removed an
    entry that set the range (under an asymmetric spec, the most negative entry of a channel
    whose negative entries are all small; under a non-magnitude score, any entry),
    ``fake_quant(params)`` finds a narrower grid until the next update.

  Non-finite gradients are not filtered: a NaN or Inf gradient reaches the latent weights,
  their grid and so the params. Wrap the whole stack to skip such updates:
  ``optax.apply_if_finite(quantization.wrap(...), max_consecutive_errors=20)``.

  Args:
    inner: the optimizer for the latent weights.
    spec: a `Spec` (its ``grid`` picks the grid method), or a bit width for a symmetric
      per-tensor min/max one.
    where: predicate on the '/'-joined parameter path (default: Dense/Conv kernels).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params``.

  Raises:
    ValueError: if ``spec.grid`` is not registered; at ``init``, if ``where`` selects nothing,
      selects a non-floating leaf, or ``spec.axis`` or the grid method does not fit a
      selected leaf.
  """
  spec = quantizers.as_spec(spec)
  grids.get_grid(spec.grid)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    flags = select_leaves(params, spec, where, "quantization.wrap")
    latent = jax.tree.map(lambda x, on: x if on else optax.MaskedNode(), params, flags)
    return QuantizationState(inner.init(params), latent, jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("quantization.wrap: update needs params, got None")
    flags = selection.select(params, where)
    latent = jax.tree.map(lambda p, lat, on: lat if on else p, params, state.latent, flags,
                          is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    inner_updates, inner_state = inner.update(updates, state.inner_state, latent, **extra_args)

    new_latent = jax.tree.map(
        lambda lat, u, on: (lat + u).astype(lat.dtype) if on else optax.MaskedNode(),
        latent, inner_updates, flags)
    new_updates = jax.tree.map(
        lambda p, u, lat, on: exact_delta(
            quantizers.quantize(lat, spec, grid=grid_of_survivors(lat, p, spec)), p
        ).astype(u.dtype) if on else u, params, inner_updates, new_latent, flags)
    count = optax.safe_increment(state.count)
    return new_updates, QuantizationState(inner_state, new_latent, count)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
