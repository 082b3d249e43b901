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


def _leaf_specs(params: Any, spec: "quantizers.Spec | quantizers.PerPath",
                where: Where | None) -> Any:
  """A tree like ``params`` with each selected leaf's `Spec` and None at the others."""
  flags = selection.select(params, where)
  return jax.tree_util.tree_map_with_path(
      lambda path, _, on: quantizers.spec_at(spec, selection.path_str(path)) if on else None,
      params, flags)


def leaf_specs(params: Any, spec: "quantizers.Spec | int | quantizers.PerPath",
               where: Where | None, name: str) -> Any:
  """Each leaf's `Spec`, or None where it stays float; raises ``ValueError`` naming ``name``.

  A leaf is quantized when ``where`` selects it and the spec gives it one (a `Spec` or bit
  width gives every selected leaf the same; a per-path spec gives ``spec(path)``, None
  leaving that leaf float). There must be at least one, and every one floating, with its
  ``axis`` in range for its rank, its ``grid`` registered and that grid's method accepting
  the leaf (traced abstractly: `pow2` refuses asymmetric specs).

  Args:
    params: a parameter pytree.
    spec: a `Spec`, a bit width, or a per-path spec (`quantizers.PerPath`).
    where: predicate on the '/'-joined path (default: Dense/Conv kernels).
    name: the caller, for messages.

  Returns:
    A tree with the structure of ``params`` holding a `Spec` or None at each leaf (pass it
    after ``params`` to ``jax.tree.map``).
  """
  spec = quantizers.check_spec(spec)
  selection.check_selects_something(params, where, name)
  specs = _leaf_specs(params, spec, where)
  flat = jax.tree_util.tree_leaves_with_path(params)
  on = jax.tree.structure(params).flatten_up_to(specs)
  if all(s is None for s in on):
    raise ValueError(f"{name}: the per-path spec gives None (float) to every leaf `where` "
                     f"selects ({', '.join(selection.selected_paths(params, where)[:8])}); "
                     f"it must give at least one a Spec or bit width")
  selection.check_floating(params, jax.tree.map(lambda s: s is not None, specs,
                                                is_leaf=lambda s: s is None), name)
  for (path, x), s in zip(flat, on):
    if s is not None:
      grids.get_grid(s.grid)
      s.check(jnp.ndim(x), selection.path_str(path))
      jax.eval_shape(lambda a, s=s: quantizers.grid_of(a, s), x)
  return specs


def select_leaves(params: Any, spec: "quantizers.Spec | int | quantizers.PerPath",
                  where: Where | None, name: str) -> Any:
  """Selects leaves for quantization, or raises ``ValueError`` naming ``name``.

  The checks of `leaf_specs` (non-empty selection, floating leaves, specs that fit them).

  Returns:
    A bool pytree like `compressjax.selection.select`'s: True where a leaf is quantized.
  """
  specs = leaf_specs(params, spec, where, name)
  return jax.tree.map(lambda s: s is not None, specs, is_leaf=lambda s: s is None)


def quantize_tree(params: Any, spec: "quantizers.Spec | int | quantizers.PerPath",
                  where: Where | None = None) -> Any:
  """Puts the leaves ``where`` selects on their grid (`quantize`); others pass through.

  The same as ``ptq(params, spec)``: a QAT starting point already on the grid. With a
  per-path spec each leaf goes to the grid of its own spec (None: left float).
  """
  specs = leaf_specs(params, spec, where, "quantize_tree")
  return jax.tree.map(lambda x, s: x if s is None else quantizers.quantize(x, s), params, specs)


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
  float32 ``u`` are spaced wider than ``new``'s ulp and may miss it by up to half an ulp of
  ``u`` whatever ``u`` is (2 ulps of ``new`` seen when ``|u| ~ 2.5 |new|``); one compensation
  step (``u + (new - (old + u))``) removes some of the remaining misses.
  """
  u = new - old
  return u + (new - (old + u))


def wrap(inner: optax.GradientTransformation,
         spec: "quantizers.Spec | int | quantizers.PerPath",
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
  land a few ulps off (half an ulp of the update at most), since float32 ``p + u`` cannot
  always reach it (`exact_delta`). Zeros are always exact. Before the first update the params are the float initial ones. Put this
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

  Per-layer precision: with a per-path spec (``path -> Spec | int | None``, e.g. ``{path:
  spec}.get`` or `compressjax.allocation.Plan.spec`) each selected leaf keeps to the grid of
  its own spec, and a leaf given None is left float (its updates pass through, as for leaves
  ``where`` does not select); ``export`` with the same per-path spec stores the params as
  they are.

  Args:
    inner: the optimizer for the latent weights.
    spec: a `Spec` (its ``grid`` picks the grid method), a bit width for a symmetric
      per-tensor min/max one, or a per-path spec (`quantizers.PerPath`).
    where: predicate on the '/'-joined parameter path (default: Dense/Conv kernels).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params``.

  Raises:
    ValueError: if ``spec`` is not a Spec, bit width or function, or ``spec.grid`` is not
      registered; at ``init``, if ``where`` selects nothing, a per-path spec gives every
      selected leaf None, a quantized leaf is not floating, or its spec's ``axis`` or grid
      method does not fit it.
  """
  spec = quantizers.check_spec(spec)
  if not quantizers.is_per_path(spec):
    grids.get_grid(spec.grid)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    specs = leaf_specs(params, spec, where, "quantization.wrap")
    latent = jax.tree.map(lambda x, s: optax.MaskedNode() if s is None else x, params, specs)
    return QuantizationState(inner.init(params), latent, jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("quantization.wrap: update needs params, got None")
    specs = _leaf_specs(params, spec, where)
    latent = jax.tree.map(lambda p, lat, s: p if s is None else lat, params, state.latent, specs,
                          is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    inner_updates, inner_state = inner.update(updates, state.inner_state, latent, **extra_args)

    new_latent = jax.tree.map(
        lambda lat, u, s: optax.MaskedNode() if s is None else (lat + u).astype(lat.dtype),
        latent, inner_updates, specs)
    new_updates = jax.tree.map(
        lambda p, u, lat, s: u if s is None else exact_delta(
            quantizers.quantize(lat, s, grid=grid_of_survivors(lat, p, s)), p
        ).astype(u.dtype), params, inner_updates, new_latent, specs)
    count = optax.safe_increment(state.count)
    return new_updates, QuantizationState(inner_state, new_latent, count)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
