"""Compression pipelines over one trained teacher: stages, their composition, the run.

A run trains the I/Q transformer teacher once per seed, then runs every pipeline of the
config on it. A pipeline is an ordered list of stages (data, not code):

* ``prune``: fine-tunes with `pruning.wrap` (gradual, Zhu & Gupta 2017, over the first
  half of the stage; or one-shot at its start).
* ``quantize``: quantization-aware fine-tuning with `quantization.wrap` (0 steps gives
  post-training quantization of the weights).
* ``distill``: trains with the Hinton et al. (2015) loss against the fp32 teacher, the
  student being the running compressed model (``distill``/``distill:inherit``) or the
  smaller ``config.student`` architecture (``distill:small``).
* ``finetune``: trains further with the plain task loss (keeping earlier constraints):
  the uncompressed control that separates what compression costs from extra training.

Every model is measured on the same frames, at fixed Es/N0 points (``eval.snr_points``):
SER with a 95% interval that counts frames, the Es/N0 each needs for SER 1e-1 and 1e-2
and its loss in dB against the teacher, modulation accuracy per point, beside the
classical references (LS, LMMSE, perfect CSI, a classifier that knows the channel).

Every later stage keeps the earlier constraints: the optimizer of stage ``i`` is the
stack of the wrappers of stages ``< i`` (earliest innermost; the prune stage's masks
are carried as state, saved beside its params, and the grid is re-derived from the
incoming on-grid weights at step 0) plus its own. So ``prune,quantize`` is
``quantization.wrap(pruning.wrap(adamw))`` (prune on float weights, then put the
survivors on the grid), and ``quantize,prune`` is ``pruning.wrap(quantization.wrap(
adamw))`` (prune the on-grid weights; zeros are on the grid).

Each stage's params and metrics record are written under
``workdir/seed_<s>/<pipeline>/<i>_<stage>/``; a rerun with the same workdir restores
finished stages instead of training them again, and resumes a stage that was interrupted
from its periodic checkpoints (``ckpt/`` beside them, every ``train.checkpoint_every``
steps). Training is data-parallel over ``train.num_devices`` devices (all by default, on
every host); with ``train.vmap_seeds`` all seeds train as one ``jax.vmap``-ed program
(their checkpoints under ``workdir/sweep_<seeds>/``). Updates from non-finite gradients
are skipped and counted (``nonfinite_steps`` in each record); ``train.max_nonfinite`` in
a row stop the run.

`validate` checks the whole config and resolves it into a typed `Plan` (one `StagePlan`
per stage of every pipeline) before any work; nothing below `run` reads the config. The
measurements and the report are in `compressjax.studies.wireless_measure`.
"""

import dataclasses
import functools
import os
import zlib
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from compressjax import allocation
from compressjax import distillation
from compressjax import quantization
from compressjax import reporting
from compressjax import training
from compressjax.channels import ChannelConfig
from compressjax.channels import constellations
from compressjax.models import iq_transformer
from compressjax.stages import carried_masks
from compressjax.stages import compose
from compressjax.stages import prune_plan
from compressjax.stages import PrunePlan
from compressjax.studies import engine
from compressjax.studies import wireless_budget as wb
from compressjax.studies import wireless_measure as wm
from compressjax.studies.wireless_measure import EvalPlan
from compressjax.training import parallel

STAGES = ("prune", "quantize", "distill", "finetune", "budget")
DISTILL_STUDENTS = ("inherit", "small")
PRUNE_OPTIONS = ("structured",)   # prune:structured removes whole heads and MLP units
_SHOW = ("ser_top", "accuracy", "nmse_db", "bytes")  # in the "stage done" console line
# The optimizer of every stage: AdamW on a cosine decay to this fraction of its peak.
_END_FRACTION = 0.05


