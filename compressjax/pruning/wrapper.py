"""Pruning as an optax wrapper: masks live in the optimizer state.

``wrap(inner, ...)`` runs ``inner`` on the current parameters, recomputes the masks
at the updates where the schedule fires (inside ``lax.cond``, so the ranking sort
runs on prune steps only) and returns ``jnp.where(mask, u, -p)``: after
``optax.apply_updates`` every pruned weight is exactly 0, whatever ``inner`` does
(momentum, weight decay). Masks only shrink: a pruned weight stays at 0.

A later stage keeps an earlier stage's pruning exactly by starting from its masks:
``wrap(inner, ..., initial_masks=masks(earlier_state))``. Recomputed masks are
intersected with the current ones, so a schedule can prune further but never
revive a weight, whatever the score ranks (re-deriving masks from the weights
instead keeps the set only when the score ranks the zeros lowest).

Order when nesting with other wrappers: the outermost wrapper has the last word on
the parameters. ``pruning.wrap(quantization.wrap(adamw))`` lands on the grid and
then zeroes pruned weights (0 must be on the grid for both to hold); put nothing
that rewrites updates after ``pruning.wrap`` in an ``optax.chain``.
"""

from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from compressjax import selection
from compressjax.pruning import schedules as schedules_lib
from compressjax.pruning import scores as scores_lib
from compressjax.pruning import structures

Sparsity = float | chex.Array | Callable[[str], float] | None
SCOPES = ("layer", "global")


class PruningState(NamedTuple):
  """State of `wrap`.

  Attributes:
    inner_state: the wrapped optimizer's state.
    count: int32, updates applied so far.
    masks: bool keep masks with the structure of the params: pruned kernels (and,
      for neuron/channel/head, the biases of their units), ``optax.MaskedNode()``
      at untouched leaves.
    movement: accumulated movement scores of the scored kernels (score
      "movement"), else ``()``.
    rewind: weights recorded at the schedule's ``rewind_step``, else ``()``.
    rng: uint32 raw key data for the "random" score.
  """
  inner_state: optax.OptState
  count: chex.Array
  masks: Any
  movement: Any
  rewind: Any
  rng: chex.Array


class _Plan(NamedTuple):
  """Static facts about a params tree: which leaves are scored, their units, groups."""
  treedef: Any
  paths: list[str]
  scored: list[int]            # leaf indices of the scored kernels, ascending
  companions: dict[int, int]   # bias leaf index -> position of its kernel in ``scored``
  layouts: list[structures.Layout]
  groups: list[list[int]]      # positions in ``scored`` that share units

  @property
  def masked(self) -> list[int]:
    """Leaf indices that carry a mask, ascending (the order of ``masks`` leaves)."""
    return sorted(self.scored + list(self.companions))

  def tree(self, values: dict[int, Any]) -> Any:
    """A tree with ``values[i]`` at leaf ``i`` and ``optax.MaskedNode()`` elsewhere."""
    return jax.tree.unflatten(self.treedef, [values.get(i, optax.MaskedNode())
                                             for i in range(len(self.paths))])


def _make_plan(params: optax.Params, pick: Callable[[str, Any], bool], kind: str,
               head_axis_of: Callable[[str], int | None]) -> _Plan:
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [selection.path_str(p) for p, _ in flat]
  shapes = [tuple(getattr(x, "shape", ())) for _, x in flat]
  scored = [i for i, (p, (_, x)) in enumerate(zip(paths, flat)) if pick(p, x)]
  layouts = [structures.layout(paths[i], shapes[i], head_axis_of(paths[i])) for i in scored]
  companions = {}
  if kind in ("neuron", "channel", "head"):
    index = {p: i for i, p in enumerate(paths)}
    for j, i in enumerate(scored):
      b = index.get(paths[i].rsplit("/", 1)[0] + "/bias")
      if b is not None and b not in scored and structures.bias_follows_units(
          shapes[i], layouts[j], shapes[b]):
        companions[b] = j
  groups = structures.group_units(kind, [paths[i] for i in scored], layouts,
                                  [shapes[i] for i in scored])
  return _Plan(treedef, paths, scored, companions, layouts, groups)


