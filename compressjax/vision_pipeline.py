"""The vision study (issue 8): ResNet-18 teacher -> MobileNetV2 student, KD -> LoRA -> INT8.

One run per seed, each stage measured on the test set once, with the same code:

1. ``teacher``: ResNet-18 (CIFAR variant) trained on labels.
2. ``student``: MobileNetV2 (CIFAR variant) trained on labels, the baseline of step 3.
3. ``distill``: the same MobileNetV2, from the same initialization (or from ``student``),
   trained with the Hinton et al. (2015) loss against the teacher (T = 4, alpha = 0.3).
4. ``lora``: LoRA adapters (Hu et al., 2021) on the distilled student's conv/dense kernels,
   only the adapters trained (same KD loss by default), then merged into the kernels.
   Depthwise kernels ``[3, 3, 1, C]`` are never adapted (a rank-r update of a 9 x C matrix
   saves nothing), nor any kernel whose matrix view is narrower than the rank (the classifier
   of a 10-class model at rank 16). Batch norm (``lora.bn``): ``"frozen"`` (default) runs it in
   inference mode during fine-tuning, so the running statistics are kept and the model trains
   exactly as it is evaluated; ``"update"`` uses batch statistics and updates the running
   averages. The BN scales and biases are not trained in either mode.
5. ``int8_weights``: post-training INT8 quantization of the merged student's conv/dense kernels
   (`quantization.ptq`, symmetric per output channel, which is unchanged by folding BN into the
   kernels since folding scales each output channel), activations in float.
6. ``int8_dynamic``: the same weights, every conv/dense input quantized to 8 bits at run time
   with a per-pixel range (`quantization.quantize_activations` ``"dynamic"``).
7. ``int8_static``: the same weights, one range per layer calibrated on a few training batches
   (`quantization.calibrate`) and fixed (``"static"``).

Every model is trained with its best validation checkpoint kept (validated every
``train.eval_every`` steps). Bytes are those of the packed export (`quantization.export`): the
params and the BN running statistics (needed to run the model), float32 for the float stages,
INT8 codes plus scales for the quantized kernels, plus the static activation ranges.
Each stage lives in ``workdir/seed_<s>/<stage>/`` (orbax ``variables``, ``history.json``,
``record.json``); a rerun restores finished stages instead of training them again.
"""

import json
import os
from typing import Any, NamedTuple

from absl import logging
import jax
import numpy as np

from compressjax import datasets
from compressjax import distillation
from compressjax import lora
from compressjax import quantization
from compressjax import reporting
from compressjax import training
from compressjax import vision_config
from compressjax import vision_train
from compressjax.training import checkpoint
from compressjax.training import parallel

STAGES = vision_config.STAGES
Setup = vision_config.Setup
validate = vision_config.validate

COLUMNS = (
    ("name", "stage", "{}"), ("model", "model", "{}"), ("accuracy", "acc", "{:.4f}"),
    ("f1", "macro F1", "{:.4f}"), ("acc_vs_teacher", "acc / teacher", "{:.1%}"),
    ("params_total", "params", "{:,}"), ("params_nonzero", "non-zero", "{:,}"),
    ("bytes", "bytes", "{:,}"), ("compression", "x smaller", "{:.2f}"),
    ("flops", "FLOPs", "{:.3g}"), ("latency_ms", "latency ms", "{:.3f}"))


class Context(NamedTuple):
  """What every stage of one seed needs: config, setup, data on device, the seed's root."""
  config: Any
  setup: Setup
  data: datasets.VisionData
  train: datasets.DeviceData
  val: datasets.DeviceData
  test: datasets.DeviceData
  sample: np.ndarray
  root: str
  seed: int
  key: jax.Array