class StagePlan(NamedTuple):
  """One stage of a pipeline, resolved.

  Attributes:
    kind: one of `STAGES`.
    option: ``distill``'s student (one of `DISTILL_STUDENTS`), else None.
    dirname: its directory under the pipeline's (``"3_distill"``).
    label: its row name after the pipeline's (``"3_distill:inherit"``).
    prefix: the stages up to it (``"prune:,quantize:,distill:inherit"``): a stage runs once
      per distinct prefix (pipelines that share it share its row), and its PRNG keys are
      folded from it.
    steps: training steps (``quantize`` with 0: post-training quantization).
    optimizer: its optimizer (AdamW), or None when it does not train (post-training
      quantization).
    model: the architecture it trains (the teacher's, or the student's from a
      ``distill:small`` stage on).
    from_init: starts from a fresh ``model`` (``distill:small``) instead of the previous
      stage's params (and then from no masks: a new architecture has its own).
    kd: trains on the Hinton et al. (2015) loss against the fp32 teacher (``distill``)
      instead of the task loss alone.
    constraints: the ``prune``/``quantize`` stages in force after it (earlier ones and its
      own, in order): the wrappers its optimizer stacks.
    prune: the pipeline's prune settings (the config's ``prune`` block; ``prune:structured``
      prunes whole heads and MLP units, `stages.COMPOSITE`'s ``"head+neuron"``).
    budget: a ``budget`` stage's target (`wireless_budget.BudgetPlan`), else None.
  """
  kind: str
  option: str | None
  dirname: str
  label: str
  prefix: str
  steps: int
  optimizer: engine.OptimizerPlan | None
  model: iq_transformer.IQTransformerConfig
  from_init: bool
  kd: bool
  constraints: tuple[str, ...]
  prune: PrunePlan
  budget: wb.BudgetPlan | None = None


class Plan(NamedTuple):
  """What a wireless config resolves to (nothing below `run` reads the config).

  Attributes:
    channel: the link every frame goes through.
    teacher: the teacher's architecture.
    student: the ``distill:small`` student's architecture.
    seeds: the seeds (each trains the teacher and every pipeline).
    train: how stages train (`engine.TrainPlan`).
    tasks: the tasks trained and measured.
    task_weights: loss weight per task (missing: 1).
    teacher_optimizer: the teacher's optimizer (AdamW, warm-up then a cosine decay to 5%).
    pipelines: pipeline name -> its stages, in order.
    prune: the prune block's settings (a ``prune:structured`` stage's are its `StagePlan`'s).
    spec: the quantize stage's quantizer (and the export's).
    temperature: the KD temperature.
    alpha: the KD soft-target weight.
    eval: how every model is measured.
    compare: () or the two pipelines whose final rows results.md compares seed by seed.
    size: the config's size (``cpu``, ``tiny``, ``full``), for the report.
  """
  channel: ChannelConfig
  teacher: iq_transformer.IQTransformerConfig
  student: iq_transformer.IQTransformerConfig
  seeds: tuple[int, ...]
  train: engine.TrainPlan
  tasks: tuple[str, ...]
  task_weights: dict[str, float]
  teacher_optimizer: engine.OptimizerPlan
  pipelines: dict[str, tuple[StagePlan, ...]]
  prune: PrunePlan
  spec: quantization.Spec
  temperature: float
  alpha: float
  eval: EvalPlan
  compare: tuple[str, ...]
  size: str = "-"


# ------------------------------------------------------------------------- validation


_check, _is_int = engine.check, engine.is_int


def _model_config(c: Any, channel: ChannelConfig, field: str) -> Any:
  try:
    return iq_transformer.IQTransformerConfig(
        **dict(c), seq_len=channel.seq_len, num_classes=len(channel.modulations),
        num_symbols=constellations.order(channel.modulation), num_taps=channel.tap_count,
        num_pilots=channel.num_pilots,
        # The front end's LMMSE prior: the deployment's mean tap powers.
        tap_powers=tuple(channel.tap_powers) if c.get("frontend") == "pilots" else None)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{field}: {e}") from None


