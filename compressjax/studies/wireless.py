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
"""

import functools
import os
import zlib
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import optax

from compressjax import distillation
from compressjax import quantization
from compressjax import reporting
from compressjax import training
from compressjax.measurement import COLUMNS
from compressjax.measurement import add_losses
from compressjax.measurement import evaluation_set
from compressjax.measurement import footer
from compressjax.measurement import measure
from compressjax.measurement import references
from compressjax.models import iq_transformer
from compressjax.stages import carried_masks
from compressjax.stages import compose
from compressjax.stages import Setup
from compressjax.stages import validate
from compressjax.studies import engine
from compressjax.training import parallel

_SHOW = ("ser_top", "accuracy", "nmse_db", "bytes")  # in the "stage done" console line

def _optimizer(lr: float, steps: int, weight_decay: float, warmup: int = 0):
  """AdamW with a cosine decay to 5% of ``lr`` (after a linear warm-up, if any)."""
  return engine.optimizer(engine.OptimizerPlan("adamw", lr, steps, warmup, weight_decay,
                                               end_fraction=0.05))


def _model(cfg):
  return iq_transformer.IQTransformer(cfg)


def train_plan(config) -> engine.TrainPlan:
  """The study's `engine.TrainPlan` (its ``train`` block)."""
  t = config.train
  return engine.TrainPlan(t.batch_size, t.log_every, t.checkpoint_every, t.keep_checkpoints,
                          t.max_nonfinite, t.num_devices, t.vmap_seeds)


def _train(config, setup, name, model_cfg, inits, txs, steps, keys, ckpt_dir, teacher=None):
  """Trains a group of models (one per seed) with ``txs`` for ``steps``; KD if ``teacher``.

  Args:
    inits: the group's initial params, one per seed (two or more: one vmapped program).
    txs: the optimizer per seed.
    keys: their PRNG keys.
    ckpt_dir: where the run's periodic checkpoints go (it resumes from them).
    teacher: ``(teacher_cfg, [teacher params per seed])`` or None.

  Returns:
    One `engine.Trained` per seed (``variables``: the params).
  """
  t = config.train
  weights = dict(t.get("task_weights", {}))
  if teacher is None:
    loss_fn = lambda o, b: training.task_losses(o, b, weights)
    kd_teacher = None
  else:
    kd = functools.partial(distillation.kd_loss, temperature=config.distill.temperature,
                           alpha=config.distill.alpha)
    loss_fn = lambda o, b, tv: training.kd_task_losses(o, b, tv, kd, weights)
    kd_teacher = engine.Teacher(training.multitask_forward(_model(teacher[0]).apply),
                                [{"params": p} for p in teacher[1]])
  return engine.train_group(
      train_plan(config), name, forward=training.multitask_forward(_model(model_cfg).apply),
      loss_fn=loss_fn, data_fn=training.multitask_data_fn(setup.channel, t.batch_size,
                                                          tuple(t.tasks)),
      inits=inits, txs=txs, keys=keys, steps=steps, ckpt_dir=ckpt_dir, teacher=kd_teacher,
      to_variables=lambda s: s.params, show=("loss", "modulation/accuracy", "symbols/ser"))


