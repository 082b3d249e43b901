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

Every later stage keeps the earlier constraints: the optimizer of stage ``i`` is the
stack of the wrappers of stages ``< i`` (earliest innermost, masks and grid re-derived
from the incoming weights at step 0) plus its own. So ``prune,quantize`` is
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

import contextlib
import functools
import json
import os
import zlib
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from compressjax import distillation
from compressjax import quantization
from compressjax import reporting
from compressjax import selection
from compressjax import training
from compressjax.models import iq_transformer
from compressjax.stages import compose
from compressjax.stages import Setup
from compressjax.stages import validate
from compressjax.training import checkpoint
from compressjax.training import parallel

_EVAL_KEY = 20261123  # fixed: every stage and every seed is measured on the same frames


def _optimizer(lr: float, steps: int, weight_decay: float, warmup: int = 0):
  """AdamW with a cosine decay to 5% of ``lr`` (after a linear warm-up, if any)."""
  if warmup:
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, lr * 0.05)
  else:
    sched = optax.cosine_decay_schedule(lr, steps, 0.05)
  return optax.adamw(sched, weight_decay=weight_decay)


def _model(cfg):
  return iq_transformer.IQTransformer(cfg)


def _data_fn(config, setup):
  return training.multitask_data_fn(setup.channel, config.train.batch_size,
                                    tuple(config.train.tasks))


def _train(config, setup, name, model_cfg, inits, tx, steps, keys, ckpt_dir, teacher=None):
  """Trains a group of models (one per seed) with ``tx`` for ``steps``; KD if ``teacher``.

  Args:
    inits: the group's initial params, one per seed; two or more run as one
      ``jax.vmap``-ed program (``train.vmap_seeds``).
    keys: their PRNG keys.
    ckpt_dir: where the run's periodic checkpoints go (it resumes from them).
    teacher: ``(teacher_cfg, [teacher params per seed])`` or None.

  Returns:
    ``(final params per seed, history per seed)``.
  """
  t = config.train
  forward = training.multitask_forward(_model(model_cfg).apply)
  if teacher is None:
    loss_fn, teacher_forward = training.task_losses, None
  else:
    kd = functools.partial(distillation.kd_loss, temperature=config.distill.temperature,
                           alpha=config.distill.alpha)
    loss_fn = lambda o, b, tv: training.kd_task_losses(o, b, tv, kd)
    teacher_forward = training.multitask_forward(_model(teacher[0]).apply)
  mesh = parallel.make_mesh(t.num_devices)
  data_fn = parallel.shard_data_fn(_data_fn(config, setup), mesh, t.batch_size)
  # Skip (and count) updates from non-finite gradients; the loop stops a run that keeps
  # producing them (train.max_nonfinite in a row), so NaN never reaches the weights.
  tx = optax.apply_if_finite(tx, max_consecutive_errors=2 ** 30)
  sweep = len(inits) > 1
  group = lambda trees: training.stack(trees) if sweep else trees[0]
  state = group([training.create_train_state(p, tx, k) for p, k in zip(inits, keys)])
  state = parallel.replicate(state, mesh)
  step_args = () if teacher is None else (parallel.replicate({"params": group(teacher[1])},
                                                             mesh),)
  step = training.make_train_step(forward, tx, loss_fn, data_fn,
                                  teacher_forward=teacher_forward, mesh=mesh, vmap=sweep)
  ckpts = (training.RunCheckpoints(ckpt_dir, t.checkpoint_every, t.keep_checkpoints)
           if t.checkpoint_every else contextlib.nullcontext())
  with ckpts as c:
    state, history = training.train(
        state, step, steps, log_every=min(t.log_every, steps), name=name,
        step_args=step_args, show=("loss", "modulation/accuracy", "symbols/ser"),
        checkpoints=c, max_nonfinite=t.max_nonfinite,
        max_in_flight=parallel.safe_in_flight(mesh))
  params = jax.device_get(state.params)
  finals = training.unstack(params) if sweep else [params]
  histories = [_member_history(history, i) for i in range(len(inits))] if sweep else [history]
  for p in finals:
    _check_finite(p, name)
  return finals, histories


def _member_history(history, i):
  """Member ``i``'s history of a sweep (per-member lists become its own values)."""
  return [{k: v[i] if isinstance(v, list) else v for k, v in rec.items()} for rec in history]


def _check_finite(params, name):
  bad = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(params)
         if not np.all(np.isfinite(np.asarray(x)))]
  if bad:
    raise FloatingPointError(f"{name}: training diverged (non-finite weights in {bad[:3]}); "
                             f"lower the learning rate")