def _parse(text: str, field: str) -> tuple[tuple[str, str | None], ...]:
  """Parses ``"prune,quantize,distill:small"`` into (kind, option) pairs."""
  stages = []
  for item in [s.strip() for s in text.split(",") if s.strip()]:
    kind, _, option = item.partition(":")
    if kind not in STAGES:
      raise ValueError(f"{field}: stage must be one of {STAGES}, got {kind!r}")
    if kind == "distill":
      option = option or "inherit"
      if option not in DISTILL_STUDENTS:
        raise ValueError(f"{field}: distill student must be one of {DISTILL_STUDENTS}, "
                         f"got {option!r}")
    elif kind == "budget":
      wb.parse(option, field)
    elif kind == "prune" and option:
      if option not in PRUNE_OPTIONS:
        raise ValueError(f"{field}: prune option must be one of {PRUNE_OPTIONS}, got "
                         f"{option!r}")
    elif option:
      raise ValueError(f"{field}: stage {kind!r} takes no option, got {item!r}")
    stages.append((kind, option or None))
  return tuple(stages)


def _pipeline(stages: tuple[tuple[str, str | None], ...], config: Any,
              teacher: iq_transformer.IQTransformerConfig,
              student: iq_transformer.IQTransformerConfig,
              teacher_optimizer: engine.OptimizerPlan, prune: PrunePlan,
              field: str) -> tuple[StagePlan, ...]:
  """Resolves one pipeline's stages (their blocks are checked already)."""
  plans, constraints, model = [], (), teacher
  _check(sum(k == "prune" for k, _ in stages) <= 1 and sum(k == "quantize" for k, _ in stages)
         <= 1, field, ",".join(k + (f":{o}" if o else "") for k, o in stages),
         "at most one prune and one quantize stage")
  if ("prune", "structured") in stages:
    prune = prune._replace(structure="head+neuron")
  kinds = [k for k, _ in stages]
  _check("budget" not in kinds[:-1] and (kinds.count("budget") == 0 or len(kinds) == 1),
         field, ",".join(kinds), "a budget stage alone (it allocates, applies and fine-tunes "
         "the teacher with QAT and KD in one stage)")
  for i, (kind, option) in enumerate(stages):
    c = config[kind]
    steps = c.steps
    opt = None
    if not (kind == "quantize" and steps == 0):
      opt = engine.OptimizerPlan("adamw", float(c.learning_rate), max(steps, 1), 0,
                                 float(config.train.weight_decay), _END_FRACTION)
    from_init = kind == "distill" and option == "small"
    if from_init:
      # A fresh student is trained from scratch: the teacher's budget and schedule.
      model, steps, opt = student, teacher_optimizer.steps, teacher_optimizer
    if kind in ("prune", "quantize"):
      constraints += (kind,)
    dirname = f"{i + 1}_{kind}"
    plans.append(StagePlan(
        kind=kind, option=option, dirname=dirname,
        label=dirname + (f":{option}" if option else ""),
        prefix=",".join(f"{k}:{o or ''}" for k, o in stages[:i + 1]), steps=steps,
        optimizer=opt, model=model, from_init=from_init, kd=kind in ("distill", "budget"),
        constraints=constraints, prune=prune,
        budget=wb.parse(option, field, *wb.check(config.budget)) if kind == "budget"
        else None))
  return tuple(plans)