def _check_plan(pl: _Plan, params: optax.Params, where, struct: structures.Structure,
                structure: str) -> None:
  """Raises ValueError for a selection the structure cannot prune (at init)."""
  if where is not None:
    selection.check_selects_something(params, where, "pruning.wrap")
  if not pl.scored:
    what = "attention kernels with a head axis" if struct.kind == "head" else "kernels"
    raise ValueError(f"where (default) must select some {what}; the tree has paths "
                     f"{pl.paths[:8]}{' ...' if len(pl.paths) > 8 else ''}")
  shapes = [x.shape for x in jax.tree.leaves(params)]
  for i, lay in zip(pl.scored, pl.layouts):
    if struct.kind == "head" and lay.head_axis is None:
      raise ValueError(f"structure='head' needs a head axis; {pl.paths[i]!r} {shapes[i]} has "
                       "none (pass head_axis= or a where= selecting attention kernels)")
    if struct.kind == "n:m" and shapes[i][lay.nm_axis] % struct.m:
      raise ValueError(f"structure {structure!r}: input axis {lay.nm_axis} of "
                       f"{pl.paths[i]!r} {shapes[i]} must be a multiple of {struct.m}")


def _is_number(x) -> bool:
  # Tracers (a value injected by optax.inject_hyperparams) are checked at init only.
  return isinstance(x, (int, float, np.generic, np.ndarray)) or (
      isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer))


def _check_sparsity(field: str, value) -> None:
  if not 0.0 <= float(value) < 1.0:
    raise ValueError(f"{field} must be in [0, 1), got {value!r}")


def _final_sparsities(pl: _Plan, sparsity: Sparsity, kind: str) -> list:
  """The final sparsity of each unit group (one value per group)."""
  if kind == "n:m" or not callable(sparsity):
    return [sparsity] * len(pl.groups)
  out = []
  for members in pl.groups:
    values = set()
    for j in members:
      path = pl.paths[pl.scored[j]]
      _check_sparsity(f"sparsity({path!r})", sparsity(path))
      values.add(float(sparsity(path)))
    if len(values) > 1:
      raise ValueError(f"sparsity must agree within a head group, got {sorted(values)}")
    out.append(values.pop())
  return out


def _is_mask_leaf(x) -> bool:
  return x is None or isinstance(x, optax.MaskedNode)


def _check_initial_dtypes(initial_masks: Any) -> None:
  """Raises ValueError unless every leaf of ``initial_masks`` is None, MaskedNode or bool."""
  flat = jax.tree_util.tree_flatten_with_path(initial_masks, is_leaf=_is_mask_leaf)[0]
  for path, m in flat:
    if _is_mask_leaf(m):
      continue
    dtype = getattr(m, "dtype", None)
    if dtype is None or np.dtype(dtype) != np.bool_:
      raise ValueError(f"initial_masks[{selection.path_str(path)!r}] must be a bool array "
                       f"(True = kept), None or optax.MaskedNode(), got "
                       f"{type(m).__name__} of dtype {dtype}")


