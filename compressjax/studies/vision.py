"""The vision study: a ResNet-18 teacher, then a MobileNetV2 student compressed stage by stage.

The teacher is trained on labels first. Then the config's ``stages`` run in order, each
starting from the model the previous one produced (data, like the wireless pipelines),
for example ``"student,distill,lora,ptq:weights,ptq:dynamic,ptq:static"``:

* ``student``: the student architecture trained on labels from its initialization (the
  baseline that distillation is judged against).
* ``distill``: the Hinton et al. (2015) loss against the teacher; from the student's
  initialization (``distill.init="scratch"``, the same draw as ``student``) or from the
  previous stage's model (``"previous"``).
* ``lora``: LoRA adapters (Hu et al., 2021) on the student's conv/dense kernels (never the
  depthwise ones, nor kernels narrower than the rank), trained alone (KD loss by default),
  then merged. ``lora.bn="frozen"`` runs batch norm in inference mode while training.
* ``prune``: fine-tuning under `pruning.wrap` (the ``prune`` block), KD loss.
* ``quantize``: quantization-aware fine-tuning under `quantization.wrap` at
  ``quantize.bits`` (``quantize.steps=0``: post-training quantization of the weights).
* ``ptq:weights|dynamic|static``: post-training quantization of the kernels
  (`quantization.ptq`, per output channel), with activations in float, quantized at run
  time per input (``dynamic``) or on ranges calibrated once (``static``).

``prune`` and ``quantize`` constrain every later training stage (their wrappers stack, as
in the wireless study; the prune stage's masks are carried). Every trained stage keeps its
best model on the validation split (checked every ``train.eval_every`` steps), resumes
from its periodic checkpoints after a kill, and skips updates from non-finite gradients.

Every row is measured the same way on the test split: accuracy, macro F1, the confusion
matrix, the bytes of its packed export (batch norm folded into the convolutions: what a
deployed model stores), XLA FLOPs and latency. The pass marks (``targets``) come from the
config. Each stage lives in ``workdir/seed_<s>/<i>_<stage>/``.
"""

import functools
import json
import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from compressjax import datasets
from compressjax import distillation
from compressjax import lora
from compressjax import quantization
from compressjax import reporting
from compressjax import selection
from compressjax import serving
from compressjax import training
from compressjax.datasets import DATASETS
from compressjax.datasets import digits
from compressjax.models import folding
from compressjax.models import mobilenet_v2
from compressjax.models import resnet
from compressjax.stages import carried_masks
from compressjax.stages import compose
from compressjax.stages import prune_plan
from compressjax.stages import PrunePlan
from compressjax.studies import engine
from compressjax.training import metrics as metrics_lib
from compressjax.training import parallel

KINDS = ("student", "distill", "lora", "prune", "quantize", "ptq")
PTQ_MODES = ("weights", "dynamic", "static")
LORA_BN = ("frozen", "update")
LOSSES = ("kd", "ce")
DISTILL_INIT = ("scratch", "previous")
NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "cifar100_coarse": 20}
CIFAR_TRAIN = 50000

COLUMNS = (
    ("name", "stage", "{}"), ("model", "model", "{}"), ("accuracy", "acc", "{:.4f}"),
    ("f1", "macro F1", "{:.4f}"), ("acc_vs_teacher", "acc / teacher", "{:.1%}"),
    ("params_total", "params", "{:,.0f}"), ("params_nonzero", "non-zero", "{:,.0f}"),
    ("bytes", "bytes", "{:,.0f}"), ("compression", "x smaller", "{:.2f}"),
    ("flops", "FLOPs", "{:.3g}"), ("latency_ms", "latency ms", "{:.3f}"),
    ("latency_text", "latency / teacher", "{}"),
    ("latency_eval_text", "latency / teacher @ eval batch", "{}"))


class StagePlan(NamedTuple):
  """One stage, resolved.

  Attributes:
    name: the row label and directory name (``"3_lora"``'s row is ``"lora"``).
    kind: one of `KINDS`.
    option: ``ptq``'s mode, else None.
    steps: training steps (0 for ``ptq``; ``quantize`` with 0 is post-training).
    optimizer: the stage's optimizer, or None when it does not train.
    loss: ``"kd"`` (against the teacher) or ``"ce"`` (labels only).
    from_init: starts from the student's initialization instead of the previous model.
    constraints: the ``prune``/``quantize`` stages in force (earlier ones and its own).
  """
  name: str
  kind: str
  option: str | None
  steps: int
  optimizer: engine.OptimizerPlan | None
  loss: str
  from_init: bool
  constraints: tuple[str, ...]