def validate(config: Any) -> Plan:
  """Checks every field a run uses and resolves the config; raises before any work.

  Args:
    config: an ``ml_collections.ConfigDict`` shaped like ``experiments/common.py``.

  Returns:
    The resolved `Plan`.

  Raises:
    ValueError: naming the field, its value and what is allowed.
  """
  try:
    channel = ChannelConfig(**dict(config.channel))
  except TypeError as e:
    raise ValueError(f"channel: {e}") from None
  except ValueError as e:
    raise ValueError(f"channel.{e}") from None
  teacher = _model_config(config.teacher, channel, "teacher")
  student = _model_config(config.student, channel, "student")
  seeds = engine.check_seeds(config.seeds)
  t = config.train
  _check(_is_int(t.steps, 1), "train.steps", t.steps, "an int >= 1")
  _check(_is_int(t.warmup_steps, 0) and t.warmup_steps < t.steps, "train.warmup_steps",
         t.warmup_steps, f"an int in [0, train.steps={t.steps})")
  _check(isinstance(t.weight_decay, (int, float)) and not isinstance(t.weight_decay, bool)
         and t.weight_decay >= 0 and np.isfinite(t.weight_decay), "train.weight_decay",
         t.weight_decay, "a finite number >= 0")
  train = engine.train_plan(t)
  # The compute dtype is the architectures' (params and optimizer state stay float32).
  teacher = dataclasses.replace(teacher, dtype=train.compute_dtype)
  student = dataclasses.replace(student, dtype=train.compute_dtype)
  try:
    training.multitask.check_tasks(t.tasks)
  except ValueError as e:
    raise ValueError(f"train.{e}") from None
  w = t.get("task_weights", {})
  _check(all(k in training.multitask.TASKS for k in w)
         and all(isinstance(v, (int, float)) and v >= 0 and np.isfinite(v) for v in w.values()),
         "train.task_weights", dict(w), f"a dict from tasks {training.multitask.TASKS} to "
         "finite weights >= 0")
  for field, m in (("teacher", teacher), ("student", student)):
    _check(m.frontend == "raw" or "modulation" not in t.tasks or channel.modulation_pilots,
           f"{field}.frontend", m.frontend, "'raw' when the modulation task is blind "
           "(the 'pilots' front end needs channel.modulation_pilots=True)")
  for name in ("train",) + STAGES:
    lr = config[name].learning_rate
    _check(isinstance(lr, (int, float)) and lr > 0 and np.isfinite(lr),
           f"{name}.learning_rate", lr, "a finite number > 0")
  for name in STAGES:
    _check(_is_int(config[name].steps, 0 if name == "quantize" else 1), f"{name}.steps",
           config[name].steps, ">= 1 (quantize: >= 0, 0 is post-training quantization)")
  prune = prune_plan(config.prune)
  try:
    spec = quantization.Spec(bits=config.quantize.bits, symmetric=config.quantize.symmetric,
                             granularity=config.quantize.granularity)
  except (TypeError, ValueError) as e:
    raise ValueError(f"quantize: {e}") from None
  d = config.distill
  temperature, alpha = engine.check_kd(d)
  e = config.eval
  for f in ("batch_size", "frames_per_point", "latency_batch", "latency_repeats"):
    _check(_is_int(e[f], 1), f"eval.{f}", e[f], "an int >= 1")
  _check(e.frames_per_point % e.batch_size == 0, "eval.frames_per_point", e.frames_per_point,
         f"a multiple of eval.batch_size={e.batch_size}")
  points = tuple(e.snr_points)
  _check(len(points) >= 2 and all(isinstance(p, (int, float)) and np.isfinite(p)
                                  for p in points)
         and all(a < b for a, b in zip(points, points[1:])),
         "eval.snr_points", e.snr_points, "at least two increasing finite numbers (dB)")
  _check(isinstance(e.high_snr_db, (int, float)), "eval.high_snr_db", e.high_snr_db,
         "a number (dB)")
  compare = tuple(config.get("compare", ()))
  _check(len(compare) in (0, 2) and all(c in config.pipelines for c in compare), "compare",
         compare, f"() or two pipeline names from {tuple(config.pipelines)}")
  teacher_optimizer = engine.OptimizerPlan("adamw", float(t.learning_rate), t.steps,
                                           t.warmup_steps, float(t.weight_decay),
                                           _END_FRACTION)
  pipelines = {}
  for name, text in config.pipelines.items():
    _check(isinstance(text, str), f"pipelines.{name}", text,
           f"a comma-separated string of stages from {STAGES}")
    stages = _parse(text, f"pipelines.{name}")
    _check(len(stages) > 0, f"pipelines.{name}", text, f"at least one stage of {STAGES}")
    pipelines[name] = _pipeline(stages, config, teacher, student, teacher_optimizer, prune,
                                f"pipelines.{name}")
  _check_budgets(pipelines, teacher)
  return Plan(
      channel=channel, teacher=teacher, student=student, seeds=seeds,
      train=train,
      tasks=tuple(t.tasks), task_weights=dict(w), teacher_optimizer=teacher_optimizer,
      pipelines=pipelines, prune=prune, spec=spec, temperature=temperature,
      alpha=alpha,
      eval=EvalPlan(tuple(float(p) for p in points), e.frames_per_point, e.batch_size,
                    e.latency_batch, e.latency_repeats, float(e.high_snr_db)),
      compare=compare, size=str(config.get("size", "-")))