def _start_masks(pl: _Plan, params: optax.Params, initial_masks: Any) -> Any:
  """The masks a state starts from: ``initial_masks`` checked against ``params``.

  A scored kernel without a mask starts all kept; a companion bias without one gets
  the mask of its kernel's units (`structures.bias_mask`).
  """
  leaves = jax.tree.leaves(params)
  index = {p: i for i, p in enumerate(pl.paths)}
  given = {}
  for path, m in jax.tree_util.tree_flatten_with_path(initial_masks, is_leaf=_is_mask_leaf)[0]:
    path = selection.path_str(path)
    if path not in index:
      raise ValueError(f"initial_masks has a mask at {path!r}, which is not a parameter path; "
                       f"params have {pl.paths[:8]}{' ...' if len(pl.paths) > 8 else ''}")
    if _is_mask_leaf(m):
      continue
    i = index[path]
    if i not in pl.masked:
      raise ValueError(f"initial_masks has a mask at {path!r}, which this wrapper does not "
                       f"prune; it prunes {[pl.paths[j] for j in pl.masked]}")
    if tuple(np.shape(m)) != tuple(leaves[i].shape):
      raise ValueError(f"initial_masks[{path!r}] must have the shape of the parameter "
                       f"{tuple(leaves[i].shape)}, got {tuple(np.shape(m))}")
    given[i] = jnp.array(m, dtype=bool)  # a copy: never an alias of the caller's array
  out = {}
  for i in pl.scored:
    out[i] = given.get(i, jnp.ones(leaves[i].shape, bool))
  for b, j in pl.companions.items():
    out[b] = given[b] if b in given else structures.bias_mask(
        out[pl.scored[j]], pl.layouts[j], leaves[b].shape)
  return pl.tree(out)