class Plan(NamedTuple):
  """What a vision config resolves to (nothing below `run` reads the config).

  Attributes:
    seeds: the seeds (each trains every stage).
    train: how stages train (`engine.TrainPlan`).
    eval_every: steps between validations.
    padding: random-crop padding (pixels).
    flip: random horizontal flips.
    teacher_stage: the teacher's `StagePlan`.
    stages: the student's stages, in order.
    temperature: the KD temperature.
    alpha: the KD soft-target weight.
    lora_rank: the LoRA rank.
    lora_alpha: the LoRA scale numerator.
    lora_bn: ``"frozen"`` or ``"update"``.
    lora_paths: the kernels LoRA adapts.
    prune: the prune stage's settings.
    weight_spec: the weight quantizer (``quantize`` and ``ptq``; its grid: the clipping).
    act_spec: the activation quantizer (``ptq:dynamic|static``; its grid: the calibration).
    quant_where: the quantized (and pruned) parameters, by path.
    calib_batches: training batches to calibrate on.
    eval_batch_size: evaluation batch size.
    latency_batch: the latency measurement's batch.
    latency_repeats: timed calls per latency.
    num_classes: classes of the dataset.
    image_shape: ``(height, width, channels)``.
    teacher: the ResNet module.
    student: the MobileNetV2 module as trained.
    teacher_apply: the teacher's inference apply.
    student_apply: the student's inference apply (grouped-conv depthwise: the layer
      activation quantization intercepts), used for every student row; jitted, like
      ``teacher_apply``, so that every row of a model shares one compiled program.
    student_eval: that model (for the activation quantizer, which must trace it itself).
    teacher_name: e.g. ``"resnet18 w64"``.
    student_name: e.g. ``"mobilenet_v2 x1.0"``.
    teacher_shapes: abstract teacher variables.
    student_shapes: abstract student variables.
    targets: the pass marks ``(label, accuracy ratio, bytes smaller)`` of the final row.
  """
  seeds: tuple[int, ...]
  train: engine.TrainPlan
  eval_every: int
  padding: int
  flip: bool
  teacher_stage: StagePlan
  stages: tuple[StagePlan, ...]
  temperature: float
  alpha: float
  lora_rank: int
  lora_alpha: float
  lora_bn: str
  lora_paths: tuple[str, ...]
  prune: PrunePlan
  weight_spec: quantization.Spec
  act_spec: quantization.Spec
  quant_where: Callable[[str], bool]
  calib_batches: int
  eval_batch_size: int
  latency_batch: int
  latency_repeats: int
  num_classes: int
  image_shape: tuple[int, int, int]
  teacher: Any
  student: Any
  teacher_apply: Callable[..., Any]
  student_apply: Callable[..., Any]
  student_eval: Any
  teacher_name: str
  student_name: str
  teacher_shapes: Any
  student_shapes: Any
  targets: tuple[tuple[str, float, float], ...]


# ------------------------------------------------------------------------- validation


_check, _is_int, _is_num = engine.check, engine.is_int, engine.is_num


def _optimizer_plan(cfg: Any, field: str, min_steps: int) -> engine.OptimizerPlan:
  _check(_is_int(cfg.steps, min_steps), f"{field}.steps", cfg.steps, f"an int >= {min_steps}")
  _check(cfg.optimizer in engine.OPTIMIZERS, f"{field}.optimizer", cfg.optimizer,
         f"one of {engine.OPTIMIZERS}")
  _check(_is_num(cfg.learning_rate) and cfg.learning_rate > 0, f"{field}.learning_rate",
         cfg.learning_rate, "a finite number > 0")
  _check(_is_num(cfg.weight_decay) and cfg.weight_decay >= 0, f"{field}.weight_decay",
         cfg.weight_decay, "a finite number >= 0")
  _check(_is_int(cfg.warmup_steps, 0) and cfg.warmup_steps < max(cfg.steps, 1),
         f"{field}.warmup_steps", cfg.warmup_steps, f"an int in [0, {field}.steps)")
  return engine.OptimizerPlan(cfg.optimizer, float(cfg.learning_rate), int(cfg.steps),
                              int(cfg.warmup_steps), float(cfg.weight_decay),
                              decay_kernels_only=True)


def _data(config: Any) -> tuple[int, tuple[int, int, int], int]:
  """Checks the data fields; returns (classes, input shape, training-split size)."""
  name = config.dataset
  _check(name in DATASETS, "dataset", name, f"one of {sorted(DATASETS)}")
  _check(_is_int(config.split_seed, 0), "split_seed", config.split_seed, "an int >= 0")
  if name == "digits":
    size = config.image_size
    _check(_is_int(size, 8) and size % 8 == 0, "image_size", size,
           "a positive multiple of 8 for digits")
    _check(_is_int(config.num_test, 1) and config.num_test < digits.NUM_DIGITS, "num_test",
           config.num_test, f"an int in [1, {digits.NUM_DIGITS})")
    pool = digits.NUM_DIGITS - config.num_test
  else:
    _check(isinstance(config.data_dir, str) and bool(config.data_dir), "data_dir",
           config.data_dir, f"the location of the {name} archive (a file or a directory; "
           f"see https://www.cs.toronto.edu/~kriz/cifar.html)")
    _check(os.path.exists(config.data_dir), "data_dir", config.data_dir, "an existing path")
    _check(config.image_size == 32, "image_size", config.image_size, "32 for CIFAR")
    size, pool = 32, CIFAR_TRAIN
  _check(_is_int(config.num_val, 1) and config.num_val < pool, "num_val", config.num_val,
         f"an int in [1, {pool})")
  return NUM_CLASSES[name], (size, size, 3), pool - config.num_val


def _models(config: Any, classes: int, dtype: str = "float32"):
  t, s = config.teacher, config.student
  try:
    teacher = resnet.ResNet(stage_sizes=tuple(t.stage_sizes), num_classes=classes,
                            width=t.width, dtype=jnp.dtype(dtype))
  except (TypeError, ValueError) as e:
    raise ValueError(f"teacher: {e}") from None
  stages = mobilenet_v2.CIFAR_STAGES if not s.stages else tuple(tuple(r) for r in s.stages)
  try:
    student = mobilenet_v2.MobileNetV2(classes, s.width_multiplier, stages,
                                       depthwise_impl=s.depthwise_impl,
                                       dtype=jnp.dtype(dtype))
  except (TypeError, ValueError) as e:
    raise ValueError(f"student: {e}") from None
  return teacher, student


