"""The machinery every study shares: stages restored or run, their records, one training.

A study (`compressjax.studies.wireless`, `compressjax.studies.vision`) resolves its config
into typed plans, then runs its stages through this module:

* `train_group` trains one stage for a group of seeds: the shared train step
  (`training.make_train_step`), non-finite updates skipped and counted, periodic
  checkpoints to resume from after a kill, an optional best-on-validation selection, and
  two or more seeds ``jax.vmap``-ed into one program;
* `restore_or_run` restores a stage finished for every seed, or runs it and saves it;
* `record` caches a stage's metrics record;
* `write_report` writes ``metrics.json``, ``results.md`` and the plots.

Files are written by process 0 only; orbax checkpoints are saved by every process (a
collective on a multi-host run).
"""

import contextlib
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from absl import logging
import jax
import numpy as np
import optax

from compressjax import reporting
from compressjax import training
from compressjax.stages import carried_masks
from compressjax.training import checkpoint
from compressjax.training import parallel

OPTIMIZERS = ("sgd", "adam", "adamw")


class OptimizerPlan(NamedTuple):
  """An optimizer on a warm-up + cosine schedule (`optimizer` builds it).

  Attributes:
    name: one of `OPTIMIZERS` (``"adam"`` is AdamW with its decay).
    learning_rate: the peak learning rate.
    steps: the schedule's length.
    warmup_steps: linear warm-up from 0 (0: none).
    weight_decay: coupled L2 for SGD, decoupled for AdamW (0: none).
    end_fraction: the learning rate at the end, as a fraction of the peak.
    decay_kernels_only: decay only leaves of rank >= 2 (never norm scales or biases).
  """
  name: str
  learning_rate: float
  steps: int
  warmup_steps: int = 0
  weight_decay: float = 0.0
  end_fraction: float = 0.0
  decay_kernels_only: bool = False


def optimizer(plan: OptimizerPlan) -> optax.GradientTransformation:
  """The optimizer of ``plan`` (SGD: momentum 0.9, Nesterov)."""
  if plan.name not in OPTIMIZERS:
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {plan.name!r}")
  lr, steps = plan.learning_rate, max(plan.steps, 1)
  if plan.warmup_steps:
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, plan.warmup_steps, steps,
                                               lr * plan.end_fraction)
  else:
    sched = optax.cosine_decay_schedule(lr, steps, plan.end_fraction)
  mask = (lambda p: jax.tree.map(lambda x: getattr(x, "ndim", 0) >= 2, p)
          ) if plan.decay_kernels_only else None
  if plan.name == "sgd":
    return optax.chain(optax.add_decayed_weights(plan.weight_decay, mask=mask),
                       optax.sgd(sched, momentum=0.9, nesterov=True))
  return optax.adamw(sched, weight_decay=plan.weight_decay, mask=mask)


class TrainPlan(NamedTuple):
  """How a study trains (the fields of its config's ``train`` block).

  Attributes:
    batch_size: examples per step (per task for the wireless study), over all devices.
    log_every: steps between progress lines.
    checkpoint_every: steps between periodic checkpoints (0: none).
    keep_checkpoints: periodic checkpoints kept.
    max_nonfinite: consecutive non-finite steps that stop a run.
    num_devices: data-parallel devices (0: all).
    vmap_seeds: train all seeds as one ``jax.vmap``-ed program.
    compute_dtype: the models' compute dtype, one of `COMPUTE_DTYPES` ("bfloat16" on
      accelerators; params and optimizer state stay float32).
  """
  batch_size: int
  log_every: int
  checkpoint_every: int
  keep_checkpoints: int
  max_nonfinite: int
  num_devices: int
  vmap_seeds: bool
  compute_dtype: str = "float32"


COMPUTE_DTYPES = ("float32", "bfloat16")


# ------------------------------------------------------------- shared config checks


def check(cond: bool, field: str, value: Any, allowed: str) -> None:
  """Raises ``ValueError("<field> must be <allowed>, got <value>")`` unless ``cond``."""
  if not cond:
    raise ValueError(f"{field} must be {allowed}, got {value!r}")


def is_int(v: Any, lo: int) -> bool:
  """``v`` is an int (not a bool) and at least ``lo``."""
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= lo


def is_num(v: Any) -> bool:
  """``v`` is a finite int or float (not a bool)."""
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_seeds(seeds: Any) -> tuple[int, ...]:
  """The ``seeds`` field: a non-empty tuple of distinct ints >= 0."""
  out = tuple(seeds)
  check(len(out) > 0 and all(is_int(s, 0) for s in out), "seeds", seeds,
        "a non-empty tuple of ints >= 0")
  check(len(set(out)) == len(out), "seeds", seeds, "distinct")
  return tuple(int(s) for s in out)


