"""Which parameters a transform touches: predicates on the parameter path.

Every transform (pruning, quantization, LoRA, factorization) takes ``where``, a
predicate on the '/'-joined path of a leaf in a Flax parameter tree, for example
``"Block_0/MlpBlock_0/Dense_0/kernel"``. The default selects Dense/Conv kernels
(leaves named ``kernel`` with at least two dimensions) and never biases, norms or
embeddings.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp

Where = Callable[[str], bool]


def path_str(path: tuple[Any, ...]) -> str:
  """Joins a ``jax.tree_util`` key path into ``"a/b/kernel"``."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def default_where(path: str) -> bool:
  """Selects Dense/Conv kernels: leaves whose last path entry is ``kernel``."""
  return path.rsplit("/", 1)[-1] == "kernel"


def select(params: Any, where: Where | None = None) -> Any:
  """Returns a pytree of Python bools: True where ``where(path)`` holds.

  Leaves with fewer than two dimensions are never selected by the default
  predicate (a 1-D "kernel" is not a matrix).

  Args:
    params: a parameter pytree.
    where: predicate on the '/'-joined path; ``None`` means `default_where`.

  Returns:
    A pytree of bools with the structure of ``params`` (usable with
    ``optax.masked``).
  """
  if where is None:
    pick = lambda p, x: default_where(p) and getattr(x, "ndim", 0) >= 2
  else:
    pick = lambda p, x: bool(where(p))
  return jax.tree_util.tree_map_with_path(
      lambda path, x: pick(path_str(path), x), params)


def selected_paths(params: Any, where: Where | None = None) -> list[str]:
  """Paths of the leaves that ``where`` selects, in tree order."""
  flags = jax.tree_util.tree_leaves_with_path(select(params, where))
  return [path_str(p) for p, on in flags if on]


def leaves_by_path(tree: Any) -> dict[str, Any]:
  """The leaves of ``tree`` keyed by their '/'-joined paths (`path_str`)."""
  return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def check_selects_something(params: Any, where: Where | None, name: str) -> None:
  """Raises ``ValueError`` naming ``name`` if ``where`` selects no leaf."""
  if not selected_paths(params, where):
    paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    shown = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
    raise ValueError(
        f"{name}: `where` selects no parameter; the tree has paths [{shown}]")


def check_floating(params: Any, flags: Any, name: str) -> None:
  """Raises ``ValueError`` naming ``name`` and the leaf if a selected leaf is not floating.

  Transforms that move weights (pruning, quantization) cannot act on integer or bool leaves:
  a gradient step or a grid has no meaning there, so selecting one is a mistake in ``where``.

  Args:
    params: a parameter pytree.
    flags: a pytree of bools with the structure of ``params`` (from `select`).
    name: the transform, for the message (e.g. ``"pruning.wrap"``).
  """
  for (path, x), on in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(flags)):
    dtype = jnp.result_type(x)
    if on and not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"{name}: selected leaf {path_str(path)} must be floating (float16, "
                       f"bfloat16, float32 or float64), got {dtype}")
