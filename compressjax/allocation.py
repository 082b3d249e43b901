"""Per-layer precision and sparsity under a byte budget: costs, sensitivities, a knapsack.

Each selected layer gets one `Choice` (bits or float, granularity, sparsity) from a candidate
set. `layer_costs` measures every layer's bytes under every choice with the real export
(`quantization.nbytes`); `sensitivity` measures the loss increase of every layer under every
choice; `allocate` picks one choice per layer to minimize the summed loss increase with the
export within a byte budget; `apply` compresses the params to the plan (post-training), and
``plan.spec`` / ``plan.sparsity`` are the per-path arguments of `quantization.wrap` and
`pruning.wrap`, for fine-tuning the allocated model (QAT, KD). The leaves without a choice
(biases, norms) stay float, or all take one spec (``rest``), their bytes the budget's
fixed part.

Sensitivity. The default is measured: the loss increase of each layer under each choice with
every other layer left float (``layers x choices`` forward passes). HAWQ-V2's Hutchinson
estimate of the Hessian trace (Dong et al. 2020, "HAWQ-V2: Hessian Aware trace-Weighted
Quantization") is offered too (`hutchinson_sensitivity`), but it predicts the increase as
``Tr(H)/n * ||dW||^2 / 2``, a second-order Taylor term about a minimum: it ignores the
gradient term, and pruning three quarters of a layer is no small perturbation. Measuring
costs a forward pass per (layer, choice), seconds for the models here, and includes exactly
the perturbation the export makes, pruning included. Summing per-layer increases assumes
they add, as HAWQ's does.

Knapsack. `allocate` solves the multiple-choice knapsack exactly by dynamic programming over
bytes in buckets of ``resolution`` bytes (default: the smallest that keeps at most 65536
buckets; 1 byte, i.e. exact, for budgets that small). A layer's bytes above its cheapest
choice are rounded up to whole buckets and the capacity down, so the plan never exceeds the
budget, and its loss is at most that of the best plan under ``budget - layers * resolution``
bytes. Greedy by loss per byte was not chosen: on the non-convex cost curves of mixed bit
widths and sparsities it can miss the optimum by far and leave budget unused, while the DP
costs ``layers x choices x buckets`` (milliseconds for tens of layers).
"""

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from compressjax import quantization
from compressjax import selection
from compressjax.pruning import structures

DEFAULT_BITS = (2, 3, 4, 6, 8)
DEFAULT_SPARSITIES = (0.0, 0.25, 0.5, 0.75)
MAX_BUCKETS = 1 << 16


class Choice(NamedTuple):
  """One layer's setting.

  Attributes:
    bits: bits per weight (2..16, a symmetric grid), or None to keep the layer float.
    granularity: ``"channel"`` (a scale per output channel, axis -1) or ``"tensor"``;
      ignored when ``bits`` is None.
    sparsity: fraction of the layer's weights zeroed by magnitude, in [0, 1).
    grid: how the grid's range is chosen (a name in `quantization.GRIDS`): ``"minmax"``
      (the range of the weights) or a clipping method such as ``"mse"`` (the range of least
      squared error, which at 2-3 bits keeps far more weights off zero); same bytes.
  """
  bits: int | None
  granularity: str = "channel"
  sparsity: float = 0.0
  grid: str = "minmax"

  @property
  def spec(self) -> quantization.Spec | None:
    """The quantizer of this choice, or None for float."""
    if self.bits is None:
      return None
    return quantization.Spec(self.bits, True, self.granularity, -1, self.grid)