def check_kd(d: Any, field: str = "distill") -> tuple[float, float]:
  """A KD block's ``temperature`` (> 0) and ``alpha`` (in [0, 1]), as floats."""
  check(is_num(d.temperature) and d.temperature > 0, f"{field}.temperature", d.temperature,
        "a finite number > 0")
  check(is_num(d.alpha) and 0 <= d.alpha <= 1, f"{field}.alpha", d.alpha,
        "a number in [0, 1]")
  return float(d.temperature), float(d.alpha)


def train_plan(t: Any, max_batch: int | None = None) -> TrainPlan:
  """Checks a config's ``train`` block (errors name ``train.<field>``); its `TrainPlan`.

  Args:
    t: the block (batch_size, log_every, checkpoint_every, keep_checkpoints,
      max_nonfinite, num_devices, vmap_seeds; compute_dtype, "float32" if absent).
    max_batch: the largest batch allowed (a data set's size), or None.
  """
  hi = "" if max_batch is None else f" and <= {max_batch} (the training split's size)"
  check(is_int(t.batch_size, 1) and (max_batch is None or t.batch_size <= max_batch),
        "train.batch_size", t.batch_size, "an int >= 1" + hi)
  check(is_int(t.log_every, 1), "train.log_every", t.log_every, "an int >= 1")
  check(isinstance(t.vmap_seeds, bool), "train.vmap_seeds", t.vmap_seeds, "True or False")
  check(is_int(t.checkpoint_every, 0), "train.checkpoint_every", t.checkpoint_every,
        "an int >= 0 (0 = no periodic checkpoints)")
  check(is_int(t.keep_checkpoints, 2), "train.keep_checkpoints", t.keep_checkpoints,
        "an int >= 2 (one to fall back on)")
  check(is_int(t.max_nonfinite, 1), "train.max_nonfinite", t.max_nonfinite, "an int >= 1")
  try:
    devices = parallel.check_num_devices(t.num_devices, "train.num_devices")
    parallel.check_batch_size(t.batch_size, devices, "train.batch_size")
  except ValueError as e:
    raise ValueError(f"{e} (train.num_devices={t.num_devices})") from None
  dtype = t.get("compute_dtype", "float32")
  check(dtype in COMPUTE_DTYPES, "train.compute_dtype", dtype, f"one of {COMPUTE_DTYPES}")
  return TrainPlan(int(t.batch_size), int(t.log_every), int(t.checkpoint_every),
                   int(t.keep_checkpoints), int(t.max_nonfinite), int(t.num_devices),
                   bool(t.vmap_seeds), dtype)


class Teacher(NamedTuple):
  """The model a stage distils from: its forward and its variables, one per seed."""
  forward: Callable[..., Any]
  variables: list[Any]


class Trained(NamedTuple):
  """One seed's result of `train_group`.

  Attributes:
    variables: host variables: the final state's (``to_variables``), or the best on
      validation when the stage selects.
    history: the train log (and the validations).
    masks: the pruning wrapper's keep masks, or None when ``tx`` has none.
    best: ``{"step", "val_accuracy"}`` of the selected model, or None.
  """
  variables: Any
  history: list[dict[str, Any]]
  masks: Any
  best: dict[str, Any] | None


def member_history(history: list[dict], i: int) -> list[dict]:
  """Member ``i``'s history of a sweep (per-member lists become its own values)."""
  return [{k: v[i] if isinstance(v, list) else v for k, v in rec.items()} for rec in history]


def check_finite(tree: Any, name: str) -> None:
  """Raises `FloatingPointError` naming the first non-finite leaves of ``tree``."""
  bad = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(tree)
         if not np.all(np.isfinite(np.asarray(x)))]
  if bad:
    raise FloatingPointError(f"{name}: training diverged (non-finite weights in {bad[:3]}); "
                             f"lower the learning rate")


def nonfinite_steps(history: list[dict]) -> int:
  """Steps whose gradients were non-finite (and skipped) in a stage's history."""
  return int(round(sum(r.get("nonfinite", 0.0) for r in history)))


