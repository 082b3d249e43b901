"""Sparsity structures: which weights are pruned together, and exact-count masks.

* ``"unstructured"``: any weight; each is its own unit.
* ``"n:m"`` (e.g. ``"2:4"``): every group of ``m`` consecutive weights along the
  input axis keeps exactly ``n`` (Mishra et al. 2021, "Accelerating Sparse Deep
  Neural Networks"). The input axis is axis 0 of a Dense kernel ``[in, out]``, the
  ``in`` axis of a conv kernel ``[..., in, out]``, axis 0 of a q/k/v kernel
  ``[d, H, dh]`` and the ``dh`` axis of an attention output kernel ``[H, dh, d]``.
* ``"neuron"`` / ``"channel"`` (the same rule, named for Dense and Conv): whole
  output units. A unit's score is the mean of its weights' scores (for magnitude,
  the L1 norm of Li et al. 2017, "Pruning Filters for Efficient ConvNets", divided
  by the fan-in so that global scope does not favour wide layers).
* ``"head"``: whole attention heads of a ``[d, H, dh]`` q/k/v kernel or an
  ``[H, dh, d]`` output kernel (Michel et al. 2019, "Are Sixteen Heads Really
  Better than One?"). The q/k/v/out kernels of one attention module form a group
  and lose the same heads; a head's score is the sum over the group of its mean
  score in each kernel.

Masks are exact: a tensor (or group, or the whole selection under global scope)
with ``u`` units and target ``s`` loses exactly ``round(s * u)`` units. Ties (many
in quantized weights) are broken by position, the earlier unit going first, so the
count never depends on how many scores are equal. Under global scope the count is of
units (weights, neurons or heads), not of the weights they hold. Masks only shrink:
units pruned at an earlier event rank below every live one, so an N:M mask is fixed
by its first prune event and later events (of a gradual schedule) keep it.
"""

from typing import NamedTuple, Sequence

import chex
import jax.numpy as jnp
import numpy as np

KINDS = ("unstructured", "n:m", "neuron", "channel", "head")
_QKV = ("query", "key", "value")


class Structure(NamedTuple):
  """A parsed ``structure`` argument: ``kind`` in `KINDS`; ``n``, ``m`` for N:M."""
  kind: str
  n: int = 0
  m: int = 0


class Layout(NamedTuple):
  """Where the units of a kernel are.

  Attributes:
    out_axes: axes indexing the output units (neurons/channels).
    nm_axis: the input axis along which N:M groups run.
    head_axis: axis indexing attention heads, or ``None``.
  """
  out_axes: tuple[int, ...]
  nm_axis: int
  head_axis: int | None


def parse(structure: str) -> Structure:
  """Parses and validates a ``structure`` argument.

  Args:
    structure: one of ``"unstructured"``, ``"neuron"``, ``"channel"``, ``"head"``
      or ``"N:M"`` with integers ``0 < N < M``.

  Returns:
    A `Structure`.

  Raises:
    ValueError: naming the value and the allowed forms.
  """
  allowed = 'unstructured | "N:M" with 0 < N < M (e.g. "2:4") | neuron | channel | head'
  if not isinstance(structure, str):
    raise ValueError(f"structure must be {allowed}, got {structure!r}")
  if ":" in structure:
    parts = structure.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
      raise ValueError(f"structure must be {allowed}, got {structure!r}")
    n, m = (int(p) for p in parts)
    if not 0 < n < m:
      raise ValueError(f"structure N:M needs 0 < N < M, got {structure!r}")
    return Structure("n:m", n, m)
  if structure not in KINDS or structure == "n:m":
    raise ValueError(f"structure must be {allowed}, got {structure!r}")
  return Structure(structure)