def check_choices(choices: Sequence[Choice]) -> tuple[Choice, ...]:
  """Returns ``choices`` as a tuple, or raises ``ValueError`` naming the bad field."""
  choices = tuple(choices)
  if not choices:
    raise ValueError("choices must hold at least one Choice, got none")
  for c in choices:
    if not isinstance(c, Choice):
      raise ValueError(f"choices must be allocation.Choice values, got {c!r}")
    if c.granularity not in quantization.GRANULARITIES:
      raise ValueError(f"granularity must be one of {quantization.GRANULARITIES}, got "
                       f"{c.granularity!r} in {c}")
    if c.grid not in quantization.GRIDS:
      raise ValueError(f"grid must be one of {tuple(quantization.GRIDS)}, got {c.grid!r} in {c}")
    if c.bits is not None and (isinstance(c.bits, bool) or not isinstance(c.bits, int)
                               or not 2 <= c.bits <= 16):
      raise ValueError(f"bits must be None (float) or an int in [2, 16], got {c.bits!r} in {c}")
    if isinstance(c.sparsity, bool) or not isinstance(c.sparsity, (int, float)) or not (
        0.0 <= c.sparsity < 1.0):
      raise ValueError(f"sparsity must be a float in [0, 1), got {c.sparsity!r} in {c}")
  if len(set(choices)) != len(choices):
    raise ValueError(f"choices must be distinct, got {list(choices)}")
  return choices


def candidates(bits: Sequence[int] = DEFAULT_BITS,
               sparsities: Sequence[float] = DEFAULT_SPARSITIES,
               granularity: str = "channel", keep_float: bool = True,
               grid: str = "minmax") -> tuple[Choice, ...]:
  """The candidate set ``bits x sparsities`` at one granularity and grid, plus dense float.

  Args:
    bits: bit widths.
    sparsities: magnitude-pruning fractions.
    granularity: ``"channel"`` or ``"tensor"``.
    keep_float: also offer ``Choice(None)`` (the layer stays float and dense).
    grid: the grid method of the quantized choices (`Choice.grid`).

  Returns:
    A tuple of distinct `Choice` values.
  """
  out = [Choice(b, granularity, float(s), grid) for b in bits for s in sparsities]
  if keep_float:
    out.append(Choice(None, granularity, 0.0))
  return check_choices(out)


def kept(x: Any, sparsity: float) -> jax.Array:
  """The keep mask of magnitude pruning: all but the ``round(sparsity * size)`` smallest |x|.

  The same count and tie order (lower index first) as `pruning.wrap`'s magnitude score at
  scope "layer", so a plan's masks are the ones its fine-tuning finds.
  """
  x = jnp.asarray(x)
  return structures.keep_mask(jnp.abs(x).ravel(),
                              structures.num_to_prune(sparsity, x.size)).reshape(x.shape)


def prune(x: Any, sparsity: float) -> jax.Array:
  """``x`` with the entries `kept` drops set to zero."""
  x = jnp.asarray(x)
  return x if sparsity == 0 else jnp.where(kept(x, sparsity), x, jnp.zeros_like(x))


def compress(x: Any, choice: Choice) -> jax.Array:
  """``x`` pruned by magnitude to ``choice.sparsity``, then put on ``choice.spec``'s grid."""
  y = prune(x, choice.sparsity)
  return y if choice.bits is None else quantization.quantize(y, choice.spec)


def leaf_bytes(x: Any, choice: Choice, upper_bound: bool = False) -> int:
  """Exported bytes of ``x`` under ``choice``: `quantization.nbytes` of it exported alone.

  Args:
    x: the float leaf.
    choice: its setting.
    upper_bound: measure instead the most bytes any weights with these pruned entries can
      take: every kept entry non-zero (it exports ones where `kept`). Fine-tuning may revive
      weights that `compress` rounds to zero; it can never exceed this.

  Returns:
    The bytes, header included.
  """
  if upper_bound:
    x = jnp.where(kept(x, choice.sparsity), 1.0, 0.0).astype(jnp.result_type(x))
    choice = choice._replace(sparsity=0.0)
  y = {"w": compress(x, choice)}
  if choice.bits is None:
    return quantization.nbytes(quantization.export(y, None))
  return quantization.nbytes(quantization.export(y, choice.spec, where=lambda _: True))