def train_group(plan: TrainPlan, name: str, *, forward: Callable[..., Any],
                loss_fn: Callable[..., Any], data_fn: Callable[..., Any],
                inits: Sequence[Any], txs: Sequence[optax.GradientTransformation],
                keys: Sequence[jax.Array], steps: int, ckpt_dir: str,
                model_states: Sequence[Any] | None = None, data: Any = None,
                teacher: Teacher | None = None,
                to_variables: Callable[[training.TrainState], Any] | None = None,
                validate: Callable[[Any], float] | None = None, validate_every: int = 0,
                include_start: bool = False, show: Sequence[str] = ("loss",)
                ) -> list[Trained]:
  """Trains one stage for a group of seeds (two or more: one ``jax.vmap``-ed program).

  Args:
    plan: the study's `TrainPlan`.
    name: the label of the progress lines.
    forward: the trained model's forward (`training.make_train_step`'s protocol).
    loss_fn: ``loss_fn(outputs, batch[, teacher_outputs]) -> (loss, metrics)``.
    data_fn: ``data_fn(key, step, data) -> batch`` over the whole batch (sharded here).
    inits: the initial params, one per seed.
    txs: the optimizer per seed (they may differ only in their initial state, e.g. each
      seed's carried pruning masks: the step is built from the first). Each is wrapped
      in ``optax.apply_if_finite``: updates from non-finite gradients are skipped and
      counted; ``plan.max_nonfinite`` in a row stop the run.
    keys: the PRNG key per seed.
    steps: steps to train.
    ckpt_dir: the periodic checkpoints' directory (the run resumes from them).
    model_states: other variable collections per seed (``batch_stats``), or None.
    data: the step's ``data`` argument (a set held on device), or None for a simulator.
    teacher: distil from this model (its outputs go to ``loss_fn``), or None.
    to_variables: a state's deployable variables (default ``state.variables()``).
    validate: ``validate(variables) -> float`` for a best-on-validation selection every
      ``validate_every`` steps, or None to keep the final model.
    validate_every: see ``validate``.
    include_start: the starting model is a candidate of the selection too.
    show: metric names in the progress lines.

  Returns:
    One `Trained` per seed, in order.
  """
  n = len(inits)
  sweep = n > 1
  group = lambda trees: training.stack(trees) if sweep else trees[0]
  mesh = parallel.make_mesh(plan.num_devices)
  sharded = parallel.shard_data_fn(data_fn, mesh, plan.batch_size,
                                   shared=(lambda p: False) if data is not None
                                   else parallel.shared_leaf)
  txs = [optax.apply_if_finite(x, max_consecutive_errors=2 ** 30) for x in txs]
  states = model_states or [None] * n
  state = group([training.create_train_state(p, x, k, s)
                 for p, x, k, s in zip(inits, txs, keys, states)])
  state = parallel.replicate(state, mesh)
  teacher_vars = None if teacher is None else parallel.replicate(group(teacher.variables), mesh)
  step = training.make_train_step(forward, txs[0], loss_fn, sharded,
                                  teacher_forward=None if teacher is None else teacher.forward,
                                  mesh=mesh, vmap=sweep)
  to_variables = to_variables or training.TrainState.variables
  if sweep:  # a member's function, applied to every member of the stacked state
    to_variables = jax.vmap(to_variables)
  validation = None
  if validate is not None:
    score = (lambda v: [validate(m) for m in training.unstack(v)]) if sweep else validate
    validation = training.Validation(score, validate_every, to_variables, include_start)
  ckpts = (training.RunCheckpoints(ckpt_dir, plan.checkpoint_every, plan.keep_checkpoints)
           if plan.checkpoint_every else contextlib.nullcontext())
  with ckpts as c:
    state, history, best = training.fit(
        state, step, steps, validation=validation, checkpoints=c,
        log_every=min(plan.log_every, max(steps, 1)), name=name,
        step_args=(teacher_vars, parallel.replicate(data, mesh) if data is not None else None),
        show=show, max_nonfinite=plan.max_nonfinite,
        max_in_flight=parallel.safe_in_flight(mesh))
  variables = best.variables if best is not None else jax.device_get(to_variables(state))
  masks = carried_masks(jax.device_get(state.opt_state))
  members = training.unstack(variables) if sweep else [variables]
  masks = [None] * n if masks is None else (training.unstack(masks) if sweep else [masks])
  out = []
  for i, (v, m) in enumerate(zip(members, masks)):
    check_finite(v, name)
    b = None if best is None else {"step": int(np.ravel(best.step)[i]),
                                   "val_accuracy": float(np.ravel(best.score)[i])}
    out.append(Trained(v, member_history(history, i) if sweep else history, m, b))
  return out