def lora_paths(params: Any, rank: int, classifier: bool = True) -> tuple[str, ...]:
  """Kernels LoRA adapts: conv/dense kernels whose matrix view has both sides >= ``rank``,
  never depthwise ones (``[kh, kw, 1, C]``), and the classifier only if ``classifier``."""
  out = []
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    name, shape = selection.path_str(path), tuple(x.shape)
    if not selection.default_where(name) or len(shape) < 2:
      continue
    if len(shape) == 4 and shape[2] == 1 and shape[3] > 1:  # depthwise
      continue
    if not classifier and name.startswith("classifier/"):
      continue
    k = lora.fan_in_axes(name, shape)
    if min(math.prod(shape[:k]), math.prod(shape[k:])) >= rank:
      out.append(name)
  return tuple(out)


def parse_stages(text: Any, config: Any) -> tuple[StagePlan, ...]:
  """Resolves ``config.stages`` (``"student,distill,lora,ptq:weights"``) into plans."""
  _check(isinstance(text, str), "stages", text, f"a comma-separated string of {KINDS}")
  items = [s.strip() for s in text.split(",") if s.strip()]
  _check(len(items) > 0, "stages", text, f"at least one stage of {KINDS}")
  plans, constraints, seen = [], (), set()
  for i, item in enumerate(items):
    kind, _, option = item.partition(":")
    _check(kind in KINDS, "stages", item, f"stages from {KINDS}")
    if kind == "ptq":
      _check(option in PTQ_MODES, "stages", item, f"'ptq:<mode>' with a mode in {PTQ_MODES}")
      _check("quantize" not in constraints, "stages", text, "without ptq after quantize (QAT "
             "already put the weights on its grid)")
    else:
      _check(not option, "stages", item, f"'{kind}' with no option")
    _check(item not in seen, "stages", text, "free of repeated stages")
    seen.add(item)
    if kind == "lora":
      _check(not constraints, "stages", text, "without lora after prune/quantize (the "
             "merged low-rank update would undo their constraints)")
    if kind in ("prune", "quantize"):
      constraints += (kind,)
    c = config.get({"ptq": "quantize"}.get(kind, kind))
    steps = 0 if kind == "ptq" else c.steps
    opt = None
    if kind != "ptq" and not (kind == "quantize" and c.steps == 0):
      opt = _optimizer_plan(c, kind, 1)
    elif kind == "quantize":
      _check(_is_int(c.steps, 0), "quantize.steps", c.steps, "an int >= 0 (0: post-training)")
    loss = {"student": "ce", "distill": "kd"}.get(kind, c.get("loss", "kd"))
    _check(loss in LOSSES, f"{kind}.loss", loss, f"one of {LOSSES}")
    from_init = kind == "student" or (kind == "distill" and c.init == "scratch") or i == 0
    label = (f"int{config.quantize.bits}_{option}" if kind == "ptq" else kind)
    plans.append(StagePlan(f"{i + 1}_{label}", kind, option or None, int(steps), opt, loss,
                           from_init, constraints))
  return tuple(plans)


def validate(config: Any) -> Plan:
  """Checks every field a vision run uses and resolves the config; raises before any work.

  Args:
    config: an ``ml_collections.ConfigDict`` shaped like
      ``experiments/vision_kd_lora_int8.py``.

  Returns:
    The resolved `Plan`.

  Raises:
    ValueError: naming the field, its value and what is allowed.
  """
  _check(config.get("study") == "vision", "study", config.get("study"), "'vision'")
  seeds = engine.check_seeds(config.seeds)
  classes, shape, num_train = _data(config)
  tr = config.train
  train = engine.train_plan(tr, max_batch=num_train)
  _check(_is_int(tr.eval_every, 1), "train.eval_every", tr.eval_every, "an int >= 1")
  a = config.augment
  _check(_is_int(a.padding, 0) and a.padding < shape[0], "augment.padding", a.padding,
         f"an int in [0, {shape[0]})")
  _check(isinstance(a.flip, bool), "augment.flip", a.flip, "a bool")
  teacher_opt = _optimizer_plan(config.teacher, "teacher", 1)
  d = config.distill
  temperature, alpha = engine.check_kd(d)
  _check(d.init in DISTILL_INIT, "distill.init", d.init, f"one of {DISTILL_INIT}")
  l = config.lora
  _check(_is_int(l.rank, 1), "lora.rank", l.rank, "an int >= 1")
  _check(_is_num(l.alpha) and l.alpha > 0, "lora.alpha", l.alpha, "a finite number > 0")
  _check(l.bn in LORA_BN, "lora.bn", l.bn, f"one of {LORA_BN}")
  _check(isinstance(l.classifier, bool), "lora.classifier", l.classifier, "a bool")
  q = config.quantize
  # The grids are the registry's (quantization.register_grid): QAT, PTQ, calibration and
  # the export all use the spec's.
  for f in ("weight_method", "calib_method"):
    quantization.get_grid(q[f], f"quantize.{f}")
  try:
    weight_spec = quantization.Spec(bits=q.bits, symmetric=True, granularity=q.granularity,
                                    grid=q.weight_method)
    act_spec = quantization.Spec(bits=q.bits, symmetric=q.act_symmetric, grid=q.calib_method)
  except (TypeError, ValueError) as e:
    raise ValueError(f"quantize.{e}") from None
  _check(_is_int(q.calib_batches, 1), "quantize.calib_batches", q.calib_batches, "an int >= 1")
  _check(isinstance(q.skip_depthwise, bool), "quantize.skip_depthwise", q.skip_depthwise,
         "a bool")
  prune = prune_plan(config.prune)
  stages = parse_stages(config.stages, config)
  e = config.eval
  for f in ("batch_size", "latency_batch", "latency_repeats"):
    _check(_is_int(e[f], 1), f"eval.{f}", e[f], "an int >= 1")
  targets = tuple(tuple(t) for t in config.targets)
  _check(all(len(t) == 3 and isinstance(t[0], str) and _is_num(t[1]) and _is_num(t[2])
             for t in targets), "targets", config.targets,
         "a tuple of (label, accuracy ratio, fraction of bytes saved) triples")

  teacher, student = _models(config, classes, train.compute_dtype)
  # The model as trained is the model measured: its depthwise form ("shifted" on CPU) is
  # an nn.Conv subclass, so activation quantization sees those layers too.
  student_eval = student
  x = jax.ShapeDtypeStruct((1, *shape), np.float32)
  init = lambda m: jax.eval_shape(lambda x: m.init(jax.random.key(0), x, train=False), x)
  teacher_shapes, student_shapes = init(teacher), init(student)
  paths = lora_paths(student_shapes["params"], l.rank, l.classifier)
  if not paths and any(s.kind == "lora" for s in stages):
    flat = dict((selection.path_str(p), x.shape) for p, x in
                jax.tree_util.tree_leaves_with_path(student_shapes["params"]))
    widest = max(min(math.prod(flat[p][:-1]), flat[p][-1])
                 for p in lora_paths(student_shapes["params"], 1, l.classifier))
    raise ValueError(f"lora.rank must be <= {widest} (the widest min(in, out) of the "
                     f"student's non-depthwise kernels), got {l.rank}")
  skip_dw = q.skip_depthwise
  quant_where = lambda p: (selection.default_where(p)
                           and not (skip_dw and "/depthwise/" in f"/{p}"))
  # Jitted once: evaluation, FLOPs and latency of every row of a model share its program.
  apply = lambda m: jax.jit(lambda variables, x: m.apply(variables, x, train=False))
  return Plan(
      seeds=seeds, train=train,
      eval_every=tr.eval_every, padding=a.padding, flip=a.flip,
      teacher_stage=StagePlan("teacher", "teacher", None, teacher_opt.steps, teacher_opt, "ce",
                              True, ()),
      stages=stages, temperature=temperature, alpha=alpha,
      lora_rank=l.rank, lora_alpha=float(l.alpha), lora_bn=l.bn, lora_paths=paths,
      prune=prune, weight_spec=weight_spec, act_spec=act_spec, quant_where=quant_where,
      calib_batches=q.calib_batches, eval_batch_size=e.batch_size,
      latency_batch=e.latency_batch, latency_repeats=e.latency_repeats,
      num_classes=classes, image_shape=shape, teacher=teacher, student=student,
      teacher_apply=apply(teacher), student_apply=apply(student_eval), student_eval=student_eval,
      teacher_name=f"resnet{2 + 2 * sum(teacher.stage_sizes)} w{teacher.width}",
      student_name=f"mobilenet_v2 x{student.width_multiplier:g}",
      teacher_shapes=teacher_shapes, student_shapes=student_shapes, targets=targets)


