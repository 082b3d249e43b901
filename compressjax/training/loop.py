"""The flat training loop: call the jitted step, fetch metrics once per log interval.

Nothing here is specific to a model, a loss or a compression method: those live in the
step (`compressjax.training.steps.make_train_step`). The loop only counts steps, keeps
the step's metrics on device, averages them on the host every ``log_every`` steps and
logs a progress line (bar, loss, steps/s, ETA) through absl logging. It is a plain
function of the state, so a caller can run it in pieces (fork a run, evaluate in
between, resume from a checkpoint) and get the same numbers as one long call.

With `checkpoint.RunCheckpoints` the loop saves the state every N steps and, called again
on the same directory after an interruption, continues from the newest readable one.
Non-finite gradients are counted (``nonfinite`` in the history) and, past a limit of
consecutive ones, stop the run with `Diverged`.
"""

from collections.abc import Callable, Sequence
import time
from typing import Any, NamedTuple

from absl import logging
import jax
import numpy as np

from compressjax.training.checkpoint import RunCheckpoints
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


def _fetch(pending: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  """One transfer for the whole interval: ``{name: [steps, ...]}`` host arrays."""
  fetched = jax.device_get(pending)
  return {k: np.stack([np.asarray(m[k]) for m in fetched]) for k in fetched[0]}


def _host(x: np.ndarray) -> float | list[float]:
  return float(x) if x.ndim == 0 else x.tolist()


def _summary(values: dict[str, np.ndarray]) -> dict[str, Any]:
  """Interval means (sums for ``nonfinite``); sweeps keep their per-member lists."""
  return {k: _host(v.sum(0) if k in _SUMMED else v.mean(0)) for k, v in values.items()}


def _display(record: dict[str, Any]) -> dict[str, float]:
  return {k: float(np.mean(v)) for k, v in record.items()}


_SUMMED = ("nonfinite",)


class Diverged(FloatingPointError):
  """Training produced non-finite gradients for too many steps in a row."""


def train(state: TrainState, step_fn: StepFn, num_steps: int, *, log_every: int = 100,
          step_args: Sequence[Any] = (), name: str = "train",
          show: Sequence[str] = ("loss",), on_log: LogFn | None = None,
          checkpoints: RunCheckpoints | None = None, max_nonfinite: int | None = None,
          max_in_flight: int | None = 2) -> tuple[TrainState, list[dict[str, Any]]]:
  """Runs ``num_steps`` steps of ``step_fn`` from ``state``, resuming if it can.

  Args:
    state: the starting state (donated to the step: do not reuse it after the call).
    step_fn: ``step_fn(state, *step_args) -> (state, metrics)``, e.g. from
      `make_train_step` (a sweep's step, ``vmap=True``, works too).
    num_steps: steps to run (0 returns ``state`` unchanged).
    log_every: steps between metric fetches and progress lines; the last step always
      logs.
    step_args: extra arguments of every step call (the teacher's variables).
    name: the label of the progress line.
    show: metric names in the progress line.
    on_log: optional ``on_log(step, metrics)`` called at each log point with host floats.
    checkpoints: periodic checkpoints (`checkpoint.RunCheckpoints`): the newest readable
      one, if any, replaces ``state`` and the run continues from its step; the state is
      saved every ``checkpoints.every`` steps and at the end. A resumed run ends with
      the same state as an uninterrupted one (the step is a pure function of it).
    max_nonfinite: stop with `Diverged` when this many consecutive steps had non-finite
      gradients (checked at log points; with ``optax.apply_if_finite`` those steps left
      the weights untouched). None never stops.
    max_in_flight: steps dispatched ahead of the device at most (None: unbounded). Two
      hide the Python dispatch; `parallel.safe_in_flight` says when one is needed.

  Returns:
    ``(state, history)``; ``history`` has one dict per log point: the metrics averaged
    over the interval (``nonfinite`` summed: the count of non-finite steps), plus
    ``step`` (the state's global step) and ``steps_per_s`` (the first interval includes
    compilation). In a sweep each metric is a list, one value per member.

  Raises:
    Diverged: see ``max_nonfinite``.
  """
  if not isinstance(num_steps, int) or num_steps < 0:
    raise ValueError(f"num_steps must be an int >= 0, got {num_steps!r}")
  if not isinstance(log_every, int) or log_every < 1:
    raise ValueError(f"log_every must be an int >= 1, got {log_every!r}")
  if max_in_flight is not None and (not isinstance(max_in_flight, int) or max_in_flight < 1):
    raise ValueError(f"max_in_flight must be None or an int >= 1, got {max_in_flight!r}")
  if max_nonfinite is not None and (not isinstance(max_nonfinite, int) or max_nonfinite < 1):
    raise ValueError(f"max_nonfinite must be None or an int >= 1, got {max_nonfinite!r}")
  history: list[dict[str, Any]] = []
  start = int(np.max(jax.device_get(state.step)))
  done = 0
  if checkpoints is not None:
    restored = checkpoints.restore_latest(state)
    if restored is not None:
      state, history = restored
      done = int(np.max(jax.device_get(state.step))) - start
      if not 0 <= done <= num_steps:
        raise ValueError(f"checkpoints in {checkpoints.directory} are at step "
                         f"{start + done}, outside this run's steps [{start}, "
                         f"{start + num_steps}]")
      logging.info("%s: resuming from the checkpoint at step %d of %d", name, start + done,
                   start + num_steps)
  pending: list[dict[str, Any]] = []
  run_length = 0
  t_run = t_last = time.perf_counter()
  last = done
  for i in range(done + 1, num_steps + 1):
    state, metrics = step_fn(state, *step_args)
    pending.append(metrics)
    if max_in_flight is not None and len(pending) >= max_in_flight:
      jax.block_until_ready(pending[-max_in_flight])
    save = checkpoints is not None and ((start + i) % checkpoints.every == 0 or i == num_steps)
    if i % log_every == 0 or i == num_steps or save:
      values = _fetch(pending)  # blocks until the interval's steps finished
      run_length = _check_nonfinite(values.get("nonfinite"), run_length, max_nonfinite,
                                    name, start + i)
      record = _summary(values)
      now = time.perf_counter()
      record["steps_per_s"] = (i - last) / max(now - t_last, 1e-9)
      record["eta_s"] = (num_steps - i) * (now - t_run) / (i - done)
      record["step"] = start + i
      logging.info("%s", progress_line(name, i, num_steps, _display(record), show))
      if on_log is not None:
        on_log(start + i, record)
      history.append(record)
      pending, last, t_last = [], i, now
      if save:
        checkpoints.save(start + i, state, history)
  return state, history


def _check_nonfinite(flags: np.ndarray | None, run_length: Any, limit: int | None,
                     name: str, step: int) -> Any:
  """Updates the count of consecutive non-finite steps; raises past ``limit``."""
  if flags is None:
    return run_length
  for f in flags:  # steps of the interval, in order (per member in a sweep)
    run_length = np.where(f > 0, run_length + 1, 0)
    if limit is not None and np.any(run_length >= limit):
      raise Diverged(f"{name}: training diverged: {limit} consecutive steps up to step "
                     f"{step} had non-finite gradients (their updates were skipped, no "
                     f"NaN weights were written); lower the learning rate or check the "
                     f"data")
  return run_length


class Validation(NamedTuple):
  """Best-on-validation selection for `fit`.

  Attributes:
    score: ``score(variables) -> float`` (higher is better), or for a sweep (a
      ``vmap``-ed step) one score per member, given the stacked variables.
    every: steps between validations (the last step is always validated).
    to_variables: the deployable variables of a state (e.g. LoRA adapters merged).
    include_start: the model before the first step is a candidate too (for fine-tuning:
      the run then never ends worse on validation than it began).
    metric: the name of the score in the history.
  """
  score: Callable[[Any], Any]
  every: int
  to_variables: Callable[[TrainState], Any] = TrainState.variables
  include_start: bool = False
  metric: str = "val_accuracy"


class Best(NamedTuple):
  """The model `fit` kept: host variables, and the step and score that chose them.

  In a sweep ``step`` and ``score`` hold one value per member and ``variables`` are
  stacked (each member's best).
  """
  variables: Any
  step: np.ndarray
  score: np.ndarray


def _keep_better(best: Best, variables: Any, step: int, score: Any) -> Best:
  """``best`` with the members whose ``score`` is at least their best replaced (ties: later)."""
  score = np.asarray(score, np.float64).reshape(np.shape(best.score))
  better = score >= best.score
  pick = lambda new, old: np.where(better.reshape(better.shape + (1,) * (
      np.ndim(new) - better.ndim)), new, old)
  return Best(jax.tree.map(pick, variables, best.variables), np.where(better, step, best.step),
              np.where(better, score, best.score))


def fit(state: TrainState, step_fn: StepFn, num_steps: int, *,
        validation: Validation | None = None, checkpoints: RunCheckpoints | None = None,
        log_every: int = 100, step_args: Sequence[Any] = (), name: str = "train",
        show: Sequence[str] = ("loss",), max_nonfinite: int | None = None,
        max_in_flight: int | None = 2
        ) -> tuple[TrainState, list[dict[str, Any]], Best | None]:
  """`train`, with an optional best-on-validation selection that resumes with the run.

  Without ``validation`` this is `train` (same arguments, ``best`` None). With it, the
  run stops every ``validation.every`` steps (at multiples of it, counted from the
  state's step), scores ``validation.to_variables(state)`` and keeps the best; the
  periodic checkpoints then hold the state *and* the best so far (saved at the first
  validation at or past each multiple of ``checkpoints.every``), so a run killed at any
  point and called again on the same directory ends with the same state, history and
  best as an uninterrupted one.

  Args:
    state: the starting state (donated: do not reuse it after the call).
    step_fn: ``step_fn(state, *step_args) -> (state, metrics)`` (`make_train_step`).
    num_steps: steps to run.
    validation: the selection, or None.
    checkpoints: periodic checkpoints to save to and resume from (see `train`).
    log_every: steps between progress lines (within a validation interval).
    step_args: extra arguments of every step call.
    name: the label of the progress lines.
    show: metric names in the progress lines.
    max_nonfinite: see `train` (with ``validation``, counted within an interval).
    max_in_flight: see `train`.

  Returns:
    ``(state, history, best)``: the final state, the train log (plus, with
    ``validation``, one ``{"step", metric}`` entry per validation) and the `Best`
    (None without ``validation``).
  """
  kw = dict(step_args=step_args, name=name, show=show, max_nonfinite=max_nonfinite,
            max_in_flight=max_in_flight)
  if validation is None:
    state, history = train(state, step_fn, num_steps, log_every=log_every,
                           checkpoints=checkpoints, **kw)
    return state, history, None
  v = validation
  if not isinstance(v.every, int) or v.every < 1:
    raise ValueError(f"validation.every must be an int >= 1, got {v.every!r}")
  start = int(np.max(jax.device_get(state.step)))
  shape = np.shape(jax.device_get(state.step))
  best = Best(jax.device_get(v.to_variables(state)), np.full(shape, -1),
              np.full(shape, -np.inf))
  history: list[dict[str, Any]] = []
  done = 0
  if checkpoints is not None:
    restored = checkpoints.restore_latest((state, best))
    if restored is not None:
      (state, best), history = restored
      best = Best(*jax.device_get(tuple(best)))
      done = int(np.max(jax.device_get(state.step))) - start
      logging.info("%s: resuming from the checkpoint at step %d of %d", name, start + done,
                   start + num_steps)

  def validate(state, best, at):
    variables = jax.device_get(v.to_variables(state))
    score = v.score(variables)
    history.append({"step": at, v.metric: _host(np.asarray(score, np.float64))})
    logging.info("%s step %d/%d: %s %s", name, at - start, num_steps, v.metric,
                 np.round(np.asarray(score, np.float64), 4))
    return _keep_better(best, variables, at, score)

  if done == 0 and (v.include_start or num_steps == 0):
    best = validate(state, best, start)
  while done < num_steps:
    at = start + done
    n = min(v.every - at % v.every, num_steps - done)
    state, log = train(state, step_fn, n, log_every=min(log_every, n),
                       **{**kw, "name": f"{name} @{done}"})
    history += log
    done += n
    best = validate(state, best, start + done)
    if checkpoints is not None and (
        (start + done) // checkpoints.every > at // checkpoints.every or done == num_steps):
      checkpoints.save(start + done, (state, best), history)
  return state, history, best
