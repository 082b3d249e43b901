"""The multi-task wireless objective: on-device data, one forward pass, per-task losses.

Batches are a dict ``task -> channels.Batch`` with task in ("modulation", "symbols",
"channel"). `multitask_forward` concatenates every task's I/Q frames into one forward
pass of the shared backbone and gives each task its own head's output on its own rows;
`task_losses` turns those into a weighted sum of

* modulation: softmax cross-entropy against ``batch.label``;
* symbols: softmax cross-entropy against ``batch.symbols`` on data positions only
  (``pilot_mask`` False), averaged over those positions;
* channel: squared error ``sum_t |h_hat_t - h_t|^2`` of the block taps (with
  ``E sum_t |h_t|^2 = 1`` this is the NMSE's numerator; time-varying taps ``[B, L, T]``
  are averaged over the frame first).

Every per-example loss is computed unreduced and averaged here with its own mask, as the
house style asks of losses.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from compressjax.models.iq_transformer import TASKS
# kd_fn(student_logits, teacher_logits, labels) -> unreduced loss, e.g.
# functools.partial(compressjax.distillation.kd_loss, temperature=4.0, alpha=0.9).
KdFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
  """Validates a task list (non-empty, known, no repeats) and returns it as a tuple."""
  tasks = tuple(tasks)
  if not tasks or len(set(tasks)) != len(tasks) or any(t not in TASKS for t in tasks):
    raise ValueError(f"tasks must be distinct names from {TASKS}, got {tasks!r}")
  return tasks


def multitask_data_fn(cfg: Any, batch_size: int, tasks: Sequence[str] = TASKS,
                      simulate: Callable[..., Any] | None = None
                      ) -> Callable[..., dict[str, Any]]:
  """``data_fn(key, step=None, data=None) -> {task: Batch}``, each task from its own subkey.

  Args:
    cfg: a ``channels.ChannelConfig``.
    batch_size: examples per task.
    tasks: tasks to draw.
    simulate: ``simulate(key, cfg, batch_size, task) -> Batch``; None uses
      ``compressjax.channels.simulate.simulate``.

  Returns:
    A pure function of the key (``step`` and ``data`` are ignored: the simulator needs
    neither), traceable inside the jitted train step.
  """
  tasks = check_tasks(tasks)
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
  if simulate is None:
    # Imported here so that a caller with its own simulator never needs the channels.
    from compressjax.channels.simulate import simulate  # pylint: disable=g-import-not-at-top

  def data_fn(key, step=None, data=None):
    del step, data
    keys = jax.random.split(key, len(tasks))
    return {t: simulate(k, cfg, batch_size, t) for t, k in zip(tasks, keys)}

  return data_fn


def multitask_forward(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """Wraps ``model.apply`` of an `IQTransformer` into a forward over ``{task: Batch}``.

  The tasks' frames go through the backbone in one call. When every task has the same
  number of frames they are interleaved row by row (``[B, tasks, L, 2] -> [B * tasks, L,
  2]``), so a batch split over devices along ``B`` (`parallel.shard_data_fn`) stays on
  its devices; otherwise they are concatenated in task-name order.

  Args:
    apply_fn: ``model.apply``; called once on the I/Q of every task.

  Returns:
    ``forward(variables, batches, *, train=False, rngs=None, mutable=False)`` returning
    ``{task: head output on that task's rows}`` (plus the mutated collections, over the
    combined rows, when ``mutable`` is set).
  """

  def forward(variables, batches, *, train=False, rngs=None, mutable=False):
    tasks = sorted(batches)
    shapes = {batches[t].iq.shape for t in tasks}
    interleave = len(shapes) == 1
    if interleave:
      stacked = jnp.stack([batches[t].iq for t in tasks], axis=1)
      iq = stacked.reshape((-1,) + stacked.shape[2:])
    else:
      iq = jnp.concatenate([batches[t].iq for t in tasks], axis=0)
    result = apply_fn(variables, iq, train=train, rngs=rngs or {}, mutable=mutable)
    outputs, mutated = result if mutable else (result, None)
    split, start = {}, 0
    for i, t in enumerate(tasks):
      out = outputs[t]
      if interleave:
        split[t] = out.reshape((-1, len(tasks)) + out.shape[1:])[:, i]
      else:
        n = batches[t].iq.shape[0]
        split[t] = out[start:start + n]
        start += n
    return (split, mutated) if mutable else split

  return forward


def data_mask(batch: Any) -> jax.Array:
  """float32 [B, L]: 1 on data positions (``pilot_mask`` False), 0 on pilots."""
  return jnp.broadcast_to(~batch.pilot_mask, batch.symbols.shape).astype(jnp.float32)


def block_taps(batch: Any) -> jax.Array:
  """float32 [B, T, 2] real/imag block taps (time-varying taps averaged over the frame)."""
  taps = batch.taps if batch.taps.ndim == 2 else batch.taps.mean(axis=1)
  return jnp.stack([taps.real, taps.imag], axis=-1).astype(jnp.float32)


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _modulation(logits, batch, kd):
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch.label)
  loss = ce if kd is None else kd(logits, batch.label)
  acc = jnp.mean(jnp.argmax(logits, -1) == batch.label)
  return jnp.mean(loss), {"ce": jnp.mean(ce), "accuracy": acc}


def _symbols(logits, batch, kd):
  mask = data_mask(batch)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch.symbols)
  loss = ce if kd is None else kd(logits, batch.symbols)
  errors = (jnp.argmax(logits, -1) != batch.symbols).astype(jnp.float32)
  return _masked_mean(loss, mask), {"ce": _masked_mean(ce, mask),
                                    "ser": _masked_mean(errors, mask)}


def _channel(pred, batch, kd):
  del kd  # A regression head has no soft targets: it learns from the true taps.
  target = block_taps(batch)
  sq = jnp.sum((pred - target) ** 2, axis=(-2, -1))
  return jnp.mean(sq), {"nmse": jnp.sum(sq) / jnp.maximum(jnp.sum(target ** 2), 1e-12)}


_LOSSES = {"modulation": _modulation, "symbols": _symbols, "channel": _channel}


def _weighted(outputs, batches, weights, teacher_outputs, kd_fn):
  weights = dict(weights or {})
  unknown = set(weights) - set(TASKS)
  if unknown:
    raise ValueError(f"weights keys must be in {TASKS}, got {sorted(unknown)}")
  total, metrics = jnp.zeros((), jnp.float32), {}
  for task in sorted(batches):
    kd = None
    if teacher_outputs is not None and task != "channel":
      kd = lambda s, y, t=teacher_outputs[task]: kd_fn(s, t, y)
    loss, extra = _LOSSES[task](outputs[task], batches[task], kd)
    total = total + float(weights.get(task, 1.0)) * loss
    metrics[f"{task}/loss"] = loss
    metrics.update({f"{task}/{k}": v for k, v in extra.items()})
  return total, metrics


def task_losses(outputs: Mapping[str, jax.Array], batches: Mapping[str, Any],
                weights: Mapping[str, float] | None = None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted multi-task loss over the tasks present in ``batches``.

  Args:
    outputs: ``{task: head output}`` from `multitask_forward`.
    batches: ``{task: Batch}``.
    weights: per-task weights (missing tasks weigh 1).

  Returns:
    ``(sum_t w_t loss_t, metrics)`` with ``<task>/loss``, ``<task>/ce``,
    ``modulation/accuracy``, ``symbols/ser`` and ``channel/nmse`` on this batch.
  """
  return _weighted(outputs, batches, weights, None, None)


def kd_task_losses(outputs: Mapping[str, jax.Array], batches: Mapping[str, Any],
                   teacher_outputs: Mapping[str, jax.Array], kd_fn: KdFn,
                   weights: Mapping[str, float] | None = None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`task_losses` with the two classification heads trained by ``kd_fn`` instead of CE.

  ``kd_fn(student_logits, teacher_logits, labels)`` returns unreduced losses (it mixes
  in the hard-label term itself, e.g. Hinton et al., 2015, "Distilling the knowledge in
  a neural network"); they are averaged here with the task's mask. The channel head
  keeps its squared error against the true taps.

  Args:
    outputs: the student's ``{task: head output}``.
    batches: ``{task: Batch}``.
    teacher_outputs: the teacher's outputs on the same batches.
    kd_fn: the distillation loss.
    weights: per-task weights (missing tasks weigh 1).

  Returns:
    ``(loss, metrics)`` as in `task_losses` (``<task>/loss`` is the KD loss and
    ``<task>/ce`` the hard-label cross-entropy).
  """
  return _weighted(outputs, batches, weights, teacher_outputs, kd_fn)