# ------------------------------------------------------------------------ the pieces


class Data(NamedTuple):
  """The study's data on device: the splits, normalization and the latency batch."""
  info: datasets.VisionData
  train: datasets.DeviceData
  val: datasets.DeviceData
  test: datasets.DeviceData
  sample: np.ndarray


def load_data(config: Any) -> datasets.VisionData:
  """The config's image set (digits at ``image_size``, or CIFAR from ``data_dir``)."""
  kwargs = dict(num_val=config.num_val)
  if config.dataset == "digits":
    kwargs.update(size=config.image_size, channels=3, num_test=config.num_test)
  return datasets.load_dataset(config.dataset, config.data_dir or None, config.split_seed,
                               **kwargs)


def image_forward(model: Any) -> Callable[..., Any]:
  """`training.make_train_step`'s forward for a linen image classifier: ``{"label": logits}``
  (float32 logits whatever the model's compute dtype: the losses are taken in float32)."""

  def forward(variables, batch, *, train, rngs, mutable=()):
    del rngs
    if mutable:
      logits, mutated = model.apply(variables, batch["image"], train=train, mutable=mutable)
      return {"label": logits.astype(jnp.float32)}, mutated
    return {"label": model.apply(variables, batch["image"], train=train).astype(jnp.float32)}

  return forward


def ce_loss(outputs, batch, teacher_outputs=None):
  """Cross-entropy on the labels; metrics: the batch accuracy."""
  del teacher_outputs
  logits, labels = outputs["label"], batch["label"]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}


def kd_loss(temperature: float, alpha: float):
  """The Hinton et al. (2015) loss against the teacher's logits; metrics: batch accuracy."""

  def loss(outputs, batch, teacher_outputs):
    logits, labels = outputs["label"], batch["label"]
    value = distillation.kd_loss(logits, teacher_outputs["label"], labels,
                                 temperature=temperature, alpha=alpha).mean()
    return value, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}

  return loss


def predict(apply, variables, data: datasets.DeviceData, batch_size: int, mean, std):
  """``(labels, predicted classes)`` of every example of ``data``, in order (host arrays)."""
  fn = apply if hasattr(apply, "lower") else jax.jit(apply)  # a jitted apply is reused
  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  out = []
  for i in range(datasets.num_eval_batches(int(data.labels.shape[0]), batch_size)):
    x, labels, mask = _eval_images(data, i, batch_size, mean, std)
    out.append((jnp.argmax(fn(variables, x), -1), labels, mask))
  preds, labels, mask = (np.concatenate(a) for a in zip(*jax.device_get(out)))
  return labels[mask], preds[mask]


@functools.partial(jax.jit, static_argnums=(2,))
def _eval_images(data, index, batch_size, mean, std):
  """Evaluation batch ``index``, normalized: compiled once per batch size and set shape
  (every validation of every stage reuses it)."""
  images, labels, mask = datasets.eval_batch(data, index, batch_size)
  return datasets.normalize(images, mean, std), labels, mask