class Costs(NamedTuple):
  """Exported bytes of every selected layer under every choice.

  Attributes:
    paths: the selected leaves' paths, in tree order.
    choices: the candidate choices.
    bytes: int64 ``[len(paths), len(choices)]``, each layer's exported bytes per choice.
    fixed: bytes of the leaves not selected, stored as `quantization.export` stores them
      (float, or on ``rest``'s grid).
    rest: the spec of the unselected float leaves (for instance 8-bit per tensor for the
      biases and LayerNorm parameters), or None to keep them float.
  """
  paths: tuple[str, ...]
  choices: tuple[Choice, ...]
  bytes: np.ndarray
  fixed: int
  rest: quantization.Spec | None = None


def _selected(params: Any, where: selection.Where | None, name: str):
  selection.check_selects_something(params, where, name)
  flags = selection.select(params, where)
  selection.check_floating(params, flags, name)
  flat = jax.tree_util.tree_leaves_with_path(params)
  return [(selection.path_str(p), x, on) for (p, x), on in zip(flat, jax.tree.leaves(flags))]


def layer_costs(params: Any, choices: Sequence[Choice], where: selection.Where | None = None,
                upper_bound: bool = False,
                rest: "quantization.Spec | int | None" = None) -> Costs:
  """Measures each selected layer's exported bytes under each choice.

  Every leaf is packed alone by `quantization.export` (its bytes do not depend on the other
  leaves), so ``fixed + sum of the chosen bytes`` equals ``nbytes`` of the plan's export
  exactly (`export`).

  Args:
    params: a parameter pytree.
    choices: candidate choices (`candidates`).
    where: which leaves get a choice (default: Dense/Conv kernels).
    upper_bound: measure each layer's most bytes with its pruned entries zero and every other
      entry non-zero (`leaf_bytes`): a plan within a budget then stays within it after
      fine-tuning with ``plan.sparsity`` and ``plan.spec`` (its PTQ export may take less);
      ``fixed`` is then the unselected leaves' dense bytes (a zero-initialized bias,
      stored as a sparse tensor, is non-zero after a step).
    rest: quantize every unselected float leaf with this spec (a `quantization.Spec` or a
      bit width) instead of keeping it float; it is carried by the plan (`Plan.rest`).

  Returns:
    The `Costs`.
  """
  choices = check_choices(choices)
  if not isinstance(upper_bound, bool):
    raise ValueError(f"upper_bound must be True or False, got {upper_bound!r}")
  rest = None if rest is None else quantization.as_spec(rest)
  leaves = _selected(params, where, "layer_costs")
  rows, fixed = [], 0
  for _, x, on in leaves:
    if on:
      rows.append([leaf_bytes(x, c, upper_bound) for c in choices])
    else:
      fixed += _rest_bytes(x, rest, upper_bound)
  return Costs(tuple(p for p, _, on in leaves if on), choices,
               np.asarray(rows, np.int64).reshape(-1, len(choices)), fixed, rest)


def _is_float(x: Any) -> bool:
  return np.issubdtype(jnp.result_type(x), np.inexact)


def _rest_bytes(x: Any, rest: quantization.Spec | None, upper_bound: bool) -> int:
  """Exported bytes of an unselected leaf: float, or on ``rest``'s grid if it is float."""
  if upper_bound and _is_float(x):  # every value non-zero (a sparse store is a lower bound)
    x = np.ones(np.shape(x), jnp.result_type(x))
  if rest is None or not _is_float(x):
    return quantization.nbytes(quantization.export({"w": x}, None))
  return quantization.nbytes(quantization.export({"w": x}, rest, where=lambda _: True))


def _replace(params: Any, path: str, value: Any) -> Any:
  return jax.tree_util.tree_map_with_path(
      lambda p, x: value if selection.path_str(p) == path else x, params)