def _check_budgets(pipelines: dict[str, tuple[StagePlan, ...]],
                   teacher: iq_transformer.IQTransformerConfig) -> None:
  """Every budget stage's budget is at least the smallest export its choices allow."""
  targets = {name: st[0].budget for name, st in pipelines.items() if st[0].budget}
  if not targets:
    return
  shapes = jax.eval_shape(lambda: iq_transformer.init_params(teacher, jax.random.key(0)))
  fp32 = wm.float_nbytes(jax.tree.map(lambda x: np.ones(x.shape, x.dtype), shapes))
  for name, b in targets.items():
    least = wb.smallest(wb.costs(teacher, b))
    _check(fp32 / b.denominator >= least, f"pipelines.{name}", f"budget:{b.denominator:g}"
           + ("u" if b.uniform else ""), f"a budget of at least the smallest export, "
           f"{least:,} bytes (1/{fp32 / least:.1f} of the teacher's {fp32:,} float32 bytes)")


# ------------------------------------------------------------------------------- the run


def _model(cfg):
  return iq_transformer.IQTransformer(cfg)


def _train(plan, name, model_cfg, inits, txs, steps, keys, ckpt_dir, teacher=None):
  """Trains a group of models (one per seed) with ``txs`` for ``steps``; KD if ``teacher``.

  Args:
    plan: the study's `Plan`.
    name: the progress lines' tag.
    model_cfg: the architecture trained.
    inits: the group's initial params, one per seed (two or more: one vmapped program).
    txs: the optimizer per seed.
    steps: training steps.
    keys: their PRNG keys.
    ckpt_dir: where the run's periodic checkpoints go (it resumes from them).
    teacher: the teacher's params per seed to distil from (KD loss), or None.

  Returns:
    One `engine.Trained` per seed (``variables``: the params).
  """
  weights = plan.task_weights
  if teacher is None:
    loss_fn = lambda o, b: training.task_losses(o, b, weights)
    kd_teacher = None
  else:
    kd = functools.partial(distillation.kd_loss, temperature=plan.temperature,
                           alpha=plan.alpha)
    loss_fn = lambda o, b, tv: training.kd_task_losses(o, b, tv, kd, weights)
    kd_teacher = engine.Teacher(training.multitask_forward(_model(plan.teacher).apply),
                                [{"params": p} for p in teacher])
  return engine.train_group(
      plan.train, name, forward=training.multitask_forward(_model(model_cfg).apply),
      loss_fn=loss_fn, data_fn=training.multitask_data_fn(plan.channel, plan.train.batch_size,
                                                          plan.tasks),
      inits=inits, txs=txs, keys=keys, steps=steps, ckpt_dir=ckpt_dir, teacher=kd_teacher,
      to_variables=lambda s: s.params, show=("loss", "modulation/accuracy", "symbols/ser"))