def classify(apply, variables, data: datasets.DeviceData, batch_size: int, mean, std,
             num_classes: int) -> dict[str, Any]:
  """Accuracy, macro precision/recall/F1 and the confusion matrix of a model on ``data``."""
  labels, preds = predict(apply, variables, data, batch_size, mean, std)
  return metrics_lib.classification_report(labels, preds, num_classes)


def deployed(variables: dict[str, Any], ranges: dict | None = None,
             epsilon: float | None = folding.DEFAULT_EPSILON) -> dict[str, Any]:
  """What a deployed model stores: batch norm folded into the convolutions (only their
  per-channel biases stay, `folding.strip_batchnorm`; ``epsilon`` is the model's, None
  keeps batch norm unfolded), plus the static activation ranges as float32 pairs."""
  tree = dict(variables) if epsilon is None else folding.strip_batchnorm(
      folding.fold_batchnorm(variables, epsilon), epsilon)
  if ranges:
    tree["activation_ranges"] = {k: np.asarray(v, np.float32)
                                 for k, v in sorted(ranges.items())}
  return tree


def export_bytes(variables: Any, spec: quantization.Spec | None, where=None,
                 ranges: dict | None = None, epsilon: float = folding.DEFAULT_EPSILON) -> int:
  """Bytes of the packed export of a model (float export for ``spec=None``).

  Batch norm is folded first (`deployed`) unless ``spec`` quantizes per tensor: per output
  channel, the codes of the folded kernel are those of the kernel (signs aside; the
  scales absorb the fold), so the export re-grids the folded kernels on purpose; one
  scale per tensor does not commute with the fold, so such exports keep batch norm.
  """
  per_tensor = spec is not None and spec.granularity != "channel"
  tree = deployed(variables, ranges, None if per_tensor else epsilon)
  if spec is None:
    return quantization.nbytes(quantization.export(tree, None))
  return quantization.nbytes(quantization.export(tree, spec, where, regrid=not per_tensor))


def _init(model, key, shape):
  # Runs once: compiled without LLVM optimization, as its many threefry draws take ~20 s to
  # compile on CPU at the default level (~2 s at level 0); eager init is as slow, op by op.
  init = jax.jit(lambda k: model.init(k, np.zeros((1, *shape), np.float32), train=False))
  compiled = init.lower(key).compile({"xla_backend_optimization_level": 0})
  return jax.device_get(compiled(key))


def _split(v):
  return v["params"], {k: x for k, x in v.items() if k != "params"}


class _Group(NamedTuple):
  """A group of seeds trained together, and what every stage of it needs."""
  plan: Plan
  data: Data
  seeds: tuple[int, ...]
  roots: list[str]
  keys: list[jax.Array]
  ckpt_root: Callable[[str], str]
  tag: str


def _train(g: _Group, stage: StagePlan, model, inits: list[Any], txs: list[Any],
           teacher: list[Any] | None, *, forward=None, to_variables=None,
           include_start=False, stage_id: int) -> list[engine.Trained]:
  """Trains one stage for the group with best-on-validation selection."""
  p, d = g.plan, g.data
  keys = [jax.random.fold_in(k, stage_id) for k in g.keys]
  train_sets = [datasets.TrainSet(d.train, jax.random.fold_in(k, 1)) for k in keys]
  params, states = zip(*[_split(v) for v in inits])
  loss = (kd_loss(p.temperature, p.alpha) if stage.loss == "kd" else ce_loss)
  teach = None if stage.loss != "kd" else engine.Teacher(image_forward(p.teacher), teacher)
  apply = p.teacher_apply if model is p.teacher else p.student_apply
  validate = lambda v: classify(apply, v, d.val, p.eval_batch_size, d.info.mean, d.info.std,
                                d.info.num_classes)["accuracy"]
  data_fn = datasets.image_data_fn(p.train.batch_size, d.info.mean, d.info.std, p.padding,
                                   p.flip)
  group = training.stack if len(inits) > 1 else (lambda xs: xs[0])
  return engine.train_group(
      p.train, f"{g.tag} {stage.name}", forward=forward or image_forward(model), loss_fn=loss,
      data_fn=data_fn, inits=list(params), txs=txs,
      keys=[jax.random.fold_in(k, 2) for k in keys], steps=stage.steps,
      ckpt_dir=g.ckpt_root(stage.name), model_states=list(states),
      data=group(train_sets), teacher=teach, to_variables=to_variables, validate=validate,
      validate_every=p.eval_every, include_start=include_start,
      show=("loss", "accuracy"))


def _lora(g: _Group, stage: StagePlan, starts: list[Any], teachers: list[Any],
          stage_id: int) -> list[engine.Trained]:
  """Trains LoRA adapters on each seed's model; returns the merged variables."""
  p = g.plan
  paths = set(p.lora_paths)
  adapters = [lora.init(jax.random.fold_in(k, 104 + stage_id), v["params"], rank=p.lora_rank,
                        alpha=p.lora_alpha, where=lambda q: q in paths)
              for k, v in zip(g.keys, starts)]
  merge = lambda params: lora.merge(params["base"], params["lora"], p.lora_alpha)
  inner = image_forward(p.student)

  def forward(variables, batch, *, train, rngs, mutable=()):
    merged = {**variables, "params": merge(variables["params"])}
    if p.lora_bn == "frozen":
      out = inner(merged, batch, train=False, rngs=rngs)
      return (out, {k: variables[k] for k in mutable}) if mutable else out
    return inner(merged, batch, train=train, rngs=rngs, mutable=mutable)

  inits = [{**v, "params": {"base": v["params"], "lora": a}} for v, a in zip(starts, adapters)]
  txs = [lora.optimizer(engine.optimizer(stage.optimizer))] * len(starts)
  out = _train(g, stage, p.student, inits, txs, teachers, forward=forward,
               to_variables=lambda s: {**s.model_state, "params": merge(s.params)},
               include_start=True, stage_id=stage_id)
  return out