def layout(path: str, shape: Sequence[int], head_axis: int | None = None) -> Layout:
  """The unit layout of a kernel, detected from its path and shape.

  Flax attention (``nn.MultiHeadDotProductAttention``, and the IQ transformer's
  ``attn/{query,key,value,out}``) stores q/k/v kernels as ``[d, H, dh]`` and the
  output kernel as ``[H, dh, d]``; any other kernel is ``[..., in, out]``.

  Args:
    path: '/'-joined parameter path.
    shape: the kernel's shape.
    head_axis: overrides the detected head axis.

  Returns:
    A `Layout`.
  """
  nd = len(shape)
  module = path.split("/")[-2] if "/" in path else ""
  if nd == 3 and module in _QKV:
    lay = Layout(out_axes=(1, 2), nm_axis=0, head_axis=1)
  elif nd == 3 and module == "out":
    lay = Layout(out_axes=(2,), nm_axis=1, head_axis=0)
  else:
    lay = Layout(out_axes=(nd - 1,), nm_axis=max(nd - 2, 0), head_axis=None)
  if head_axis is not None:
    lay = lay._replace(head_axis=head_axis % nd)
  return lay


def unit_axes(kind: str, lay: Layout, ndim: int) -> tuple[int, ...]:
  """Axes that index the units of ``kind`` (all axes for unstructured)."""
  if kind == "unstructured":
    return tuple(range(ndim))
  if kind == "head":
    return (lay.head_axis,)
  return lay.out_axes


def unit_scores(scores: chex.Array, kind: str, lay: Layout) -> chex.Array:
  """Mean score of each unit; the result has the unit axes only, in order."""
  keep = unit_axes(kind, lay, scores.ndim)
  reduce = tuple(a for a in range(scores.ndim) if a not in keep)
  return jnp.mean(scores.astype(jnp.float32), axis=reduce) if reduce else scores


def expand(unit_mask: chex.Array, kind: str, lay: Layout,
           shape: Sequence[int]) -> chex.Array:
  """Broadcasts a unit mask back to the kernel's shape."""
  keep = unit_axes(kind, lay, len(shape))
  full = [shape[a] if a in keep else 1 for a in range(len(shape))]
  return jnp.broadcast_to(unit_mask.reshape(full), tuple(shape))


def keep_mask(scores: chex.Array, num_pruned: chex.Array) -> chex.Array:
  """True for all but the ``num_pruned`` lowest scores of a flat vector.

  Ranks by a stable sort, so among equal scores the lower index is pruned first
  and exactly ``num_pruned`` entries are False, ties or not. ``num_pruned`` may be
  traced.

  Args:
    scores: 1-D scores.
    num_pruned: how many to prune (an integer scalar, 0..size).

  Returns:
    Boolean keep mask of the shape of ``scores``.
  """
  n = scores.shape[0]
  order = jnp.argsort(scores, stable=True)
  rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  return rank >= num_pruned


def num_to_prune(sparsity: chex.Numeric, size: int) -> chex.Array:
  """``round(sparsity * size)`` as int32 (round half to even, like ``np.round``)."""
  return jnp.round(jnp.asarray(sparsity, jnp.float32) * size).astype(jnp.int32)