def run_group(plan: Plan, workdir: str, seeds: tuple[int, ...], eval_batches: list,
              refs: dict) -> list[dict[str, Any]]:
  """Trains the teachers of ``seeds`` and runs every pipeline on them; returns the records.

  With several seeds every stage trains them together, ``jax.vmap``-ed in one program.
  """
  roots = [os.path.join(workdir, f"seed_{s}") for s in seeds]
  # Periodic checkpoints of a stage in training: in its own directory for one seed, in a
  # directory of the group for a vmapped sweep (its state stacks every seed's).
  ckpt_root = lambda rel: (os.path.join(roots[0], rel, "ckpt") if len(seeds) == 1 else
                           os.path.join(workdir, "sweep_" + "-".join(map(str, seeds)), rel,
                                        "ckpt"))
  tag = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds}"
  init_keys, train_keys, stage_keys = zip(*[jax.random.split(jax.random.key(s), 3)
                                            for s in seeds])
  teacher_init = [iq_transformer.init_params(plan.teacher, k) for k in init_keys]
  tx = engine.optimizer(plan.teacher_optimizer)
  teacher_dirs = [os.path.join(r, "teacher") for r in roots]
  done_teachers = engine.restore_or_run(teacher_dirs, teacher_init, lambda: _train(
      plan, f"{tag} teacher", plan.teacher, teacher_init, [tx] * len(seeds),
      plan.teacher_optimizer.steps, list(train_keys), ckpt_root("teacher")))
  teachers = [r.variables for r in done_teachers]

  def with_refs(rec):
    if "ser" in rec:
      rec = {**rec, "ser": {**rec["ser"], **refs["ser"]}}
    if "accuracy_curve" in rec:
      rec = {**rec, "accuracy_curve": {**rec["accuracy_curve"], **refs["accuracy"]}}
    return rec

  def measured(d, label, result, model_cfg, spec, where=None, extra=None):
    return with_refs(engine.record(d, label, lambda: {**wm.measure(
        plan.eval, plan.channel, model_cfg, result.variables, eval_batches, spec, where),
        "nonfinite_steps": engine.nonfinite_steps(result.history), **(extra or {})}, _SHOW))

  records = [[measured(d, "teacher", r, plan.teacher, None)]
             for d, r in zip(teacher_dirs, done_teachers)]
  # (architecture, params per seed, (spec, where) per seed) of every row, for its served
  # form's timing.
  timed = [(plan.teacher, teachers, [(None, None)] * len(seeds))]
  budget_sens = {}   # seed index -> the teacher's layer sensitivities (budget stages)
  # A stage is run once per distinct prefix of stages: "prune" is the first stage of
  # "prune,quantize,distill" too, and its row is shared (its randomness comes from the
  # prefix, not the pipeline's name).
  done = {}
  for name, stages in plan.pipelines.items():
    params = teachers
    # The prune stage's masks, carried as state into every later stage (never re-derived).
    masks = [None] * len(seeds)
    for stage in stages:
      label = f"{name}/{stage.label}"
      if stage.prefix in done:
        params, masks, recs, specs = done[stage.prefix]
        for rec, r in zip(records, recs):
          rec.append({**r, "name": label, "same_as": r["name"]})
        timed.append((stage.model, params, specs))
        continue
      rel = os.path.join(name, stage.dirname)
      stage_dirs = [os.path.join(r, rel) for r in roots]
      keys_i = [jax.random.fold_in(k, zlib.crc32(stage.prefix.encode()) % (2 ** 31))
                for k in stage_keys]
      if stage.from_init:
        params = [iq_transformer.init_params(stage.model, jax.random.fold_in(k, 1))
                  for k in keys_i]
        masks = [None] * len(seeds)   # another architecture: its own masks at step 0
      fresh = stage.kind if stage.kind in ("prune", "quantize") else None
      start = params
      quantized = "quantize" in stage.constraints
      specs = [(plan.spec if quantized else None, None)] * len(seeds)
      extras = [None] * len(seeds)
      if stage.kind == "budget":
        bplans = [_budget_plan(plan, stage, start[j], records[j][0]["bytes"], j, stage_keys[j],
                               budget_sens, stage_dirs[j]) for j in range(len(seeds))]
        specs = [(bp.spec, bp.selects) for bp, _ in bplans]
        extras = [wb.summary(bp, budget) for bp, budget in bplans]
        opt = engine.optimizer(stage.optimizer)
        # Each seed's plan has its own bit widths (static): the seeds train one by one.
        run = lambda start=start, stage=stage, bplans=bplans, keys_i=keys_i, rel=rel, \
            label=label, opt=opt: [_train(
                plan, f"seed {seeds[j]} {label}", stage.model,
                [allocation.apply(start[j], bp)], [wb.optimizer(opt, bp)], stage.steps,
                [keys_i[j]], os.path.join(roots[j], rel, "ckpt"), [teachers[j]])[0]
                for j, (bp, _) in enumerate(bplans)]
      elif stage.optimizer is None:   # post-training quantization of the running model
        run = lambda start=start, stage=stage, masks=masks: [engine.Trained(
            jax.device_get(quantization.quantize_tree(_start_on_constraints(
                p, stage.constraints[:-1], stage.prune, plan.spec, m), plan.spec)),
            [], m, None) for p, m in zip(start, masks)]
      else:
        opt = engine.optimizer(stage.optimizer)
        txs = [compose(opt, stage.constraints, stage.prune, plan.spec, fresh=fresh,
                       steps=stage.steps, masks=m)
               for m in masks]
        run = lambda start=start, stage=stage, txs=txs, keys_i=keys_i, rel=rel, \
            label=label: _train(plan, f"{tag} {label}", stage.model, start, txs, stage.steps,
                                keys_i, ckpt_root(rel), teachers if stage.kd else None)
      mask_targets = None
      if stage.kind == "prune":
        mask_targets = [carried_masks(compose(optax.identity(), ("prune",), stage.prune,
                                              plan.spec).init(p)) for p in start]
      results = engine.restore_or_run(stage_dirs, start, run, mask_targets)
      params = [r.variables for r in results]
      if stage.kind == "prune":
        masks = [r.masks for r in results]
      for rec, d, r, (spec, where), extra in zip(records, stage_dirs, results, specs, extras):
        rec.append(measured(d, label, r, stage.model, spec, where, extra))
      done[stage.prefix] = (params, masks, [rec[-1] for rec in records], specs)
      timed.append((stage.model, params, specs))
  # Every row's served form, timed with the teacher in the same rounds, at the eval batch
  # and at eval.latency_batch frames.
  samples = {"latency": wm.latency_sample(plan.eval, eval_batches),
             "latency1": wm.latency_sample(plan.eval, eval_batches, plan.eval.latency_batch)}
  for j, recs in enumerate(records):
    served = [wm.served(m, ps[j], *sw[j]) for m, ps, sw in timed]
    for key, sample in samples.items():
      engine.time_rows(recs, [(s.apply, s.variables) for s in served], sample,
                       plan.eval.latency_repeats, key)
  for seed, recs in zip(seeds, records):
    for r in recs:
      r["seed"] = seed
  return [r for recs in records for r in recs]