def float_nbytes(params: Any) -> int:
  """Bytes of a float32 model as the export stores it (sparse tensors as bitmask + values)."""
  return quantization.nbytes(quantization.export(params, None))


def measure(config: Any, setup: Setup, model_cfg: Any, params: Any, eval_batches: list,
            quantized: bool) -> dict[str, Any]:
  """Every metric of one model on the fixed evaluation batches (the same code for all)."""
  model = _model(model_cfg)
  predict = training.make_predict_fn(training.multitask_forward(model.apply))
  e = config.eval
  ev = training.evaluate(predict, {"params": params}, eval_batches,
                         modulation=setup.channel.modulation,
                         num_classes=len(setup.channel.modulations), snr_edges=tuple(e.snr_edges))
  nbytes = ((lambda p: quantization.nbytes(quantization.export(p, setup.spec)))
            if quantized else float_nbytes)
  first_task = sorted(eval_batches[0])[0]
  sample = eval_batches[0][first_task].iq[:e.latency_batch]
  cost = training.model_cost(model.apply, {"params": params}, sample, nbytes_fn=nbytes,
                             repeats=e.latency_repeats)
  rec = {"params_total": cost["params"], "params_nonzero": cost["nonzero"],
         "bytes": cost["bytes"], "flops": cost["flops"], "latency_ms": cost["latency_ms"],
         "sparsity": _kernel_sparsity(params), "bits": setup.spec.bits if quantized else 32}
  if "modulation" in ev:
    m = ev["modulation"]
    rec.update(accuracy=m["accuracy"], f1=m["macro_f1"], precision=m["macro_precision"],
               recall=m["macro_recall"], confusion=m["confusion"])
  if "symbols" in ev:
    s = ev["symbols"]
    rec.update(ser_mean=s["ser"], ber_mean=s["ber"],
               ser={"snr_db": s["ser_by_snr"]["snr_db"], "model": s["ser_by_snr"]["rate"]})
  if "channel" in ev:
    rec.update(nmse_db=ev["channel"]["nmse_db"])
  rec["eval"] = ev
  return rec


def _kernel_sparsity(params: Any) -> float:
  """Fraction of zeros over the kernels the transforms select by default."""
  flags = jax.tree.leaves(selection.select(params))
  leaves = jax.tree.leaves(params)
  kernels = [np.asarray(x) for x, on in zip(leaves, flags) if on]
  total = sum(k.size for k in kernels)
  return float(sum(k.size - np.count_nonzero(k) for k in kernels) / max(total, 1))


def _load_or_run(stage_dirs: list[str], targets: list[Any], run_fn
                 ) -> tuple[list[Any], list[list[dict]]]:
  """Restores a stage finished for every seed of the group, or runs it and saves it.

  Args:
    stage_dirs: the stage's directory per seed.
    targets: pytrees with the saved params' structure, per seed.
    run_fn: ``run_fn() -> (params per seed, history per seed)``.

  Returns:
    ``(params per seed, history per seed)``.
  """
  ckpts = [os.path.join(d, "params") for d in stage_dirs]
  if all(checkpoint.exists(c) for c in ckpts):
    params, histories = [], []
    for d, c, target in zip(stage_dirs, ckpts, targets):
      logging.info("restoring finished stage %s", d)
      with checkpoint.quiet_logs():
        params.append(jax.device_get(checkpoint.restore(c, target)))
      with open(os.path.join(d, "history.json")) as f:
        histories.append(json.load(f))
    return params, histories
  params, histories = run_fn()
  for d, c, p, h in zip(stage_dirs, ckpts, params, histories):
    if not checkpoint.exists(c):  # a seed finished earlier keeps its files
      with checkpoint.quiet_logs():
        checkpoint.save(c, p)
      if parallel.is_main_process():
        reporting.write_json(os.path.join(d, "history.json"), h)
  return params, histories


