"""Constraint stages shared by the studies: the prune plan and the stacking of wrappers.

A study's ``prune`` and ``quantize`` stages constrain every stage after them: `compose`
builds a stage's optimizer as the stack of the constraint wrappers of the stages so far
(earliest innermost), and the prune stage's keep masks are carried into the later stages
(`carried_masks`, `masks_from_params`) so that no pruned weight comes back.
"""

from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from compressjax import pruning
from compressjax import quantization
from compressjax import selection


class PrunePlan(NamedTuple):
  """A prune stage's settings (`pruning.wrap`'s arguments; ``schedule``: how it ramps).

  Attributes:
    sparsity: the target sparsity (None: the structure's own, e.g. 2:4).
    score: a registered pruning score.
    structure: a registered pruning structure, or ``"head+neuron"``: whole attention heads
      (of ``attn`` q/k/v/out kernels) and whole MLP hidden units (``mlp/fc1`` kernel
      columns, with their biases) of a transformer, each at ``sparsity``: two pruning
      wrappers, so that ``pruning.materialize`` can remove both.
    scope: ``"layer"`` or ``"global"``.
    schedule: ``"polynomial"`` (Zhu & Gupta, over the stage's first half) or
      ``"one_shot"`` (at its first step).
  """
  sparsity: float | None = 0.5
  score: str = "magnitude"
  structure: str = "unstructured"
  scope: str = "layer"
  schedule: str = "polynomial"


def _check(cond: bool, field: str, value: Any, allowed: str) -> None:
  if not cond:
    raise ValueError(f"{field} must be {allowed}, got {value!r}")


def prune_plan(p: Any) -> PrunePlan:
  """Checks a config's ``prune`` block (errors name ``prune.<field>``); returns its plan."""
  _check(p.schedule in ("polynomial", "one_shot"), "prune.schedule", p.schedule,
         "one of ('polynomial', 'one_shot')")
  plan = PrunePlan(p.sparsity, p.score, p.structure, p.scope, p.schedule)
  # The wrapper validates sparsity, score, structure and scope; build one to ask it.
  try:
    _prune_tx(optax.sgd(0.0), plan, pruning.one_shot(0))
  except ValueError as e:
    raise ValueError(f"prune.{e}") from None
  return plan


# The composite structures: (structure, the kernels it prunes) per pruning wrapper.
COMPOSITE = {"head+neuron": (
    ("head", lambda path: "/attn/" in f"/{path}" and path.endswith("/kernel")),
    ("neuron", lambda path: path.endswith("mlp/fc1/kernel")))}


def _only(masks: Any, pick) -> Any:
  """``masks`` at the paths of one wrapper of a composite (its kernels and their biases)."""
  if masks is None:
    return None
  unit = lambda path: pick(path.rsplit("/", 1)[0] + "/kernel")   # a kernel or its bias
  return jax.tree_util.tree_map_with_path(
      lambda path, m: m if unit(selection.path_str(path)) else None, masks,
      is_leaf=lambda x: x is None or isinstance(x, optax.MaskedNode))


def _prune_tx(inner, p: PrunePlan, schedule, masks=None, where=None):
  parts = COMPOSITE.get(p.structure)
  if parts is None:
    return pruning.wrap(inner, sparsity=p.sparsity, score=p.score, structure=p.structure,
                        scope=p.scope, schedule=schedule, initial_masks=masks,
                        **({} if where is None else {"where": where}))
  tx = inner
  for structure, pick in parts:
    picked = pick if where is None else (lambda path, pick=pick: pick(path) and where(path))
    tx = pruning.wrap(tx, sparsity=p.sparsity, score=p.score, structure=structure,
                      scope=p.scope, schedule=schedule, initial_masks=_only(masks, pick),
                      where=picked)
  return tx


def compose(inner: optax.GradientTransformation, kinds: tuple[str, ...], prune: PrunePlan,
            spec: quantization.Spec, fresh: str | None = None, steps: int = 0,
            masks: Any = None, where: Any = None) -> optax.GradientTransformation:
  """Stacks the wrappers of the constraint ``kinds`` around ``inner``, earliest innermost.

  Args:
    inner: the optimizer.
    kinds: constraint stages in order ("prune", "quantize").
    prune: the prune stage's settings.
    spec: the quantize stage's quantizer.
    fresh: the kind this stage introduces (its schedule runs over the stage); earlier
      kinds are re-applied at step 0 (the grid from the incoming weights; the masks
      from ``masks``, else re-derived by the stage's score, which keeps the pruned set
      only when the score ranks the zeros lowest).
    steps: the stage's steps (for the gradual pruning schedule).
    masks: the prune stage's keep masks (`carried_masks` or `masks_from_params`),
      passed as ``initial_masks`` to every prune wrapper, so that no weight it pruned
      comes back and no other is pruned in its place; None re-derives them.
    where: which parameters both wrappers act on (a path predicate); None: their
      default (the kernels).

  Returns:
    The wrapped optimizer.
  """
  tx = inner
  for kind in kinds:
    if kind == "prune":
      if kind == fresh and prune.schedule == "polynomial":
        end = max(steps // 2, 1)
        schedule = pruning.polynomial(begin=0, end=end, every=max(end // 10, 1))
      else:
        schedule = pruning.one_shot(0)
      tx = _prune_tx(tx, prune, schedule, masks, where)
    elif kind == "quantize":
      tx = quantization.wrap(tx, spec, **({} if where is None else {"where": where}))
  return tx


def carried_masks(opt_state: Any) -> Any:
  """The keep masks of the pruning wrapper in an optimizer state, or None if it has none.

  Args:
    opt_state: the final optimizer state of a stage (a vmapped sweep's holds every
      member's masks stacked on a leading axis: unstack them first).

  Returns:
    Masks to pass to `compose` (``masks=``) in the stages after it, or None.
  """
  is_state = lambda x: isinstance(x, pruning.PruningState)
  states, todo = [], [opt_state]
  while todo:   # a wrapper's state holds those of the wrappers inside it
    found = [x for x in jax.tree.leaves(todo.pop(), is_leaf=is_state) if is_state(x)]
    states += found
    todo += [x.inner_state for x in found]
  if not states:
    return None
  # A composite structure stacks wrappers, each masking its own leaves.
  masked = lambda x: isinstance(x, optax.MaskedNode)
  merged = states[0].masks
  for st in states[1:]:
    merged = jax.tree.map(lambda a, b: b if masked(a) else a, merged, st.masks,
                          is_leaf=masked)
  return merged


def masks_from_params(params: Any, prune: PrunePlan) -> Any:
  """Keep masks read off the prune stage's params: its pruned weights are its exact zeros.

  Exact on the output of a prune stage that runs on float weights (``prune`` before
  ``quantize``), where a kept weight is 0.0 with probability zero. On params already
  on a grid (``quantize,prune``) a kept weight that rounds to 0 reads as pruned; the
  exact masks are those of the stage's state (`carried_masks`). Biases of pruned
  neurons/channels/heads are left to follow their kernels.

  Args:
    params: the prune stage's final params.
    prune: the prune stage's settings (they pick the pruned kernels).

  Returns:
    Masks for `compose` (``masks=``): ``params != 0`` at the pruned kernels, None
    elsewhere.
  """
  masks = carried_masks(_prune_tx(optax.identity(), prune, pruning.one_shot(0)).init(params))

  def mask(path, m, x):
    if isinstance(m, optax.MaskedNode) or not selection.default_where(
        selection.path_str(path)):
      return None
    return np.asarray(x) != 0
  return jax.tree_util.tree_map_with_path(
      mask, masks, params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
