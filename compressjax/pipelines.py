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
finished stages instead of training them again.
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


def _train(config, setup, name, model_cfg, params, tx, steps, key, teacher=None):
  """Trains ``params`` for ``steps`` with ``tx``; with ``teacher=(cfg, params)``, by KD."""
  forward = training.multitask_forward(_model(model_cfg).apply)
  if teacher is None:
    loss_fn, step_args, teacher_forward = training.task_losses, (), None
  else:
    kd = functools.partial(distillation.kd_loss, temperature=config.distill.temperature,
                           alpha=config.distill.alpha)
    loss_fn = lambda o, b, t: training.kd_task_losses(o, b, t, kd)
    teacher_forward = training.multitask_forward(_model(teacher[0]).apply)
    step_args = ({"params": teacher[1]},)
  step = training.make_train_step(forward, tx, loss_fn, _data_fn(config, setup),
                                  teacher_forward=teacher_forward)
  state = training.create_train_state(params, tx, key)
  state, history = training.train(
      state, step, steps, log_every=min(config.train.log_every, steps), name=name,
      step_args=step_args, show=("loss", "modulation/accuracy", "symbols/ser"))
  final = jax.device_get(state.params)
  _check_finite(final, name)
  return final, history


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


@contextlib.contextmanager
def _quiet_logs():
  """Orbax logs every save step at INFO; keep the run's log to progress lines."""
  level = logging.get_verbosity()
  logging.set_verbosity(logging.WARNING)
  try:
    yield
  finally:
    logging.set_verbosity(level)


def _load_or_run(stage_dir: str, target: Any, run_fn) -> tuple[Any, dict | None]:
  """Restores a finished stage from ``stage_dir``, or runs ``run_fn`` and saves it."""
  ckpt = os.path.join(stage_dir, "params")
  if checkpoint.exists(ckpt):
    logging.info("restoring finished stage %s", stage_dir)
    with _quiet_logs():
      params = checkpoint.restore(ckpt, target)
    with open(os.path.join(stage_dir, "history.json")) as f:
      history = json.load(f)
    return jax.device_get(params), history
  params, history = run_fn()
  with _quiet_logs():
    checkpoint.save(ckpt, params)
  reporting.write_json(os.path.join(stage_dir, "history.json"), history)
  return params, history


def _record(stage_dir: str, name: str, measure_fn) -> dict[str, Any]:
  """The stage's metrics record, cached in ``stage_dir/record.json``."""
  path = os.path.join(stage_dir, "record.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  rec = {"name": name, **measure_fn()}
  reporting.write_json(path, rec)
  return rec


def run_seed(config: Any, setup: Setup, workdir: str, seed: int, eval_batches: list,
             refs: dict) -> list[dict[str, Any]]:
  """Trains the teacher for ``seed`` and runs every pipeline on it; returns the records."""
  root = os.path.join(workdir, f"seed_{seed}")
  key = jax.random.key(seed)
  t = config.train
  init_key, train_key, stage_key = jax.random.split(key, 3)
  teacher_init = iq_transformer.init_params(setup.teacher, init_key)
  tx = _optimizer(t.learning_rate, t.steps, t.weight_decay, t.warmup_steps)
  teacher_dir = os.path.join(root, "teacher")
  teacher, _ = _load_or_run(teacher_dir, teacher_init, lambda: _train(
      config, setup, f"seed {seed} teacher", setup.teacher, teacher_init, tx, t.steps,
      train_key))
  with_refs = lambda rec: {**rec, "ser": {**rec.get("ser", {}), **refs}} if "ser" in rec else rec
  records = [with_refs(_record(teacher_dir, "teacher", lambda: measure(
      config, setup, setup.teacher, teacher, eval_batches, quantized=False)))]
  for name, stages in setup.pipelines.items():
    params, model_cfg, kinds = teacher, setup.teacher, ()
    for i, stage in enumerate(stages):
      label = f"{name}/{i + 1}_{stage.kind}" + (f":{stage.option}" if stage.option else "")
      stage_dir = os.path.join(root, name, f"{i + 1}_{stage.kind}")
      key_i = jax.random.fold_in(stage_key, zlib.crc32(label.encode()) % (2 ** 31))
      c = config[stage.kind]
      steps, opt = c.steps, _optimizer(c.learning_rate, max(c.steps, 1), t.weight_decay)
      teacher_pair = None
      if stage.kind == "distill":
        teacher_pair = (setup.teacher, teacher)
        if stage.option == "small":
          # A fresh student is trained from scratch: the teacher's budget and schedule.
          model_cfg = setup.student
          params = iq_transformer.init_params(model_cfg, jax.random.fold_in(key_i, 1))
          steps = t.steps
          opt = _optimizer(t.learning_rate, t.steps, t.weight_decay, t.warmup_steps)
      fresh = stage.kind if stage.kind in ("prune", "quantize") else None
      kinds = kinds + ((stage.kind,) if fresh else ())
      tx = compose(opt, kinds, config, setup, fresh=fresh, steps=steps)
      start, cfg_i = params, model_cfg
      if stage.kind == "quantize" and c.steps == 0:
        run = lambda start=start: (jax.device_get(
            quantization.quantize_tree(_start_on_constraints(start, kinds[:-1], config, setup),
                                       setup.spec)), [])
      else:
        run = lambda start=start, cfg_i=cfg_i, tx=tx, steps=steps, tp=teacher_pair: _train(
            config, setup, f"seed {seed} {label}", cfg_i, start, tx, steps, key_i, tp)
      params, _ = _load_or_run(stage_dir, start, run)
      quantized = "quantize" in kinds
      records.append(with_refs(_record(stage_dir, label, lambda: measure(
          config, setup, model_cfg, params, eval_batches, quantized))))
  for r in records:
    r["seed"] = seed
  return records


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
  records = []
  for seed in config.seeds:
    records += run_seed(config, setup, workdir, seed, eval_batches, refs)
  teacher_bytes = {r["seed"]: r["bytes"] for r in records if r["name"] == "teacher"}
  for r in records:
    r["compression"] = teacher_bytes[r["seed"]] / r["bytes"]
  table = reporting.aggregate(records) if len(config.seeds) > 1 else records
  reporting.write_report(workdir, records, table=table,
                         class_names=list(setup.channel.modulations),
                         title=f"compressjax: seeds {tuple(config.seeds)}")
  return records