def _budget_plan(plan: Plan, stage: StagePlan, params: Any, teacher_bytes: int, j: int,
                 key: Any, cache: dict, stage_dir: str) -> tuple[Any, int]:
  """A budget stage's `allocation.Plan` for one seed, and its budget in bytes.

  The sensitivities are measured once per seed (every budget stage starts from the
  teacher) on ``budget.sensitivity_batches`` simulated training batches; a finished stage's
  plan is read back from its record instead.
  """
  rec = engine.saved_record(stage_dir)
  if rec is not None and "allocation" in rec:   # finished: its plan, not a new measurement
    return wb.from_record(rec)
  if j not in cache:
    fwd = training.multitask_forward(_model(stage.model).apply)
    data_fn = training.multitask_data_fn(plan.channel, plan.train.batch_size, plan.tasks)
    b = stage.budget
    cache[j] = (wb.costs(stage.model, b), wb.sensitivity(
        params, b, fwd, data_fn, jax.random.fold_in(key, 7), plan.task_weights))
  costs, sens = cache[j]
  budget = int(teacher_bytes / stage.budget.denominator)
  return wb.choose(costs, sens, budget, stage.budget.uniform), budget


def _start_on_constraints(params, kinds, prune, spec, masks=None):
  """Params after one zero-gradient step of the constraint stack (``masks`` carried)."""
  if not kinds:
    return params
  tx = compose(optax.sgd(0.0), kinds, prune, spec, masks=masks)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  return optax.apply_updates(params, updates)


