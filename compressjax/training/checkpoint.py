"""Saving and restoring pytrees with orbax: one directory per stage, periodic run checkpoints.

``save(workdir/<stage>, state)`` writes atomically (orbax writes into a temporary
directory and renames it on success), so `exists` is True only for a finished save:
a pipeline rerun can skip the stages whose checkpoint exists and never overwrites them
unless asked. `restore` rebuilds the exact pytree structure of a target (NamedTuple
optimizer states, typed PRNG keys and empty collections included); the target may be
abstract (``jax.eval_shape`` of the state), so nothing needs initializing twice.

`RunCheckpoints` keeps the periodic checkpoints that let an interrupted run resume.
"""

import contextlib
import os
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp


@contextlib.contextmanager
def quiet_logs():
  """Orbax logs every save and restore at INFO; keep a run's log to its progress lines."""
  level = logging.get_verbosity()
  logging.set_verbosity(min(level, logging.WARNING))  # absl: lower is quieter
  try:
    yield
  finally:
    logging.set_verbosity(level)


def _abs(path: str | os.PathLike) -> str:
  return os.path.abspath(os.fspath(path))


def _abstract(target: Any) -> Any:
  return jax.tree.map(
      lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=getattr(x, "sharding", None)), target)


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
  abstract = _abstract(target)
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(path, abstract)
  # orbax hands back the target's container types for NamedTuples and dicts.
  return jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(restored))


class RunCheckpoints:
  """Periodic checkpoints of a training run, for resuming it: an orbax `CheckpointManager`.

  Every ``every`` steps (and at the last step) the loop saves the whole `TrainState`
  (params, optimizer and compression state, PRNG key, step) and its history under
  ``directory/<step>/``; orbax writes into a temporary directory and renames it when
  complete, so a run killed mid-save leaves the previous checkpoint as the latest.
  ``keep`` bounds how many are kept (older ones are removed by orbax as new ones land);
  at least 2, so that an unreadable latest one has a predecessor.

  `restore_latest` tries the newest checkpoint first; one that cannot be read (a
  truncated or corrupted file) is reported, moved aside to ``<directory>_unreadable/``
  (never deleted) and the one before it is used.
  """

  def __init__(self, directory: str | os.PathLike, every: int, keep: int = 2):
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
      raise ValueError(f"every must be an int >= 1, got {every!r}")
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 2:
      raise ValueError(f"keep must be an int >= 2, got {keep!r}")
    self.directory, self.every = _abs(directory), every
    self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=False, create=True))

  def all_steps(self) -> list[int]:
    """Steps of the finished checkpoints, ascending."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, history: list[dict[str, Any]]) -> None:
    """Saves ``state`` and ``history`` as checkpoint ``step`` (waits until on disk)."""
    with quiet_logs():
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(history)), force=True)
      self._manager.wait_until_finished()

  def restore_latest(self, target: Any) -> tuple[Any, list[dict[str, Any]]] | None:
    """The newest readable ``(state, history)``, or None if there is none.

    Args:
      target: a pytree with the saved structure (concrete or abstract leaves).
    """
    abstract = _abstract(target)
    for step in reversed(self.all_steps()):
      try:
        with quiet_logs():
          restored = self._manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract), history=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except  (any read failure: fall back)
        self._set_aside(step, e)
        continue
      state = jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(restored.state))
      return state, list(restored.history)
    return None

  def _set_aside(self, step: int, error: Exception) -> None:
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(f"{self.directory}_unreadable", f"{step}")
    while os.path.exists(dst):
      dst += "_"
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
      os.rename(src, dst)
    except FileNotFoundError:  # another process of a multi-host run moved it first
      pass
    self._manager.reload()
    logging.warning("checkpoint %s is unreadable (%s: %.200s); moved it to %s and falling "
                    "back to the previous one", src, type(error).__name__, error, dst)

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.close()

  def __enter__(self) -> "RunCheckpoints":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
