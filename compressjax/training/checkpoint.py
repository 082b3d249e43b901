"""Saving and restoring pytrees (a `TrainState`) with orbax, one directory per stage.

``save(workdir/<stage>, state)`` writes atomically (orbax writes into a temporary
directory and renames it on success), so `exists` is True only for a finished save:
a pipeline rerun can skip the stages whose checkpoint exists and never overwrites them
unless asked. `restore` rebuilds the exact pytree structure of a target (NamedTuple
optimizer states, typed PRNG keys and empty collections included); the target may be
abstract (``jax.eval_shape`` of the state), so nothing needs initializing twice.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def _abs(path: str | os.PathLike) -> str:
  return os.path.abspath(os.fspath(path))


def exists(path: str | os.PathLike) -> bool:
  """Whether ``path`` holds a finished checkpoint."""
  path = _abs(path)
  return os.path.isdir(path) and ocp.path.step.is_path_finalized(path)


def save(path: str | os.PathLike, tree: Any, *, overwrite: bool = False) -> str:
  """Saves ``tree`` under ``path`` and waits until it is on disk.

  Args:
    path: the checkpoint directory (e.g. ``workdir/train``); its parent is created.
    tree: a pytree of arrays (a `TrainState`).
    overwrite: replace an existing checkpoint (otherwise that is an error).

  Returns:
    The absolute path.

  Raises:
    ValueError: if ``path`` exists and ``overwrite`` is False, or is a file.
  """
  path = _abs(path)
  if os.path.isfile(path):
    raise ValueError(f"path must be a directory, got the file {path}")
  if os.path.exists(path) and not overwrite:
    raise ValueError(f"path must not hold a checkpoint already (pass overwrite=True), "
                     f"got {path}")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, tree, force=overwrite)
    ckptr.wait_until_finished()
  return path


def restore(path: str | os.PathLike, target: Any) -> Any:
  """Restores the checkpoint at ``path`` onto the structure of ``target``.

  Args:
    path: a directory written by `save`.
    target: a pytree with the saved structure: concrete arrays or
      ``jax.ShapeDtypeStruct`` leaves (``jax.eval_shape(lambda: state)``).

  Returns:
    A pytree shaped like ``target`` holding the saved values.

  Raises:
    ValueError: if ``path`` holds no finished checkpoint.
  """
  path = _abs(path)
  if not exists(path):
    raise ValueError(f"path must hold a finished checkpoint, got {path}")
  abstract = jax.tree.map(
      lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=getattr(x, "sharding", None)), target)
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(path, abstract)
  # orbax hands back the target's container types for NamedTuples and dicts.
  return jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(restored))