def _stage(ctx: Context, name: str, target: Any, train_fn) -> tuple[Any, dict]:
  """Restores stage ``name``'s variables if finished, else runs ``train_fn`` and saves them."""
  stage_dir = os.path.join(ctx.root, name)
  ckpt = os.path.join(stage_dir, "variables")
  if checkpoint.exists(ckpt):
    logging.info("%s: restoring the finished stage from %s", name, stage_dir)
    with open(os.path.join(stage_dir, "history.json")) as f:
      info = json.load(f)
    return jax.device_get(checkpoint.restore(ckpt, target)), info
  variables, info = train_fn()
  checkpoint.save(ckpt, variables)
  reporting.write_json(os.path.join(stage_dir, "history.json"), info)
  return variables, info


def _record(ctx: Context, name: str, measure_fn) -> dict[str, Any]:
  """Stage ``name``'s metrics record, cached in its ``record.json``."""
  path = os.path.join(ctx.root, name, "record.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rec = {"name": name, **measure_fn()}
  reporting.write_json(path, rec)
  return rec


def deployed(variables: dict[str, Any], ranges: dict | None = None) -> dict[str, Any]:
  """The tree that is exported: variables, plus static activation ranges as float32 pairs."""
  if not ranges:
    return dict(variables)
  return {**variables, "activation_ranges": {
      k: np.asarray(v, np.float32) for k, v in sorted(ranges.items())}}


def export_bytes(tree: Any, spec: quantization.Spec | None, where=None) -> int:
  """Bytes of ``quantization.export(tree, spec, where)`` (float export for ``spec=None``)."""
  return quantization.nbytes(quantization.export(tree, spec, None if spec is None else where))


def _measure(ctx: Context, apply, variables: Any, spec=None, ranges=None,
             **extra: Any) -> dict[str, Any]:
  """Test metrics, export bytes, FLOPs and latency of one model (the same code for every row)."""
  c, d = ctx.config, ctx.data
  rep = vision_train.classify(apply, variables, ctx.test, c.eval.batch_size, d.mean, d.std,
                              d.num_classes)
  nbytes = export_bytes(deployed(variables, ranges), spec, ctx.setup.quant_where)
  cost = vision_train.cost(apply, variables, ctx.sample, nbytes, c.eval.latency_repeats)
  return {**extra, "accuracy": rep["accuracy"], "f1": rep["macro_f1"],
          "precision": rep["macro_precision"], "recall": rep["macro_recall"],
          "f1_per_class": rep["f1"], "confusion": rep["confusion"], **cost}


def _train(ctx: Context, name: str, forward, params, model_state, tx, cfg, loss_fn, *,
           teacher=None, to_variables=None, apply=None,
           include_start=False) -> tuple[Any, dict]:
  """Trains one stage with best-on-validation selection; returns (variables, history info)."""
  c, d, setup = ctx.config, ctx.data, ctx.setup
  key = jax.random.fold_in(ctx.key, setup.stage_ids[name])
  mesh = parallel.make_mesh(c.train.num_devices)
  step = vision_train.make_step(
      forward, tx, loss_fn, batch_size=c.train.batch_size, mean=d.mean, std=d.std,
      order_key=jax.random.fold_in(key, 1), padding=c.augment.padding,
      flip=c.augment.flip, teacher_apply=None if teacher is None else teacher[0], mesh=mesh)
  state = parallel.replicate(
      training.create_train_state(params, tx, jax.random.fold_in(key, 2), model_state), mesh)
  train_data = parallel.replicate(ctx.train, mesh)
  teacher_vars = None if teacher is None else parallel.replicate(teacher[1], mesh)
  apply = apply or setup.student_apply
  val = lambda v: vision_train.classify(apply, v, ctx.val, c.eval.batch_size, d.mean, d.std,
                                        d.num_classes)["accuracy"]
  to_variables = to_variables or (lambda s: {"params": s.params, **s.model_state})
  variables, history, best = vision_train.fit(
      state, step, cfg.steps, step_args=(train_data, teacher_vars),
      to_variables=to_variables, val_accuracy=val, eval_every=c.train.eval_every,
      log_every=c.train.log_every, name=f"seed {ctx.seed} {name}",
      include_start=include_start, max_in_flight=parallel.safe_in_flight(mesh))
  return variables, {"best": best, "history": history}


def _tx(cfg) -> Any:
  return vision_train.optimizer(cfg.optimizer, cfg.learning_rate, cfg.steps,
                                cfg.warmup_steps, cfg.weight_decay)


def _kd(config):
  d = config.distill
  return lambda logits, labels, t: distillation.kd_loss(
      logits, t, labels, temperature=d.temperature, alpha=d.alpha).mean()


def _init(model, key, shape):
  # Runs once: compiled without LLVM optimization, as its many threefry draws take ~20 s to
  # compile on CPU at the default level (~2 s at level 0); eager init is as slow, op by op.
  init = jax.jit(lambda k: model.init(k, np.zeros((1, *shape), np.float32), train=False))
  compiled = init.lower(key).compile({"xla_backend_optimization_level": 0})
  return jax.device_get(compiled(key))


def _best(info: dict) -> dict[str, Any]:
  return {"val_accuracy": info["best"]["val_accuracy"], "best_step": info["best"]["step"]}


def run_seed(ctx: Context) -> list[dict[str, Any]]:
  """Runs every stage for one seed; returns its records in stage order."""
  c, setup = ctx.config, ctx.setup
  records = []
  split = lambda v: (v["params"], {k: x for k, x in v.items() if k != "params"})

  # 1. Teacher. (Initializations are made only for the stages that train.)
  t0 = lambda: _init(setup.teacher, jax.random.fold_in(ctx.key, 101), setup.image_shape)
  teacher, info = _stage(ctx, "teacher", setup.teacher_shapes, lambda: _train(
      ctx, "teacher", vision_train.model_forward(setup.teacher), *split(t0()), _tx(c.teacher),
      c.teacher, vision_train.cross_entropy, apply=setup.teacher_apply))
  records.append(_record(ctx, "teacher", lambda: _measure(
      ctx, setup.teacher_apply, teacher, model=setup.teacher_name, bits=32,
      trainable_params=training.param_counts(teacher["params"])["params"], **_best(info))))

  # 2. Student baseline and 3. distilled student, from the same initialization.
  s0 = lambda: _init(setup.student, jax.random.fold_in(ctx.key, 102), setup.image_shape)
  student_fwd = vision_train.model_forward(setup.student)
  float_extra = lambda v, i: dict(model=setup.student_name, bits=32, **_best(i),
                                  trainable_params=training.param_counts(v["params"])["params"])
  student, info = _stage(ctx, "student", setup.student_shapes, lambda: _train(
      ctx, "student", student_fwd, *split(s0()), _tx(c.student), c.student,
      vision_train.cross_entropy))
  records.append(_record(ctx, "student", lambda: _measure(
      ctx, setup.student_apply, student, **float_extra(student, info))))
  start = (lambda: student) if c.distill.init == "student" else s0
  distilled, info = _stage(ctx, "distill", setup.student_shapes, lambda: _train(
      ctx, "distill", student_fwd, *split(start()), _tx(c.distill), c.distill, _kd(c),
      teacher=(setup.teacher_apply, teacher), include_start=c.distill.init == "student"))
  records.append(_record(ctx, "distill", lambda: _measure(
      ctx, setup.student_apply, distilled, **float_extra(distilled, info))))

  # 4. LoRA on the distilled student, merged.
  merged, info = _stage(ctx, "lora", setup.student_shapes,
                        lambda: _lora(ctx, distilled, teacher))
  records.append(_record(ctx, "lora", lambda: _measure(
      ctx, setup.student_apply, merged, model=setup.student_name, bits=32, **_best(info),
      trainable_params=info["lora_params"], lora_rank=c.lora.rank,
      lora_kernels=len(setup.lora_paths), lora_bn=c.lora.bn)))

  # 5-7. Post-training INT8: weights, then activations dynamic / static.
  records += _int8(ctx, merged)
  return records


def _lora(ctx: Context, distilled: dict[str, Any], teacher: dict[str, Any]) -> tuple[Any, dict]:
  """Trains LoRA adapters on the distilled student; returns the merged variables and info."""
  c, setup, l = ctx.config, ctx.setup, ctx.config.lora
  base, model_state = distilled["params"], {k: v for k, v in distilled.items() if k != "params"}
  paths = set(setup.lora_paths)
  adapters = lora.init(jax.random.fold_in(ctx.key, 104), base, rank=l.rank, alpha=l.alpha,
                       where=lambda p: p in paths)
  merge = jax.jit(lambda p: lora.merge(p["base"], p["lora"], l.alpha))
  if l.bn == "frozen":
    forward = lambda p, ms, x: (setup.student.apply({"params": merge(p), **ms}, x,
                                                    train=False), ms)
  else:
    inner = vision_train.model_forward(setup.student)
    forward = lambda p, ms, x: inner(merge(p), ms, x)
  loss = _kd(c) if l.loss == "kd" else vision_train.cross_entropy
  variables, info = _train(
      ctx, "lora", forward, {"base": base, "lora": adapters}, model_state,
      lora.optimizer(_tx(l)), l, loss,
      teacher=(setup.teacher_apply, teacher) if l.loss == "kd" else None, include_start=True,
      to_variables=lambda s: {"params": merge(s.params), **s.model_state})
  return variables, {**info, "lora_params": lora.num_parameters(adapters)}


def _int8(ctx: Context, merged: dict[str, Any]) -> list[dict[str, Any]]:
  """The INT8 weights (PTQ, checkpointed) and the records of the configured modes."""
  setup, q = ctx.setup, ctx.config.quantize
  wq, _ = _stage(ctx, "int8_weights", setup.student_shapes, lambda: ({
      "params": quantization.ptq(merged["params"], setup.weight_spec, method=q.weight_method,
                                 where=setup.quant_where),
      **{k: v for k, v in merged.items() if k != "params"}}, {}))
  extra = dict(model=setup.student_name, bits=q.bits, trainable_params=0)
  records = []
  if "weights" in q.modes:
    records.append(_record(ctx, "int8_weights", lambda: _measure(
        ctx, setup.student_apply, wq, setup.weight_spec, act_bits=32, **extra)))
  if "dynamic" in q.modes:
    apply = quantization.quantize_activations(setup.student_apply, setup.act_spec, "dynamic")
    records.append(_record(ctx, "int8_dynamic", lambda: _measure(
        ctx, apply, wq, setup.weight_spec, act_bits=q.bits, act_mode="dynamic", **extra)))
  if "static" in q.modes:
    ranges = _ranges(ctx, wq)
    apply = quantization.quantize_activations(setup.student_apply, setup.act_spec, "static",
                                              ranges=ranges)
    records.append(_record(ctx, "int8_static", lambda: _measure(
        ctx, apply, wq, setup.weight_spec, ranges, act_bits=q.bits, act_mode="static",
        **extra)))
  return records


def _ranges(ctx: Context, wq: dict[str, Any]) -> dict[str, tuple[float, float]]:
  """Static activation ranges of the INT8-weight model, calibrated once and cached."""
  c, d, q = ctx.config, ctx.data, ctx.config.quantize
  path = os.path.join(ctx.root, "int8_static", "ranges.json")
  if os.path.exists(path):
    with open(path) as f:
      return {k: tuple(v) for k, v in json.load(f).items()}
  key = jax.random.fold_in(ctx.key, 107)
  batches = [datasets.normalize(datasets.train_batch(ctx.train, key, i, c.train.batch_size)[0],
                                d.mean, d.std) for i in range(q.calib_batches)]
  ranges = quantization.calibrate(lambda x: ctx.setup.student_apply(wq, x), batches,
                                  ctx.setup.act_spec, method=q.calib_method)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  reporting.write_json(path, ranges)
  return ranges


def load_data(config: Any) -> datasets.VisionData:
  """The config's image set (digits at ``image_size``, or CIFAR from ``data_dir``)."""
  kwargs = dict(num_val=config.num_val)
  if config.dataset == "digits":
    kwargs.update(size=config.image_size, channels=3, num_test=config.num_test)
  return datasets.load_dataset(config.dataset, config.data_dir or None, config.split_seed,
                               **kwargs)


def _targets(table: list[dict[str, Any]]) -> str:
  """The issue's two targets, checked on the last row (the final student) against the first."""
  teacher, final = table[0], table[-1]
  ratio = final["accuracy"] / max(teacher["accuracy"], 1e-12)
  smaller = 1.0 - final["bytes"] / teacher["bytes"]
  verdict = lambda ok: "met" if ok else "NOT met"
  return (f"\n## Targets (final stage `{final['name']}` against the teacher)\n\n"
          f"- accuracy {final['accuracy']:.4f} = {ratio:.1%} of the teacher's "
          f"{teacher['accuracy']:.4f}: bar >= 97% {verdict(ratio >= 0.97)} "
          f"(thesis >= 90% {verdict(ratio >= 0.90)})\n"
          f"- size {final['bytes']:,} bytes = {smaller:.1%} smaller than the teacher's "
          f"{teacher['bytes']:,}: bar >= 90% {verdict(smaller >= 0.90)} "
          f"(thesis > 75% {verdict(smaller > 0.75)})\n")


def run(config: Any, workdir: str) -> list[dict[str, Any]]:
  """Runs the vision study of ``config`` in ``workdir``; returns the stage records.

  Writes ``metrics.json`` (every record), ``results.md`` (one row per stage, the mean and
  standard deviation over seeds when there are several, and the issue's targets) and the
  plots (accuracy against packed bytes; the final stage's confusion matrix).

  Args:
    config: a config like ``experiments/vision_kd_lora_int8.py``'s (validated first).
    workdir: output directory (created); finished stages found there are reused.

  Returns:
    One flat record per stage and seed (keys: name, model, accuracy, f1, precision, recall,
    confusion, params_total, params_nonzero, bytes, compression, acc_vs_teacher, flops,
    latency_ms, val_accuracy, best_step, trainable_params, bits, seed, ...).
  """
  setup = validate(config)
  os.makedirs(workdir, exist_ok=True)
  logging.info("devices: %s", jax.devices())
  data = load_data(config)
  if data.num_classes != setup.num_classes or data.train_images.shape[1:] != setup.image_shape:
    raise ValueError(f"dataset {config.dataset} gave {data.num_classes} classes of "
                     f"{data.train_images.shape[1:]} images, expected {setup.num_classes} of "
                     f"{setup.image_shape}")
  train, val, test = (datasets.to_device(x, y) for x, y in (
      (data.train_images, data.train_labels), (data.val_images, data.val_labels),
      (data.test_images, data.test_labels)))
  # The latency batch: the first test images (repeated if the test split is smaller).
  idx = np.arange(config.eval.latency_batch) % data.test_images.shape[0]
  sample = np.asarray(datasets.normalize(data.test_images[idx], data.mean, data.std))
  records = []
  for seed in config.seeds:
    ctx = Context(config, setup, data, train, val, test, sample,
                  os.path.join(workdir, f"seed_{seed}"), int(seed), jax.random.key(seed))
    seed_records = run_seed(ctx)
    base = seed_records[0]
    for r in seed_records:
      r.update(seed=int(seed), compression=base["bytes"] / r["bytes"],
               acc_vs_teacher=r["accuracy"] / max(base["accuracy"], 1e-12))
    records += seed_records
  if len(config.seeds) > 1:
    table = reporting.aggregate(records)
    models = {r["name"]: r["model"] for r in records}
    for row in table:
      row.update(model=models[row["name"]],
                 acc_vs_teacher=row["accuracy"] / max(table[0]["accuracy"], 1e-12))
  else:
    table = records
  title = (f"compressjax vision: {setup.teacher_name} -> {setup.student_name}, "
           f"{config.dataset}, seeds {tuple(config.seeds)}")
  reporting.write_report(workdir, records, table=table, class_names=list(data.class_names),
                         title=title, columns=COLUMNS, footer=_targets(table))
  return records