def wrap(inner: optax.GradientTransformation,
         sparsity: Sparsity,
         score: str | scores_lib.ScoreFn = "magnitude",
         structure: str = "unstructured",
         scope: str = "layer",
         schedule: schedules_lib.Schedule | None = None,
         where: selection.Where | None = None,
         head_axis: int | Callable[[str], int | None] | None = None,
         seed: int = 0,
         initial_masks: Any = None) -> optax.GradientTransformationExtraArgs:
  """Wraps an optimizer so that selected weights are pruned by masks in its state.

  Args:
    inner: any optax transformation (the optimizer being wrapped).
    sparsity: final fraction of units pruned, in [0, 1): a float, or a function
      ``path -> float`` for per-tensor targets (scope "layer" only). For ``"N:M"``
      pass ``None`` (or ``1 - N/M``). Under ``optax.inject_hyperparams`` a float
      is injected; a function must be listed in ``static_args``.
    score: a key of `scores.SCORES` ("magnitude", "random", "saliency",
      "movement") or a function ``score(params, grads, state)``.
    structure: "unstructured", "N:M" (e.g. "2:4"), "neuron", "channel" or "head"
      (see `structures`). Neuron/channel/head pruning also zeroes the bias entries
      of dead units (the sibling ``bias`` leaf), so whole units go; pass a ``where``
      that leaves out the output layer (whose units are the model's outputs).
    scope: "layer" (each tensor, or head group, to its target) or "global" (one
      threshold over all scored units; "saliency"/"movement" scores are first
      divided by each tensor's mean absolute score).
    schedule: a `schedules.Schedule`; default ``one_shot(0)``. With `iterative`,
      the selected kernels are rewound (the inner optimizer's state is not reset).
    where: predicate on the parameter path; default Dense/Conv kernels, or, for
      structure "head", the attention kernels whose head axis is detected. Under
      ``optax.inject_hyperparams`` list it in ``static_args`` (it is a callable).
    head_axis: head axis for "head" (an int, or ``path -> int``); default detects
      the Flax attention layout. List it in ``static_args`` under inject_hyperparams.
    seed: seed of the "random" score.
    initial_masks: keep masks (True = kept) to start from, e.g. `masks` of an
      earlier stage's state: a pytree like the params with a bool array of the
      parameter's shape at pruned leaves and None (or ``optax.MaskedNode()``) at
      the others; a selected kernel given None starts all kept, and a bias of
      neuron/channel/head units given None follows its kernel. They hold from the
      first update. A prune event of ``schedule`` ranks the pruned units lowest and
      intersects its masks with the current ones, so with the same sparsity the set
      is kept exactly and with a higher one it only grows. Only ``init`` reads them:
      wrappers that differ only in ``initial_masks`` have the same ``update``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a `PruningState`; its
    ``update`` needs ``params``.

  Raises:
    ValueError: for a bad argument, naming it, its value and what is allowed; at
      ``init``, for a ``where`` that selects nothing or selects a non-floating leaf,
      and for ``initial_masks`` at a path, or of a shape, that the params lack or
      that this wrapper does not prune.

  Non-finite gradients are not filtered: a NaN or Inf gradient reaches the kept
  weights (pruned ones stay exactly 0) and, at a prune step, the scores and masks.
  Wrap the whole stack to skip such updates:
  ``optax.apply_if_finite(pruning.wrap(...), max_consecutive_errors=20)``.
  """
  struct = structures.parse(structure)
  score_fn = scores_lib.get_score(score)
  if initial_masks is not None:
    _check_initial_dtypes(initial_masks)
  if scope not in SCOPES:
    raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
  schedule = schedules_lib.one_shot(0) if schedule is None else schedule
  if not isinstance(schedule, schedules_lib.Schedule):
    raise ValueError(f"schedule must be a pruning Schedule (one_shot, polynomial, iterative), "
                     f"got {schedule!r}")
  if struct.kind == "n:m":
    if scope == "global":
      raise ValueError(f"scope must be 'layer' for structure {structure!r}, got 'global'")
    if sparsity is not None and _is_number(sparsity) and abs(
        float(sparsity) - (1 - struct.n / struct.m)) > 1e-6:
      raise ValueError(f"sparsity must be None or {1 - struct.n / struct.m} for structure "
                       f"{structure!r}, got {sparsity!r}")
  elif sparsity is None:
    raise ValueError(f"sparsity must be a float in [0, 1) or a function path -> float for "
                     f"structure {structure!r}, got None")
  elif callable(sparsity):
    if scope == "global":
      raise ValueError("sparsity must be a single float with scope='global', got a function")
  elif _is_number(sparsity):
    _check_sparsity("sparsity", sparsity)
  normalize = scope == "global" and score in scores_lib.GLOBAL_NORMALIZED
  use_movement = score_fn is scores_lib.movement
  rewind_step = schedule.rewind_step

  def head_axis_of(path):
    return head_axis(path) if callable(head_axis) else head_axis

  def pick(path, x):
    if where is not None:
      return bool(where(path))
    if not selection.default_where(path) or getattr(x, "ndim", 0) < 2:
      return False
    if struct.kind == "head":
      return structures.layout(path, x.shape, head_axis_of(path)).head_axis is not None
    return True

  def init_fn(params):
    pl = _make_plan(params, pick, struct.kind, head_axis_of)
    _check_plan(pl, params, where, struct, structure)
    scored = set(pl.scored)
    selection.check_floating(params, jax.tree.unflatten(
        pl.treedef, [i in scored for i in range(len(pl.paths))]), "pruning.wrap")
    _final_sparsities(pl, sparsity, struct.kind)
    leaves = jax.tree.leaves(params)
    # Fresh buffers (never aliases of params), so callers may donate params.
    full = lambda idx, fill, dtype=None: pl.tree(
        {i: jnp.full(leaves[i].shape, fill, dtype or leaves[i].dtype) for i in idx})
    start = (full(pl.masked, True, bool) if initial_masks is None
             else _start_masks(pl, params, initial_masks))
    return PruningState(
        inner_state=inner.init(params),
        count=jnp.zeros([], jnp.int32),
        masks=start,
        movement=full(pl.scored, 0, jnp.float32) if use_movement else (),
        rewind=full(pl.scored, 0) if rewind_step is not None else (),
        rng=jax.random.key_data(jax.random.key(seed)))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("params must be passed to the update of pruning.wrap, got None")
    pl = _make_plan(params, pick, struct.kind, head_axis_of)
    inner_updates, inner_state = optax.with_extra_args_support(inner).update(
        updates, state.inner_state, params, **extra_args)
    p_leaves = pl.treedef.flatten_up_to(params)
    sel_p = pl.tree({i: p_leaves[i] for i in pl.scored})
    sel_g = pl.tree(dict(zip(pl.scored, (pl.treedef.flatten_up_to(updates)[i]
                                         for i in pl.scored))))
    count = state.count
    movement, rewind = state.movement, state.rewind
    if use_movement:
      movement = scores_lib.accumulate_movement(movement, sel_p, sel_g)
    if rewind_step is not None:
      rewind = jax.lax.cond(count == rewind_step, lambda: sel_p, lambda: state.rewind)
    fire = schedule.fires(count)
    finals = _final_sparsities(pl, sparsity, struct.kind)

    def recompute():
      s = score_fn(sel_p, sel_g, state._replace(movement=movement, rewind=rewind))
      if normalize:
        s = scores_lib.normalize_per_tensor(s)
      old = dict(zip(pl.masked, jax.tree.leaves(state.masks)))
      targets = [] if struct.kind == "n:m" else [schedule.target(count, f) for f in finals]
      kernel = structures.masks_from_scores(jax.tree.leaves(s), [old[i] for i in pl.scored],
                                            struct, pl.layouts, pl.groups, targets, scope)
      new = dict(zip(pl.scored, kernel))
      for b, j in pl.companions.items():
        new[b] = structures.bias_mask(kernel[j], pl.layouts[j], p_leaves[b].shape)
      # Masks only shrink, even when the target count is below the pruned count
      # (initial masks, a lower injected sparsity) or the structures differ.
      return pl.tree({i: new[i] & old[i] for i in pl.masked})

    # Only prune steps pay for scoring and ranking.
    masks = jax.lax.cond(fire, recompute, lambda: state.masks)
    mask_of = dict(zip(pl.masked, jax.tree.leaves(masks)))
    rewind_of = dict(zip(pl.scored, jax.tree.leaves(rewind))) if rewind_step is not None else {}
    out = pl.treedef.flatten_up_to(inner_updates)
    for i, m in mask_of.items():
      u, p = out[i], p_leaves[i]
      if i in rewind_of:
        u = jnp.where(fire, rewind_of[i] - p, u)
      out[i] = jnp.where(m, u, -p).astype(out[i].dtype)
    new_state = PruningState(inner_state, optax.safe_increment(count), masks, movement,
                             rewind, state.rng)
    return jax.tree.unflatten(pl.treedef, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def find_state(state: Any) -> PruningState:
  """Finds the (first) `PruningState` inside an optimizer state (chain, MultiSteps, ...)."""
  found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, PruningState))
           if isinstance(s, PruningState)]
  if not found:
    raise ValueError("state must contain a PruningState (from pruning.wrap), found none")
  return found[0]


def masks(state: Any) -> Any:
  """The keep masks (True = kept) of a pruning state, found anywhere inside ``state``.

  Args:
    state: a `PruningState`, or any optimizer state that contains one.

  Returns:
    Bool masks with the structure of the params; ``optax.MaskedNode()`` at leaves
    that are not pruned.
  """
  return find_state(state).masks


def sparsity(params: optax.Params, where: selection.Where | None = None) -> dict[str, Any]:
  """Fraction of exact zeros, overall and per tensor.

  Args:
    params: a parameter pytree.
    where: which leaves to count; default Dense/Conv kernels.

  Returns:
    ``{"overall": fraction over all counted weights, path: fraction, ...}`` as
    float32 scalars (jit-friendly; call ``float`` on them on the host).
  """
  flags = jax.tree.leaves(selection.select(params, where))
  flat = jax.tree_util.tree_leaves_with_path(params)
  out, zeros, total = {}, 0, 0
  for (path, x), on in zip(flat, flags):
    if on:
      z = jnp.sum(x == 0)
      out[selection.path_str(path)] = z.astype(jnp.float32) / x.size
      zeros, total = zeros + z, total + x.size
  return {"overall": jnp.asarray(zeros, jnp.float32) / max(total, 1), **out}