def _trainable_params(p: Plan, stage: StagePlan) -> int:
  """Numbers a stage trains: none for PTQ, the adapters for LoRA (``r * (in + out)`` per
  adapted kernel, from the shapes alone), else every parameter of the student."""
  if stage.kind == "ptq":
    return 0
  params = p.student_shapes["params"]
  if stage.kind == "lora":
    paths = set(p.lora_paths)
    return lora.num_parameters(jax.eval_shape(lambda x: lora.init(
        jax.random.key(0), x, rank=p.lora_rank, alpha=p.lora_alpha,
        where=lambda q: q in paths), params))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def _ranges(stage_dir: str, g: _Group, key, wq) -> dict[str, tuple[float, float]]:
  """Static activation ranges of the INT8-weight model, calibrated once and cached."""
  p, d = g.plan, g.data
  path = os.path.join(stage_dir, "ranges.json")
  if os.path.exists(path):
    with open(path) as f:
      return {k: tuple(v) for k, v in json.load(f).items()}
  batches = [datasets.normalize(datasets.train_batch(d.train, key, i, p.train.batch_size)[0],
                                d.info.mean, d.info.std) for i in range(p.calib_batches)]
  ranges = quantization.calibrate(lambda x: p.student_eval.apply(wq, x, train=False), batches,
                                  p.act_spec)
  if parallel.is_main_process():
    reporting.write_json(path, ranges)
  return ranges


def _measure(g: _Group, apply, variables, spec=None, ranges=None, **extra) -> dict[str, Any]:
  """Test metrics, export bytes and FLOPs of one model (the same for every row; latency is
  timed for all rows together, `_latencies`)."""
  p, d = g.plan, g.data
  rep = classify(apply, variables, d.test, p.eval_batch_size, d.info.mean, d.info.std,
                 d.info.num_classes)
  model = p.teacher if apply is p.teacher_apply else p.student
  nbytes = export_bytes(variables, spec, p.quant_where, ranges, model.bn_epsilon)
  counts = training.param_counts(variables["params"])
  return {**extra, "accuracy": rep["accuracy"], "f1": rep["macro_f1"],
          "precision": rep["macro_precision"], "recall": rep["macro_recall"],
          "f1_per_class": rep["f1"], "confusion": rep["confusion"],
          "params_total": counts["params"], "params_nonzero": counts["nonzero"],
          "bytes": int(nbytes), "flops": training.flops(apply, variables, d.sample)}


def _served(p: Plan, model: Any, variables: list[Any], spec: quantization.Spec | None,
            fwd: Any, cache: dict) -> tuple[Any, list[Any]]:
  """A row's served form, for timing: ``(jitted apply, stored variables per seed)``.

  As the export stores it (`export_bytes`): batch norm folded into the convolutions (kept
  when ``spec`` quantizes per tensor), quantized kernels held as integer codes
  (`serving.QTensor`) and dequantized inside the jitted function, which rebuilds the folded
  BN constants (XLA then removes the BN arithmetic). ``fwd`` is the row's forward with
  activation quantization (dynamic or static int8 rows), or None for the plain model.
  Rows of one form share one jitted apply (one compile).
  """
  eps = model.bn_epsilon
  fold = spec is None or spec.granularity == "channel"
  like = jax.eval_shape(lambda: variables[0])
  stored = []
  for v in variables:
    t = folding.strip_batchnorm(folding.fold_batchnorm(v, eps), eps) if fold else dict(v)
    if spec is not None:
      t = {**t, "params": serving.to_integers(t["params"], spec, p.quant_where)}
    stored.append(t)
  key = (id(model), fold, spec is None, id(fwd) if fwd is not None else None)
  if key not in cache:
    run = fwd or (lambda v, x: model.apply(v, x, train=False))
    restore = ((lambda t: folding.restore_batchnorm(t, like, eps)) if fold else (lambda t: t))
    cache[key] = jax.jit(lambda t, x: run(restore(serving.dequantize(t)), x))
  return cache[key], stored


def _best(r: engine.Trained) -> dict[str, Any]:
  if not r.best:
    return {}
  return {"val_accuracy": r.best["val_accuracy"], "best_step": r.best["step"],
          "nonfinite_steps": engine.nonfinite_steps(r.history)}