def nm_mask(scores: chex.Array, n: int, m: int, axis: int) -> chex.Array:
  """Keeps the ``n`` highest of every ``m`` consecutive scores along ``axis``.

  Args:
    scores: a kernel's scores; ``scores.shape[axis]`` must be a multiple of ``m``.
    n: weights kept per group.
    m: group size.
    axis: the input axis.

  Returns:
    Boolean keep mask with exactly ``n`` True per group (ties: earlier pruned first).
  """
  moved = jnp.moveaxis(scores, axis, -1)
  groups = moved.reshape(moved.shape[:-1] + (moved.shape[-1] // m, m))
  order = jnp.argsort(groups, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1, stable=True)
  keep = (rank >= m - n).reshape(moved.shape)
  return jnp.moveaxis(keep, -1, axis)


def bias_follows_units(kernel_shape: Sequence[int], lay: Layout,
                       bias_shape: Sequence[int]) -> bool:
  """Whether a bias is indexed by the kernel's output units (its shape is theirs)."""
  return tuple(bias_shape) == tuple(kernel_shape[a] for a in lay.out_axes)


def bias_mask(kernel_mask: chex.Array, lay: Layout,
              bias_shape: Sequence[int]) -> chex.Array | None:
  """Mask of a kernel's bias: a bias entry dies with the unit whose weights all died.

  Args:
    kernel_mask: the kernel's keep mask.
    lay: the kernel's layout.
    bias_shape: the bias's shape.

  Returns:
    The bias keep mask, or ``None`` when the bias is not indexed by the output units.
  """
  if not bias_follows_units(kernel_mask.shape, lay, bias_shape):
    return None
  reduce = tuple(a for a in range(kernel_mask.ndim) if a not in lay.out_axes)
  return jnp.any(kernel_mask, axis=reduce)


def group_units(kind: str, paths: Sequence[str], layouts: Sequence[Layout],
                shapes: Sequence[Sequence[int]]) -> list[list[int]]:
  """Groups tensors that must lose the same units (q/k/v/out of one attention module).

  Args:
    kind: the structure kind.
    paths: paths of the scored tensors.
    layouts: their layouts.
    shapes: their shapes.

  Returns:
    Lists of tensor indices; each tensor is in exactly one group.

  Raises:
    ValueError: if grouped tensors disagree on the number of heads.
  """
  if kind != "head":
    return [[i] for i in range(len(paths))]
  groups: dict[str, list[int]] = {}
  for i, (path, lay) in enumerate(zip(paths, layouts)):
    parts = path.split("/")
    attn = parts[-2] in _QKV + ("out",) and lay.head_axis is not None
    key = "/".join(parts[:-2]) if attn else path
    groups.setdefault(key, []).append(i)
  for key, members in groups.items():
    heads = {shapes[i][layouts[i].head_axis] for i in members
             if layouts[i].head_axis is not None}
    if len(heads) > 1:
      raise ValueError(
          f"structure='head': kernels under {key!r} disagree on the head count {sorted(heads)}")
  return list(groups.values())


def masks_from_scores(scores: Sequence[chex.Array], alive: Sequence[chex.Array],
                      structure: Structure, layouts: Sequence[Layout],
                      groups: Sequence[Sequence[int]], targets: Sequence[chex.Numeric],
                      scope: str) -> list[chex.Array]:
  """Exact-count keep masks for the scored tensors.

  Args:
    scores: one score array per tensor.
    alive: the current keep masks; pruned weights stay pruned (masks only shrink).
    structure: the parsed structure.
    layouts: one `Layout` per tensor.
    groups: tensor indices that share units (`group_units`).
    targets: sparsity per group (``scope="layer"``) or one value (``"global"``).
    scope: ``"layer"`` or ``"global"``.

  Returns:
    One boolean keep mask per tensor.
  """
  if structure.kind == "n:m":
    return [nm_mask(jnp.where(a, s, -jnp.inf), structure.n, structure.m, lay.nm_axis)
            for s, a, lay in zip(scores, alive, layouts)]
  kind = structure.kind
  group_scores = []
  for members in groups:
    total = 0.0
    for i in members:
      live = unit_scores(alive[i].astype(jnp.float32), kind, layouts[i]) > 0
      total = total + jnp.where(live, unit_scores(scores[i], kind, layouts[i]), -jnp.inf)
    group_scores.append(total)
  if scope == "global":
    flat = jnp.concatenate([g.ravel() for g in group_scores])
    keep = keep_mask(flat, num_to_prune(targets[0], flat.shape[0]))
    splits = np.cumsum([g.size for g in group_scores])[:-1]
    unit_masks = [k.reshape(g.shape) for k, g in zip(jnp.split(keep, splits), group_scores)]
  else:
    unit_masks = [keep_mask(g.ravel(), num_to_prune(t, g.size)).reshape(g.shape)
                  for g, t in zip(group_scores, targets)]
  out: list[chex.Array] = [None] * len(scores)  # type: ignore[list-item]
  for members, um in zip(groups, unit_masks):
    for i in members:
      out[i] = expand(um, kind, layouts[i], scores[i].shape)
  return out