def restore_or_run(stage_dirs: Sequence[str], targets: Sequence[Any],
                   run_fn: Callable[[], list[Trained]],
                   mask_targets: Sequence[Any] | None = None) -> list[Trained]:
  """Restores a stage finished for every seed of the group, or runs it and saves it.

  A stage directory holds ``variables`` (orbax; written last, its presence marks the stage
  finished), ``history.json`` (the history and the selection) and, for a prune stage,
  ``masks``.

  Args:
    stage_dirs: the stage's directory per seed.
    targets: pytrees with the saved variables' structure, per seed.
    run_fn: ``run_fn() -> [Trained]``, one per seed.
    mask_targets: the structure of the stage's saved masks per seed, or None when it
      saves none.

  Returns:
    One `Trained` per seed.
  """
  ckpts = [os.path.join(d, "variables") for d in stage_dirs]
  if all(checkpoint.exists(c) for c in ckpts):
    out = []
    for i, (d, c) in enumerate(zip(stage_dirs, ckpts)):
      logging.info("restoring finished stage %s", d)
      with checkpoint.quiet_logs():
        variables = jax.device_get(checkpoint.restore(c, targets[i]))
        masks = None if mask_targets is None else jax.device_get(
            checkpoint.restore(os.path.join(d, "masks"), mask_targets[i]))
      with open(os.path.join(d, "history.json")) as f:
        info = json.load(f)
      out.append(Trained(variables, info["history"], masks, info["best"]))
    return out
  results = run_fn()
  for d, c, r in zip(stage_dirs, ckpts, results):
    if checkpoint.exists(c):  # a seed finished earlier keeps its files
      continue
    os.makedirs(d, exist_ok=True)
    with checkpoint.quiet_logs():
      if r.masks is not None and mask_targets is not None:
        checkpoint.save(os.path.join(d, "masks"), r.masks)
    if parallel.is_main_process():
      reporting.write_json(os.path.join(d, "history.json"),
                           {"history": r.history, "best": r.best})
    with checkpoint.quiet_logs():
      checkpoint.save(c, r.variables)  # last: its presence marks the stage finished
  return results


_RECORD = "record.json"   # a stage's cached metrics record, in its directory


def saved_record(stage_dir: str) -> dict[str, Any] | None:
  """The record `record` cached in ``stage_dir`` (``record.json``), or None."""
  path = os.path.join(stage_dir, _RECORD)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def record(stage_dir: str, name: str, measure_fn: Callable[[], dict[str, Any]],
           show: Sequence[str] = ()) -> dict[str, Any]:
  """The stage's metrics record ``{"name": name, **measure_fn()}``, cached in its directory.

  Args:
    stage_dir: where ``record.json`` is kept (a rerun reads it instead of measuring).
    name: the stage's row label.
    measure_fn: measures the stage (called only when no record is cached).
    show: record keys to put in the "stage done" console line.
  """
  saved = saved_record(stage_dir)
  if saved is not None:
    return saved
  rec = {"name": name, **measure_fn()}
  logging.info("stage done: %s  %s", stage_dir, "  ".join(
      f"{k} {rec[k]:.4g}" for k in show if isinstance(rec.get(k), (int, float))))
  if parallel.is_main_process():
    reporting.write_json(os.path.join(stage_dir, _RECORD), rec)
  return rec


def write_report(workdir: str, records: list[dict[str, Any]], **kwargs: Any) -> None:
  """`reporting.write_report` from process 0 only (the other processes write nothing)."""
  if parallel.is_main_process():
    reporting.write_report(workdir, records, **kwargs)


def time_rows(records: list[dict[str, Any]], models: list[tuple[Any, Any]], sample,
              rounds: int, key: str = "latency") -> None:
  """Times one seed's rows in interleaved rounds (`training.interleaved_latency`).

  Each record gets ``<key>_ms`` (the median) and its latency relative to the teacher
  (the first row): ``<key>_vs_teacher``, the median per-round ratio, with its 10th and
  90th percentiles (``_lo``, ``_hi``) and ``<key>_noisy`` when they cover 1.

  Args:
    records: the seed's records, in the order of ``models``.
    models: ``(apply, variables)`` per record; the same jitted apply for rows of one
      architecture shares its compiled program.
    sample: the input batch timed.
    rounds: timed rounds.
    key: the records' key prefix (a study timing two batch sizes names them apart).
  """
  times = training.interleaved_latency([(apply, (v, sample)) for apply, v in models],
                                       rounds=rounds)
  for k, rec in enumerate(records):
    ratio = training.latency_ratio(times[:, k], times[:, 0])
    rec.update({f"{key}_ms": 1e3 * float(np.median(times[:, k])),
                f"{key}_vs_teacher": ratio["ratio"], f"{key}_vs_teacher_lo": ratio["lo"],
                f"{key}_vs_teacher_hi": ratio["hi"], f"{key}_noisy": ratio["noisy"]})


def latency_text(records: list[dict[str, Any]], key: str = "latency") -> str:
  """``"0.93x [0.88, 0.97]"``: the median per-round ratio to the teacher and its 10th and
  90th percentiles (of `time_rows`'s ``key``), averaged over seeds; ``" noisy"`` appended
  when they cover 1."""
  if not records or f"{key}_vs_teacher" not in records[0]:
    return "-"
  mean = lambda k: float(np.mean([r[f"{key}_vs_teacher{k}"] for r in records]))
  lo, mid, hi = mean("_lo"), mean(""), mean("_hi")
  if lo == mid == hi == 1.0:
    return "1 (reference)"
  return f"{mid:.2f}x [{lo:.2f}, {hi:.2f}]" + (" noisy" if lo <= 1.0 <= hi else "")