def run_group(g: _Group) -> list[list[dict[str, Any]]]:
  """Runs the teacher and every stage for the group's seeds; one record list per seed."""
  p = g.plan
  n = len(g.seeds)
  dirs = lambda name: [os.path.join(r, name) for r in g.roots]
  record = lambda d, name, fn: engine.record(d, name, fn, ("accuracy", "bytes"))

  timed = []  # (served apply, served variables per seed) of every row, for `engine.time_rows`
  cache = {}
  t0 = lambda: [_init(p.teacher, jax.random.fold_in(k, 101), p.image_shape) for k in g.keys]
  teachers = engine.restore_or_run(
      dirs("teacher"), [p.teacher_shapes] * n, lambda: _train(
          g, p.teacher_stage, p.teacher, t0(), [engine.optimizer(p.teacher_stage.optimizer)] * n,
          None, stage_id=0))
  teacher_vars = [r.variables for r in teachers]
  records = [[record(d, "teacher", lambda r=r: _measure(
      g, p.teacher_apply, r.variables, model=p.teacher_name, bits=32,
      trainable_params=training.param_counts(r.variables["params"])["params"], **_best(r)))]
      for d, r in zip(dirs("teacher"), teachers)]
  timed.append(_served(p, p.teacher, teacher_vars, None, None, cache))

  s0 = lambda: [_init(p.student, jax.random.fold_in(k, 102), p.image_shape) for k in g.keys]
  current, masks = None, [None] * n
  for i, stage in enumerate(p.stages):
    stage_id = i + 1
    starts = s0() if stage.from_init or current is None else current
    fresh = stage.kind if stage.kind in ("prune", "quantize") else None
    spec = p.weight_spec if stage.kind == "ptq" or "quantize" in stage.constraints else None
    extra = dict(model=p.student_name, bits=spec.bits if spec else 32,
                 trainable_params=_trainable_params(p, stage))
    mask_targets = None
    if stage.kind == "ptq":
      run = lambda starts=starts, masks=masks: [engine.Trained(
          {**v, "params": quantization.ptq(v["params"], p.weight_spec, where=p.quant_where)},
          [], m, None) for v, m in zip(starts, masks)]
    elif stage.kind == "quantize" and stage.steps == 0:
      run = lambda starts=starts, masks=masks: [engine.Trained(
          {**v, "params": jax.device_get(quantization.quantize_tree(
              v["params"], p.weight_spec, where=p.quant_where))}, [], m, None)
          for v, m in zip(starts, masks)]
    elif stage.kind == "lora":
      run = lambda starts=starts, stage=stage, sid=stage_id: _lora(g, stage, starts,
                                                                    teacher_vars, sid)
    else:
      opt = engine.optimizer(stage.optimizer)
      txs = [compose(opt, stage.constraints, p.prune, p.weight_spec, fresh=fresh,
                     steps=stage.steps, masks=m, where=p.quant_where) for m in masks]
      run = lambda starts=starts, stage=stage, txs=txs, sid=stage_id: _train(
          g, stage, p.student, starts, txs, teacher_vars, stage_id=sid)
      if stage.kind == "prune":
        mask_targets = [carried_masks(compose(optax.identity(), ("prune",), p.prune,
                                              p.weight_spec, where=p.quant_where).init(
                                                  v["params"])) for v in starts]
    results = engine.restore_or_run(dirs(stage.name), [p.student_shapes] * n, run, mask_targets)
    current = [r.variables for r in results]
    if stage.kind == "prune":
      masks = [r.masks for r in results]
    label = stage.name.split("_", 1)[1]
    fwds = []
    for recs, d, r in zip(records, dirs(stage.name), results):
      apply, ranges, row, fwd = p.student_apply, None, dict(extra), None
      if stage.kind == "ptq" and stage.option != "weights":
        if stage.option == "static":
          ranges = _ranges(d, g, jax.random.fold_in(g.keys[0], 107), r.variables)
        fwd = quantization.quantize_activations(
            lambda v, x: p.student_eval.apply(v, x, train=False), p.act_spec, stage.option,
            ranges=ranges)
        apply = jax.jit(fwd)
        row.update(act_bits=p.act_spec.bits, act_mode=stage.option)
      recs.append(record(d, label, lambda r=r, apply=apply, ranges=ranges, row=row, s=spec:
                         _measure(g, apply, r.variables, s, ranges, **row, **_best(r))))
      fwds.append(fwd)
    timed.append(_served(p, p.student, current, spec, fwds[0], cache))
  # The served forms, timed with the teacher in the same rounds, at the latency batch and
  # at the eval batch (the first test images).
  big = g.data.sample if p.eval_batch_size == p.latency_batch else np.asarray(
      datasets.normalize(g.data.info.test_images[:p.eval_batch_size], g.data.info.mean,
                         g.data.info.std))
  for recs, j in zip(records, range(n)):
    for key, sample in (("latency", g.data.sample), ("latency_eval", big)):
      engine.time_rows(recs, [(apply, vs[j]) for apply, vs in timed], sample,
                       p.latency_repeats, key)
  return records


def _targets(table: list[dict[str, Any]], targets) -> str:
  """The config's pass marks, checked on the last row (the final student) against the first."""
  teacher, final = table[0], table[-1]
  ratio = final["accuracy"] / max(teacher["accuracy"], 1e-12)
  smaller = 1.0 - final["bytes"] / teacher["bytes"]
  verdict = lambda ok: "met" if ok else "NOT met"
  lines = [f"\n## Targets (final stage `{final['name']}` against the teacher)\n",
           f"accuracy {final['accuracy']:.4f} = {ratio:.1%} of the teacher's "
           f"{teacher['accuracy']:.4f}; size {final['bytes']:,.0f} bytes = {smaller:.1%} "
           f"smaller than the teacher's {teacher['bytes']:,.0f}.\n"]
  for label, acc_bar, size_bar in targets:
    lines.append(f"- {label}: accuracy >= {acc_bar:.0%} of the teacher "
                 f"{verdict(ratio >= acc_bar)}, >= {size_bar:.0%} fewer bytes "
                 f"{verdict(smaller >= size_bar)}")
  return "\n".join(lines) + "\n"


def _header(config: Any, plan: Plan, info: datasets.VisionData) -> list[tuple[str, Any]]:
  """The run's facts for the top of results.md."""
  steps = ", ".join([f"teacher {plan.teacher_stage.steps}"] + [
      f"{s.name.split('_', 1)[1]} {s.steps}" for s in plan.stages])
  return [("study", "vision"), ("size", config.get("size", "-")),
          ("data", f"{config.dataset}: {info.train_images.shape[0]} train, "
                   f"{info.val_images.shape[0]} validation, {info.test_images.shape[0]} test "
                   f"images of {plan.image_shape}, {info.num_classes} classes"),
          ("models", f"{plan.teacher_name} -> {plan.student_name}"),
          ("steps per stage", steps + f" (batch {plan.train.batch_size}; best on validation "
                              f"every {plan.eval_every})"),
          ("seeds", ", ".join(map(str, plan.seeds))),
          ("device", f"{len(jax.devices())} x {jax.devices()[0].device_kind}")]


