"""The flat training loop: call the jitted step, fetch metrics once per log interval.

Nothing here is specific to a model, a loss or a compression method: those live in the
step (`compressjax.training.steps.make_train_step`). The loop only counts steps, keeps
the step's metrics on device, averages them on the host every ``log_every`` steps and
logs a progress line (bar, loss, steps/s, ETA) through absl logging. It is a plain
function of the state, so a caller can run it in pieces (fork a run, evaluate in
between, resume from a checkpoint) and get the same numbers as one long call.
"""

from collections.abc import Callable, Sequence
import time
from typing import Any

from absl import logging
import jax
import numpy as np

from compressjax.training.steps import StepFn
from compressjax.training.steps import TrainState

LogFn = Callable[[int, dict[str, float]], None]


def progress_line(name: str, step: int, total: int, metrics: dict[str, float],
                  keys: Sequence[str] = ("loss",), width: int = 20) -> str:
  """One progress line: ``name [#####.....] step/total  loss 0.123  40.1 steps/s``.

  Args:
    name: what is training (a stage name).
    step: steps done in this call.
    total: steps this call will do.
    metrics: host floats; ``steps_per_s`` and ``eta_s`` are shown when present.
    keys: metric names to show, in order (missing ones are skipped).
    width: characters of the bar.

  Returns:
    The line.
  """
  filled = int(round(width * step / max(total, 1)))
  parts = [f"{name} [{'#' * filled}{'.' * (width - filled)}] {step}/{total}"]
  parts += [f"{k} {metrics[k]:.4g}" for k in keys if k in metrics]
  if "steps_per_s" in metrics:
    parts.append(f"{metrics['steps_per_s']:.1f} steps/s")
  if "eta_s" in metrics:
    parts.append(f"eta {metrics['eta_s']:.0f}s")
  return "  ".join(parts)


def _mean_metrics(pending: list[dict[str, Any]]) -> dict[str, float]:
  fetched = jax.device_get(pending)  # one transfer for the whole interval
  return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


def train(state: TrainState, step_fn: StepFn, num_steps: int, *, log_every: int = 100,
          step_args: Sequence[Any] = (), name: str = "train",
          show: Sequence[str] = ("loss",), on_log: LogFn | None = None
          ) -> tuple[TrainState, list[dict[str, float]]]:
  """Runs ``num_steps`` steps of ``step_fn`` from ``state``.

  Args:
    state: the starting state (donated to the step: do not reuse it after the call).
    step_fn: ``step_fn(state, *step_args) -> (state, metrics)``, e.g. from
      `make_train_step`.
    num_steps: steps to run (0 returns ``state`` unchanged).
    log_every: steps between metric fetches and progress lines; the last step always
      logs.
    step_args: extra arguments of every step call (the teacher's variables).
    name: the label of the progress line.
    show: metric names in the progress line.
    on_log: optional ``on_log(step, metrics)`` called at each log point with host floats.

  Returns:
    ``(state, history)``; ``history`` has one dict per log point: the metrics averaged
    over the interval, plus ``step`` (the state's global step) and ``steps_per_s``
    (the first interval includes compilation).
  """
  if not isinstance(num_steps, int) or num_steps < 0:
    raise ValueError(f"num_steps must be an int >= 0, got {num_steps!r}")
  if not isinstance(log_every, int) or log_every < 1:
    raise ValueError(f"log_every must be an int >= 1, got {log_every!r}")
  history: list[dict[str, float]] = []
  pending: list[dict[str, Any]] = []
  start = int(jax.device_get(state.step))
  t_run = t_last = time.perf_counter()
  last = 0
  for i in range(1, num_steps + 1):
    state, metrics = step_fn(state, *step_args)
    pending.append(metrics)
    if i % log_every == 0 or i == num_steps:
      record = _mean_metrics(pending)  # blocks until the interval's steps finished
      now = time.perf_counter()
      record["steps_per_s"] = (i - last) / max(now - t_last, 1e-9)
      record["eta_s"] = (num_steps - i) * (now - t_run) / i
      record["step"] = start + i
      logging.info("%s", progress_line(name, i, num_steps, record, show))
      if on_log is not None:
        on_log(start + i, record)
      history.append(record)
      pending, last, t_last = [], i, now
  return state, history