def _header(plan: Plan) -> list[tuple[str, Any]]:
  """The run's facts for the top of results.md."""
  ch, e = plan.channel, plan.eval
  steps = [f"teacher {plan.teacher_optimizer.steps}"]
  for name, stages in plan.pipelines.items():
    steps.append(f"{name}: " + ", ".join(f"{s.label} {s.steps}" for s in stages))
  return [("study", "wireless"), ("size", plan.size),
          ("tasks", ", ".join(plan.tasks)),
          ("channel", f"{ch.modulation} symbols ({len(ch.modulations)} modulation classes), "
                      f"{ch.profile} profile, {ch.seq_len} samples per frame, "
                      f"{ch.num_pilots}-symbol preamble"),
          ("training Es/N0", f"{ch.snr_db} dB"),
          ("ADC", "none (ideal samples)" if not ch.adc_bits else
                  f"{ch.adc_bits} bits per I and Q, AGC to the frame's RMS, clipped at "
                  f"{ch.effective_adc_clip:.3g} x RMS"),
          ("evaluated at", f"Es/N0 = {e.snr_points[0]:g} to {e.snr_points[-1]:g} dB, "
                           f"{len(e.snr_points)} points, {e.frames_per_point} frames per task "
                           f"per point"),
          ("steps per stage", "; ".join(steps) + f" (batch {plan.train.batch_size} frames "
                                                 f"per task)"),
          ("seeds", ", ".join(map(str, plan.seeds))),
          ("device", f"{len(jax.devices())} x {jax.devices()[0].device_kind}")]


def run(config: Any, workdir: str) -> list[dict[str, Any]]:
  """Runs the whole study of ``config`` in ``workdir``; returns the stage records.

  Writes ``metrics.json`` (every record), ``results.md`` (one row per stage; the mean
  and standard deviation over seeds when there are several) and the plots.
  """
  plan = validate(config)
  os.makedirs(workdir, exist_ok=True)
  logging.info("devices: %s", jax.devices())
  eval_batches = wm.evaluation_set(plan.eval, plan.channel, plan.tasks)
  refs = wm.references(plan.eval, plan.channel, plan.tasks, eval_batches)
  seeds = plan.seeds
  groups = [seeds] if plan.train.vmap_seeds else [(s,) for s in seeds]
  records = []
  for group in groups:
    records += run_group(plan, workdir, group, eval_batches, refs)
  teacher_bytes = {r["seed"]: r["bytes"] for r in records if r["name"] == "teacher"}
  for r in records:
    r["compression"] = teacher_bytes[r["seed"]] / r["bytes"]
    if r.get("bytes_entropy"):
      r["compression_entropy"] = teacher_bytes[r["seed"]] / r["bytes_entropy"]
  wm.add_losses(records)
  table = (reporting.aggregate(records, wm.COLUMNS) if len(seeds) > 1 else
           [dict(r) for r in records])
  for row in table:
    same = [r for r in records if r["name"] == row["name"]]
    row["latency_text"] = engine.latency_text(same)
    row["latency1_text"] = engine.latency_text(same, "latency1")
    row["served"] = same[0].get("served", "-")
  if not parallel.is_main_process():
    return records
  reporting.write_json(os.path.join(workdir, "references.json"), refs)
  final_rows = {name: f"{name}/{stages[-1].label}" for name, stages in plan.pipelines.items()}
  ch = plan.channel
  engine.write_report(workdir, records, table=table, columns=wm.COLUMNS,
                      class_names=list(ch.modulations),
                      title=f"compressjax: seeds {seeds}",
                      footer=wm.footer(plan.eval, refs, records, table, plan.compare,
                                       final_rows) + wb.footer(records),
                      header=_header(plan), legend=wm.legend(plan.eval),
                      context=f"{ch.modulation}, {ch.profile} channel, {ch.seq_len} samples",
                      finals=["teacher"] + list(final_rows.values()),
                      pareto_label="modulation accuracy",
                      paretos=[(f"loss_db_{t:.0e}", f"loss in dB at SER {t:g} against the "
                                f"teacher", True) for t in wm.SER_TARGETS])
  return records