def _legend(plan: Plan, info: datasets.VisionData) -> dict[str, str]:
  """What each column of the vision table measures."""
  n = info.test_images.shape[0]
  return {
      "name": "the stage (the teacher first, then `stages` in order, each from the "
              "previous stage's model)",
      "model": "the architecture",
      "accuracy": f"top-1 accuracy on the {n} test images (a fraction)",
      "f1": f"macro-averaged F1 over the {info.num_classes} classes, same images",
      "acc_vs_teacher": "accuracy / the teacher's (same seed)",
      "params_total": "parameters (the params collection; batch-norm statistics excluded)",
      "params_nonzero": "parameters that are not exactly zero",
      "bytes": "bytes of the packed export: batch norm folded into the convolutions (one "
               "float32 bias per channel), quantized kernels as integer codes plus one "
               "float32 scale per output channel, the rest float32; sparse tensors as a "
               "bitmask plus the non-zero values; plus static activation ranges",
      "compression": "the teacher's bytes / the stage's bytes",
      "flops": f"XLA's FLOP count of one forward pass on {plan.latency_batch} image(s)",
      "latency_ms": f"median wall time of one jitted forward pass of the served model on "
                    f"{plan.latency_batch} image(s), in ms, over {plan.latency_repeats} rounds "
                    f"on this device, every row of a seed timed in the same interleaved "
                    f"rounds (served: batch norm folded into the convolutions as the export "
                    f"stores it, quantized kernels as integer codes dequantized in the jit)",
      "latency_text": "the served model's latency / the teacher's: the median of the "
                      "per-round ratios and their 10th and 90th percentiles; 'noisy' when "
                      "those cover 1 (the difference is within the machine's noise)",
      "latency_eval_text": f"the same at the eval batch ({plan.eval_batch_size} images)",
  }


def run(config: Any, workdir: str) -> list[dict[str, Any]]:
  """Runs the vision study of ``config`` in ``workdir``; returns the stage records.

  Writes ``metrics.json`` (every record), ``results.md`` (one row per stage, the mean and
  standard deviation over seeds when there are several, and the config's targets) and the
  plots (accuracy against packed bytes; the final stage's confusion matrix), from process 0.

  Args:
    config: a config like ``experiments/vision_kd_lora_int8.py``'s (validated first).
    workdir: output directory (created); finished stages found there are reused.

  Returns:
    One flat record per stage and seed (keys: name, model, accuracy, f1, precision, recall,
    confusion, params_total, params_nonzero, bytes, compression, acc_vs_teacher, flops,
    latency_ms, val_accuracy, best_step, trainable_params, bits, seed, ...).
  """
  plan = validate(config)
  os.makedirs(workdir, exist_ok=True)
  logging.info("devices: %s", jax.devices())
  info = load_data(config)
  if info.num_classes != plan.num_classes or info.train_images.shape[1:] != plan.image_shape:
    raise ValueError(f"dataset {config.dataset} gave {info.num_classes} classes of "
                     f"{info.train_images.shape[1:]} images, expected {plan.num_classes} of "
                     f"{plan.image_shape}")
  train, val, test = (datasets.to_device(x, y) for x, y in (
      (info.train_images, info.train_labels), (info.val_images, info.val_labels),
      (info.test_images, info.test_labels)))
  # The latency batch: the first test images (repeated if the test split is smaller).
  idx = np.arange(plan.latency_batch) % info.test_images.shape[0]
  sample = np.asarray(datasets.normalize(info.test_images[idx], info.mean, info.std))
  data = Data(info, train, val, test, sample)
  groups = [plan.seeds] if plan.train.vmap_seeds else [(s,) for s in plan.seeds]
  records = []
  for seeds in groups:
    roots = [os.path.join(workdir, f"seed_{s}") for s in seeds]
    sweep = os.path.join(workdir, "sweep_" + "-".join(map(str, seeds)))
    ckpt_root = lambda name, roots=roots, sweep=sweep: os.path.join(
        roots[0] if len(roots) == 1 else sweep, name, "ckpt")
    tag = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds}"
    g = _Group(plan, data, seeds, roots, [jax.random.key(s) for s in seeds], ckpt_root, tag)
    for seed, seed_records in zip(seeds, run_group(g)):
      base = seed_records[0]
      for r in seed_records:
        r.update(seed=int(seed), compression=base["bytes"] / r["bytes"],
                 acc_vs_teacher=r["accuracy"] / max(base["accuracy"], 1e-12))
      records += seed_records
  if len(plan.seeds) > 1:
    table = reporting.aggregate(records, COLUMNS)
    models = {r["name"]: r["model"] for r in records}
    for row in table:
      row.update(model=models[row["name"]],
                 acc_vs_teacher=row["accuracy"] / max(table[0]["accuracy"], 1e-12))
  else:
    table = [dict(r) for r in records]
  for row in table:
    same = [r for r in records if r["name"] == row["name"]]
    row["latency_text"] = engine.latency_text(same)
    row["latency_eval_text"] = engine.latency_text(same, "latency_eval")
  title = (f"compressjax vision: {plan.teacher_name} -> {plan.student_name}, "
           f"{config.dataset}, seeds {plan.seeds}")
  engine.write_report(
      workdir, records, table=table, class_names=list(info.class_names), title=title,
      columns=COLUMNS, footer=_targets(table, plan.targets),
      header=_header(config, plan, info), legend=_legend(plan, info),
      context=f"{config.dataset} {plan.image_shape[0]}x{plan.image_shape[1]}, "
              f"{info.num_classes} classes",
      finals=[table[-1]["name"]], pareto_label="test accuracy")
  return records