def run_group(config: Any, setup: Setup, workdir: str, seeds: tuple[int, ...],
              eval_batches: list, refs: dict) -> list[dict[str, Any]]:
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
  t = config.train
  init_keys, train_keys, stage_keys = zip(*[jax.random.split(jax.random.key(s), 3)
                                            for s in seeds])
  teacher_init = [iq_transformer.init_params(setup.teacher, k) for k in init_keys]
  tx = _optimizer(t.learning_rate, t.steps, t.weight_decay, t.warmup_steps)
  teacher_dirs = [os.path.join(r, "teacher") for r in roots]
  done_teachers = engine.restore_or_run(teacher_dirs, teacher_init, lambda: _train(
      config, setup, f"{tag} teacher", setup.teacher, teacher_init, [tx] * len(seeds),
      t.steps, list(train_keys), ckpt_root("teacher")))
  teachers = [r.variables for r in done_teachers]

  def with_refs(rec):
    if "ser" in rec:
      rec = {**rec, "ser": {**rec["ser"], **refs["ser"]}}
    if "accuracy_curve" in rec:
      rec = {**rec, "accuracy_curve": {**rec["accuracy_curve"], **refs["accuracy"]}}
    return rec

  records = [[with_refs(engine.record(d, "teacher", lambda r=r: {**measure(
      config, setup, setup.teacher, r.variables, eval_batches, quantized=False),
      "nonfinite_steps": engine.nonfinite_steps(r.history)}, _SHOW))]
             for d, r in zip(teacher_dirs, done_teachers)]
  # A stage is run once per distinct prefix of stages: "prune" is the first stage of
  # "prune,quantize,distill" too, and its row is shared (its randomness comes from the
  # prefix, not the pipeline's name).
  done = {}
  for name, stages in setup.pipelines.items():
    params, model_cfg, kinds = teachers, setup.teacher, ()
    # The prune stage's masks, carried as state into every later stage (never re-derived).
    masks = [None] * len(seeds)
    for i, stage in enumerate(stages):
      label = f"{name}/{i + 1}_{stage.kind}" + (f":{stage.option}" if stage.option else "")
      prefix = ",".join(f"{x.kind}:{x.option or ''}" for x in stages[:i + 1])
      if prefix in done:
        params, masks, model_cfg, kinds, recs = done[prefix]
        for rec, r in zip(records, recs):
          rec.append({**r, "name": label, "same_as": r["name"]})
        continue
      rel = os.path.join(name, f"{i + 1}_{stage.kind}")
      stage_dirs = [os.path.join(r, rel) for r in roots]
      keys_i = [jax.random.fold_in(k, zlib.crc32(prefix.encode()) % (2 ** 31))
                for k in stage_keys]
      c = config[stage.kind]
      steps, opt = c.steps, _optimizer(c.learning_rate, max(c.steps, 1), t.weight_decay)
      teacher_pair = None
      if stage.kind == "distill":
        teacher_pair = (setup.teacher, teachers)
        if stage.option == "small":
          # A fresh student is trained from scratch: the teacher's budget and schedule.
          model_cfg = setup.student
          params = [iq_transformer.init_params(model_cfg, jax.random.fold_in(k, 1))
                    for k in keys_i]
          masks = [None] * len(seeds)   # another architecture: its own masks at step 0
          steps = t.steps
          opt = _optimizer(t.learning_rate, t.steps, t.weight_decay, t.warmup_steps)
      fresh = stage.kind if stage.kind in ("prune", "quantize") else None
      kinds = kinds + ((stage.kind,) if fresh else ())
      txs = [compose(opt, kinds, setup.prune, setup.spec, fresh=fresh, steps=steps,
                   masks=m)
             for m in masks]
      start, cfg_i = params, model_cfg
      if stage.kind == "quantize" and c.steps == 0:
        run = lambda start=start, kinds=kinds, masks=masks: [engine.Trained(
            jax.device_get(quantization.quantize_tree(
                _start_on_constraints(p, kinds[:-1], config, setup, m), setup.spec)),
            [], m, None) for p, m in zip(start, masks)]
      else:
        run = lambda start=start, cfg_i=cfg_i, txs=txs, steps=steps, tp=teacher_pair, \
            keys_i=keys_i, rel=rel, label=label: _train(
                config, setup, f"{tag} {label}", cfg_i, start, txs, steps, keys_i,
                ckpt_root(rel), tp)
      mask_targets = None
      if stage.kind == "prune":
        mask_targets = [carried_masks(compose(optax.identity(), ("prune",), setup.prune,
                                              setup.spec).init(p)) for p in start]
      results = engine.restore_or_run(stage_dirs, start, run, mask_targets)
      params = [r.variables for r in results]
      if stage.kind == "prune":
        masks = [r.masks for r in results]
      quantized = "quantize" in kinds
      for rec, d, r in zip(records, stage_dirs, results):
        rec.append(with_refs(engine.record(d, label, lambda r=r, m=model_cfg, q=quantized: {
            **measure(config, setup, m, r.variables, eval_batches, q),
            "nonfinite_steps": engine.nonfinite_steps(r.history)}, _SHOW)))
      done[prefix] = (params, masks, model_cfg, kinds, [rec[-1] for rec in records])
  for seed, recs in zip(seeds, records):
    for r in recs:
      r["seed"] = seed
  return [r for recs in records for r in recs]


def _start_on_constraints(params, kinds, config, setup, masks=None):
  """Params after one zero-gradient step of the constraint stack (``masks`` carried)."""
  if not kinds:
    return params
  tx = compose(optax.sgd(0.0), kinds, setup.prune, setup.spec, masks=masks)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  return optax.apply_updates(params, updates)


def run(config: Any, workdir: str) -> list[dict[str, Any]]:
  """Runs the whole study of ``config`` in ``workdir``; returns the stage records.

  Writes ``metrics.json`` (every record), ``results.md`` (one row per stage; the mean
  and standard deviation over seeds when there are several) and the plots.
  """
  setup = validate(config)
  os.makedirs(workdir, exist_ok=True)
  logging.info("devices: %s", jax.devices())
  eval_batches = evaluation_set(config, setup)
  refs = references(config, setup, eval_batches)
  seeds = tuple(config.seeds)
  groups = [seeds] if config.train.vmap_seeds else [(s,) for s in seeds]
  records = []
  for group in groups:
    records += run_group(config, setup, workdir, group, eval_batches, refs)
  teacher_bytes = {r["seed"]: r["bytes"] for r in records if r["name"] == "teacher"}
  for r in records:
    r["compression"] = teacher_bytes[r["seed"]] / r["bytes"]
  add_losses(records)
  table = reporting.aggregate(records, COLUMNS) if len(config.seeds) > 1 else records
  if not parallel.is_main_process():
    return records
  reporting.write_json(os.path.join(workdir, "references.json"), refs)
  engine.write_report(workdir, records, table=table, columns=COLUMNS,
                         class_names=list(setup.channel.modulations),
                         title=f"compressjax: seeds {tuple(config.seeds)}",
                         footer=footer(config, refs, records, table))
  return records