def _record(stage_dir: str, name: str, measure_fn) -> dict[str, Any]:
  """The stage's metrics record, cached in ``stage_dir/record.json``."""
  path = os.path.join(stage_dir, "record.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  rec = {"name": name, **measure_fn()}
  if parallel.is_main_process():
    reporting.write_json(path, rec)
  return rec


def _nonfinite(history: list[dict]) -> int:
  """Steps whose gradients were non-finite (and skipped) in a stage's history."""
  return int(round(sum(r.get("nonfinite", 0.0) for r in history)))


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
  teachers, histories = _load_or_run(teacher_dirs, teacher_init, lambda: _train(
      config, setup, f"{tag} teacher", setup.teacher, teacher_init, tx, t.steps,
      list(train_keys), ckpt_root("teacher")))
  with_refs = lambda rec: {**rec, "ser": {**rec.get("ser", {}), **refs}} if "ser" in rec else rec
  records = [[with_refs(_record(d, "teacher", lambda p=p, h=h: {**measure(
      config, setup, setup.teacher, p, eval_batches, quantized=False),
      "nonfinite_steps": _nonfinite(h)}))]
             for d, p, h in zip(teacher_dirs, teachers, histories)]
  for name, stages in setup.pipelines.items():
    params, model_cfg, kinds = teachers, setup.teacher, ()
    for i, stage in enumerate(stages):
      label = f"{name}/{i + 1}_{stage.kind}" + (f":{stage.option}" if stage.option else "")
      rel = os.path.join(name, f"{i + 1}_{stage.kind}")
      stage_dirs = [os.path.join(r, rel) for r in roots]
      keys_i = [jax.random.fold_in(k, zlib.crc32(label.encode()) % (2 ** 31))
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
          steps = t.steps
          opt = _optimizer(t.learning_rate, t.steps, t.weight_decay, t.warmup_steps)
      fresh = stage.kind if stage.kind in ("prune", "quantize") else None
      kinds = kinds + ((stage.kind,) if fresh else ())
      tx = compose(opt, kinds, config, setup, fresh=fresh, steps=steps)
      start, cfg_i = params, model_cfg
      if stage.kind == "quantize" and c.steps == 0:
        run = lambda start=start, kinds=kinds: ([jax.device_get(quantization.quantize_tree(
            _start_on_constraints(p, kinds[:-1], config, setup), setup.spec))
                                                 for p in start], [[] for _ in start])
      else:
        run = lambda start=start, cfg_i=cfg_i, tx=tx, steps=steps, tp=teacher_pair, \
            keys_i=keys_i, rel=rel, label=label: _train(
                config, setup, f"{tag} {label}", cfg_i, start, tx, steps, keys_i,
                ckpt_root(rel), tp)
      params, histories = _load_or_run(stage_dirs, start, run)
      quantized = "quantize" in kinds
      for rec, d, p, h in zip(records, stage_dirs, params, histories):
        rec.append(with_refs(_record(d, label, lambda p=p, h=h, m=model_cfg, q=quantized: {
            **measure(config, setup, m, p, eval_batches, q), "nonfinite_steps": _nonfinite(h)})))
  for seed, recs in zip(seeds, records):
    for r in recs:
      r["seed"] = seed
  return [r for recs in records for r in recs]


def _start_on_constraints(params, kinds, config, setup):
  """Params after one zero-gradient step of the constraint stack (masks re-derived)."""
  if not kinds:
    return params
  tx = compose(optax.sgd(0.0), kinds, config, setup)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  return optax.apply_updates(params, updates)


def reference_curves(config: Any, setup: Setup, eval_batches: list) -> dict[str, Any]:
  """SER-vs-SNR curves of the classical receivers on the evaluation frames."""
  refs = training.reference_receivers(
      eval_batches, modulation=setup.channel.modulation, snr_edges=tuple(config.eval.snr_edges))
  return {name: r["ser_by_snr"]["rate"] for name, r in refs.items()}


def run(config: Any, workdir: str) -> list[dict[str, Any]]:
  """Runs the whole study of ``config`` in ``workdir``; returns the stage records.

  Writes ``metrics.json`` (every record), ``results.md`` (one row per stage; the mean
  and standard deviation over seeds when there are several) and the plots.
  """
  setup = validate(config)
  os.makedirs(workdir, exist_ok=True)
  logging.info("devices: %s", jax.devices())
  eval_fn = training.multitask_data_fn(setup.channel, config.eval.batch_size,
                                       tuple(config.train.tasks))
  eval_batches = training.make_eval_batches(eval_fn, jax.random.key(_EVAL_KEY),
                                            config.eval.num_batches)
  refs = reference_curves(config, setup, eval_batches) if "symbols" in config.train.tasks else {}
  seeds = tuple(config.seeds)
  groups = [seeds] if config.train.vmap_seeds else [(s,) for s in seeds]
  records = []
  for group in groups:
    records += run_group(config, setup, workdir, group, eval_batches, refs)
  teacher_bytes = {r["seed"]: r["bytes"] for r in records if r["name"] == "teacher"}
  for r in records:
    r["compression"] = teacher_bytes[r["seed"]] / r["bytes"]
  table = reporting.aggregate(records) if len(config.seeds) > 1 else records
  if not parallel.is_main_process():
    return records
  reporting.write_report(workdir, records, table=table,
                         class_names=list(setup.channel.modulations),
                         title=f"compressjax: seeds {tuple(config.seeds)}")
  return records