def sensitivity(loss_fn: Callable[[Any], Any], params: Any, choices: Sequence[Choice],
                where: selection.Where | None = None) -> np.ndarray:
  """The measured loss increase of each selected layer under each choice, others float.

  Args:
    loss_fn: ``params -> scalar`` loss (close over a fixed batch; it is jitted here).
    params: the float params the plan starts from.
    choices: candidate choices, as given to `layer_costs`.
    where: which leaves get a choice (as given to `layer_costs`).

  Returns:
    float64 ``[layers, choices]``: ``loss(params with one layer compressed) - loss(params)``.
  """
  choices = check_choices(choices)
  loss = jax.jit(loss_fn)
  base = float(loss(params))
  out = []
  for path, x, on in _selected(params, where, "sensitivity"):
    if on:
      out.append([float(loss(_replace(params, path, compress(x, c)))) - base for c in choices])
  return np.asarray(out, np.float64).reshape(-1, len(choices))


def hessian_traces(loss_fn: Callable[[Any], Any], params: Any,
                   where: selection.Where | None = None, samples: int = 32,
                   seed: int = 0) -> dict[str, float]:
  """Hutchinson estimates of each selected layer's Hessian trace (HAWQ-V2).

  ``Tr(H_l) = E[v_l^T (H v)_l]`` over Rademacher ``v`` on all selected layers at once (the
  cross-layer terms have mean zero), one Hessian-vector product per sample (Hutchinson 1990;
  Dong et al. 2020). Exact for a diagonal Hessian.

  Args:
    loss_fn: ``params -> scalar`` loss, twice differentiable (close over a fixed batch).
    params: the float params.
    where: which leaves to estimate (as given to `layer_costs`).
    samples: Rademacher vectors averaged.
    seed: their seed.

  Returns:
    ``{path: estimated trace}``.
  """
  if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
    raise ValueError(f"samples must be a positive int, got {samples!r}")
  _selected(params, where, "hessian_traces")
  flags = selection.select(params, where)
  grad = jax.grad(loss_fn)

  @jax.jit
  def one(p, key):
    keys = jax.tree.unflatten(jax.tree.structure(p),
                              list(jax.random.split(key, len(jax.tree.leaves(p)))))
    v = jax.tree.map(lambda x, k, on: jax.random.rademacher(k, x.shape, x.dtype) if on
                     else jnp.zeros_like(x), p, keys, flags)
    hv = jax.jvp(grad, (p,), (v,))[1]
    return jax.tree.map(lambda a, b: jnp.sum(a * b), v, hv)

  keys = jax.random.split(jax.random.key(seed), samples)
  sums = [jax.tree.leaves(one(params, k)) for k in keys]
  paths = [selection.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  on = jax.tree.leaves(flags)
  return {p: float(np.mean([s[i] for s in sums])) for i, p in enumerate(paths) if on[i]}


def hutchinson_sensitivity(traces: dict[str, float], params: Any, costs: Costs) -> np.ndarray:
  """HAWQ-V2's predicted loss increase ``Tr(H_l) / n_l * ||compress(W_l) - W_l||^2 / 2``.

  Args:
    traces: from `hessian_traces`.
    params: the float params.
    costs: from `layer_costs` (for its paths and choices).

  Returns:
    float64 ``[layers, choices]``, a drop-in for `sensitivity`'s result.
  """
  leaves = selection.leaves_by_path(params)
  out = np.zeros(costs.bytes.shape, np.float64)
  for i, path in enumerate(costs.paths):
    x = jnp.asarray(leaves[path], jnp.float32)
    for j, c in enumerate(costs.choices):
      err = float(jnp.sum((compress(x, c) - x) ** 2))
      out[i, j] = 0.5 * traces[path] / x.size * err
  return out


class Plan(NamedTuple):
  """One choice per selected layer, with its predicted bytes and loss increase.

  ``plan.spec`` and ``plan.sparsity`` are the per-path arguments of `quantization.wrap` /
  `quantization.export` and `pruning.wrap`.

  Attributes:
    paths: the layers' paths.
    choices: each layer's `Choice`.
    layer_bytes: each layer's exported bytes.
    layer_loss: each layer's measured (or estimated) loss increase.
    fixed: bytes of the unselected leaves.
    resolution: the knapsack's bucket in bytes (0 for a plan not from `allocate`).
    rest: the spec of every unselected float leaf (`Costs.rest`), None: they stay float.
  """
  paths: tuple[str, ...]
  choices: tuple[Choice, ...]
  layer_bytes: tuple[int, ...]
  layer_loss: tuple[float, ...]
  fixed: int
  resolution: int = 0
  rest: quantization.Spec | None = None

  @property
  def bytes(self) -> int:
    """Predicted ``nbytes`` of the plan's export: ``fixed + sum(layer_bytes)``."""
    return self.fixed + sum(self.layer_bytes)

  @property
  def loss(self) -> float:
    """Predicted loss increase: the sum of the layers'."""
    return float(sum(self.layer_loss))

  def spec(self, path: str) -> quantization.Spec | None:
    """The per-path spec: the layer's `Spec`, None for float layers; other paths: ``rest``."""
    choice = dict(zip(self.paths, self.choices)).get(path, _REST)
    return self.rest if choice is _REST else choice.spec

  @property
  def quantizes(self) -> bool:
    """Whether any leaf is put on a grid (a layer's bits, or ``rest``)."""
    return self.rest is not None or any(c.bits is not None for c in self.choices)

  def sparsity(self, path: str) -> float:
    """The per-path sparsity: the layer's, 0.0 for other paths."""
    choice = dict(zip(self.paths, self.choices)).get(path)
    return 0.0 if choice is None else float(choice.sparsity)

  def selects(self, path: str) -> bool:
    """The ``where`` predicate of the leaves the plan quantizes or prunes: its layers, and
    with ``rest`` every other leaf too (give it float params only)."""
    return self.rest is not None or path in self.paths


_REST = object()


def _plan(costs: Costs, sens: np.ndarray, pick: Sequence[int], resolution: int) -> Plan:
  rows = range(len(costs.paths))
  return Plan(costs.paths, tuple(costs.choices[pick[i]] for i in rows),
              tuple(int(costs.bytes[i, pick[i]]) for i in rows),
              tuple(float(sens[i, pick[i]]) for i in rows), int(costs.fixed), resolution,
              costs.rest)


def _check_sensitivity(costs: Costs, sens: Any) -> np.ndarray:
  sens = np.asarray(sens, np.float64)
  if sens.shape != costs.bytes.shape:
    raise ValueError(f"sensitivity must have the shape of costs.bytes {costs.bytes.shape} "
                     f"(layers x choices), got {sens.shape}")
  if not np.all(np.isfinite(sens)):
    raise ValueError("sensitivity must be finite, got NaN or Inf")
  return sens


def allocate(costs: Costs, sens: Any, budget_bytes: int,
             resolution: int | None = None) -> Plan:
  """The choice per layer of least summed loss increase whose export fits ``budget_bytes``.

  Exact dynamic programming over byte buckets (module doc): the plan's bytes never exceed
  the budget, and its loss is at most that of the best plan within ``budget_bytes - layers *
  resolution``; with ``resolution=1`` it is the exact optimum. Among plans of equal loss the
  fewest buckets win.

  Args:
    costs: from `layer_costs`.
    sens: ``[layers, choices]`` loss increases (`sensitivity` or `hutchinson_sensitivity`).
    budget_bytes: the most bytes the export may take (``nbytes``).
    resolution: bucket size in bytes; default the smallest keeping at most 65536 buckets.

  Returns:
    The `Plan`.

  Raises:
    ValueError: if the budget is below the smallest achievable export (naming it), or for a
      bad argument.
  """
  sens = _check_sensitivity(costs, sens)
  if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, np.integer)):
    raise ValueError(f"budget_bytes must be an int, got {budget_bytes!r}")
  if resolution is not None and (isinstance(resolution, bool) or not isinstance(
      resolution, (int, np.integer)) or resolution < 1):
    raise ValueError(f"resolution must be None or a positive int of bytes, got {resolution!r}")
  b = costs.bytes.astype(np.int64)
  base = b.min(axis=1)
  minimum = int(costs.fixed + base.sum())
  if budget_bytes < minimum:
    raise ValueError(
        f"budget_bytes must be at least {minimum}, the smallest export these choices allow "
        f"(the cheapest choice of every layer, plus {costs.fixed} bytes of unselected "
        f"leaves), got {budget_bytes}")
  extra = b - base[:, None]
  cap = min(int(budget_bytes) - minimum, int(extra.max(axis=1).sum()))
  r = int(resolution) if resolution else max(1, math.ceil(cap / MAX_BUCKETS))
  weight = -(-extra // r)  # rounded up: a plan that fits in buckets fits in bytes
  k_max = cap // r
  layers, n = b.shape
  best = np.zeros(k_max + 1)  # least loss within k buckets, over the layers so far
  picks = np.zeros((layers, k_max + 1), np.int32)
  for i in range(layers):
    cand = np.full((n, k_max + 1), np.inf)
    for j in range(n):
      w = int(weight[i, j])
      if w <= k_max:
        cand[j, w:] = best[:k_max + 1 - w] + sens[i, j]
    picks[i] = np.argmin(cand, axis=0)
    best = cand[picks[i], np.arange(k_max + 1)]
  # The fewest buckets reaching the least loss (up to float rounding of the sums).
  k = int(np.argmax(best <= best[-1] + 1e-12 * max(1.0, abs(best[-1]))))
  pick = [0] * layers
  for i in range(layers - 1, -1, -1):
    pick[i] = int(picks[i, k])
    k -= int(weight[i, pick[i]])
  return _plan(costs, sens, pick, r)


def uniform(costs: Costs, choice: Choice, sens: Any | None = None) -> Plan:
  """The plan giving every layer ``choice`` (a baseline for allocated plans)."""
  if choice not in costs.choices:
    raise ValueError(f"choice must be one of costs.choices {list(costs.choices)}, got {choice}")
  sens = np.zeros(costs.bytes.shape) if sens is None else _check_sensitivity(costs, sens)
  return _plan(costs, sens, [costs.choices.index(choice)] * len(costs.paths), 0)


def apply(params: Any, plan: Plan) -> Any:
  """Prunes and quantizes each of the plan's layers to its choice (post-training), and puts
  the other float leaves on ``plan.rest``'s grid when it is set.

  Raises:
    ValueError: if a plan path is not a leaf of ``params``.
  """
  paths = {selection.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
  missing = [p for p in plan.paths if p not in paths]
  if missing:
    raise ValueError(f"plan paths must be leaves of params; missing {missing[:8]}")
  choice = dict(zip(plan.paths, plan.choices))

  def leaf(p, x):
    path = selection.path_str(p)
    if path in choice:
      return compress(x, choice[path])
    if plan.rest is not None and _is_float(x):
      return quantization.quantize(x, plan.rest)
    return x
  return jax.tree_util.tree_map_with_path(leaf, params)


def export(params: Any, plan: Plan) -> quantization.Packed:
  """`quantization.export` of `apply` ``(params, plan)`` with the plan's per-path spec.

  Its ``nbytes`` is ``plan.bytes`` for the params the costs were measured on (at most that,
  for costs measured with ``upper_bound=True``). Fine-tuned params (on the plan's grids,
  with its pruned entries zero) are exported with ``quantization.export(params, plan.spec,
  where=plan.selects)``.
  """
  applied = apply(params, plan)
  if not plan.quantizes:
    return quantization.export(applied, None)
  return quantization.export(applied, plan.spec, where=plan.selects)


def table(plan: Plan) -> list[dict[str, Any]]:
  """Rows ``{path, bits, granularity, grid, sparsity, bytes, loss}`` per layer, for reports
  (`reporting.markdown_table`); ``bits`` is None and ``granularity`` and ``grid`` "-" for
  float layers."""
  return [{"path": p, "bits": c.bits, "granularity": "-" if c.bits is None else c.granularity,
           "grid": "-" if c.bits is None else c.grid,
           "sparsity": float(c.sparsity), "bytes": b, "loss": s}
          for p, c, b, s in zip(plan.paths, plan.choices, plan.layer_bytes, plan.layer_loss)]
