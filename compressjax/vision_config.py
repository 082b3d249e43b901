"""Checks a vision-study config and resolves it (models, shapes, specs), before any work.

`validate` reads every field `compressjax.vision_pipeline.run` uses and raises
``ValueError("<field> must be ..., got X")`` on the first bad one; nothing is loaded, trained
or written. Model shapes come from ``jax.eval_shape`` of ``init`` (no computation), which is
enough to check the LoRA rank against the student's kernels.
"""

import math
import os
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from compressjax import lora
from compressjax import quantization
from compressjax import selection
from compressjax import vision_train
from compressjax.datasets import DATASETS
from compressjax.datasets import digits
from compressjax.models import mobilenet_v2
from compressjax.models import resnet
from compressjax.training import parallel

STAGES = ("teacher", "student", "distill", "lora", "int8_weights", "int8_dynamic",
          "int8_static")
QUANT_MODES = ("weights", "dynamic", "static")
OPTIMIZERS = ("sgd", "adam", "adamw")
LORA_BN = ("frozen", "update")
LORA_LOSSES = ("kd", "ce")
DISTILL_INIT = ("scratch", "student")
NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "cifar100_coarse": 20}
CIFAR_TRAIN = 50000


class Setup(NamedTuple):
  """What a config resolves to.

  Attributes:
    num_classes: classes of the dataset.
    image_shape: ``(height, width, channels)`` of the model input.
    teacher: the ResNet module.
    student: the MobileNetV2 module as trained (``student.depthwise_impl``).
    teacher_apply: the teacher's inference apply (one object: jit compiles it once).
    student_apply: the student's inference apply with ``depthwise_impl="conv"`` (the layer
      that activation quantization intercepts), used for every student row.
    teacher_name: e.g. ``"resnet18 w64"``.
    student_name: e.g. ``"mobilenet_v2 x1.0"``.
    teacher_shapes: abstract ``{"params", "batch_stats"}`` of the teacher.
    student_shapes: abstract variables of the student.
    lora_paths: the student kernels that get adapters.
    weight_spec: the INT8 weight quantizer.
    act_spec: the INT8 activation quantizer.
    quant_where: predicate on the parameter path of the quantized kernels.
    stage_ids: a number per stage, folded into the seed's key.
  """
  num_classes: int
  image_shape: tuple[int, int, int]
  teacher: Any
  student: Any
  teacher_apply: Callable[..., Any]
  student_apply: Callable[..., Any]
  teacher_name: str
  student_name: str
  teacher_shapes: Any
  student_shapes: Any
  lora_paths: tuple[str, ...]
  weight_spec: quantization.Spec
  act_spec: quantization.Spec
  quant_where: Callable[[str], bool]
  stage_ids: dict[str, int]


def _check(cond: bool, field: str, value: Any, allowed: str) -> None:
  if not cond:
    raise ValueError(f"{field} must be {allowed}, got {value!r}")


def _is_int(v: Any, lo: int) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= lo


def _is_num(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_train_fields(cfg: Any, field: str, min_steps: int) -> None:
  _check(_is_int(cfg.steps, min_steps), f"{field}.steps", cfg.steps, f"an int >= {min_steps}")
  _check(cfg.optimizer in OPTIMIZERS, f"{field}.optimizer", cfg.optimizer,
         f"one of {OPTIMIZERS}")
  _check(_is_num(cfg.learning_rate) and cfg.learning_rate > 0, f"{field}.learning_rate",
         cfg.learning_rate, "a finite number > 0")
  _check(_is_num(cfg.weight_decay) and cfg.weight_decay >= 0, f"{field}.weight_decay",
         cfg.weight_decay, "a finite number >= 0")
  _check(_is_int(cfg.warmup_steps, 0) and cfg.warmup_steps < max(cfg.steps, 1),
         f"{field}.warmup_steps", cfg.warmup_steps, f"an int in [0, {field}.steps)")


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


def _models(config: Any, classes: int):
  t, s = config.teacher, config.student
  try:
    teacher = resnet.ResNet(stage_sizes=tuple(t.stage_sizes), num_classes=classes,
                            width=t.width)
  except (TypeError, ValueError) as e:
    raise ValueError(f"teacher: {e}") from None
  stages = mobilenet_v2.CIFAR_STAGES if not s.stages else tuple(tuple(r) for r in s.stages)
  try:
    student = mobilenet_v2.MobileNetV2(classes, s.width_multiplier, stages,
                                       depthwise_impl=s.depthwise_impl)
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


def validate(config: Any) -> Setup:
  """Checks every field a vision run uses and resolves the config; raises before any work.

  Args:
    config: an ``ml_collections.ConfigDict`` shaped like
      ``experiments/vision_kd_lora_int8.py``.

  Returns:
    The resolved `Setup`.

  Raises:
    ValueError: naming the field, its value and what is allowed.
  """
  _check(config.get("study", "vision") == "vision", "study", config.get("study"), "'vision'")
  seeds = tuple(config.seeds)
  _check(len(seeds) > 0 and all(_is_int(s, 0) for s in seeds) and len(set(seeds)) == len(seeds),
         "seeds", config.seeds, "a non-empty tuple of distinct ints >= 0")
  classes, shape, num_train = _data(config)
  tr = config.train
  _check(_is_int(tr.batch_size, 1) and tr.batch_size <= num_train, "train.batch_size",
         tr.batch_size, f"an int in [1, {num_train}] (the training split's size)")
  for f in ("eval_every", "log_every"):
    _check(_is_int(tr[f], 1), f"train.{f}", tr[f], "an int >= 1")
  try:
    devices = parallel.check_num_devices(tr.num_devices, "train.num_devices")
    parallel.check_batch_size(tr.batch_size, devices, "train.batch_size")
  except ValueError as e:
    raise ValueError(f"{e} (train.num_devices={tr.num_devices})") from None
  a = config.augment
  _check(_is_int(a.padding, 0) and a.padding < shape[0], "augment.padding", a.padding,
         f"an int in [0, {shape[0]})")
  _check(isinstance(a.flip, bool), "augment.flip", a.flip, "a bool")
  for name in ("teacher", "student", "distill"):
    _check_train_fields(config[name], name, 1)
  _check_train_fields(config.lora, "lora", 0)
  d = config.distill
  _check(_is_num(d.temperature) and d.temperature > 0, "distill.temperature", d.temperature,
         "a finite number > 0")
  _check(_is_num(d.alpha) and 0 <= d.alpha <= 1, "distill.alpha", d.alpha, "a number in [0, 1]")
  _check(d.init in DISTILL_INIT, "distill.init", d.init, f"one of {DISTILL_INIT}")
  l = config.lora
  _check(_is_int(l.rank, 1), "lora.rank", l.rank, "an int >= 1")
  _check(_is_num(l.alpha) and l.alpha > 0, "lora.alpha", l.alpha, "a finite number > 0")
  _check(l.bn in LORA_BN, "lora.bn", l.bn, f"one of {LORA_BN}")
  _check(l.loss in LORA_LOSSES, "lora.loss", l.loss, f"one of {LORA_LOSSES}")
  _check(isinstance(l.classifier, bool), "lora.classifier", l.classifier, "a bool")
  q = config.quantize
  try:
    weight_spec = quantization.Spec(bits=q.bits, symmetric=True, granularity=q.granularity)
    act_spec = quantization.Spec(bits=q.bits, symmetric=q.act_symmetric)
  except (TypeError, ValueError) as e:
    raise ValueError(f"quantize.{e}") from None
  modes = tuple(q.modes)
  _check(len(modes) > 0 and set(modes) <= set(QUANT_MODES) and len(set(modes)) == len(modes),
         "quantize.modes", q.modes, f"a non-empty tuple of distinct names from {QUANT_MODES}")
  for f, allowed in (("weight_method", quantization.RANGE_METHODS),
                     ("calib_method", quantization.RANGE_METHODS)):
    _check(q[f] in allowed, f"quantize.{f}", q[f], f"one of {tuple(allowed)}")
  _check(_is_int(q.calib_batches, 1), "quantize.calib_batches", q.calib_batches, "an int >= 1")
  _check(isinstance(q.skip_depthwise, bool), "quantize.skip_depthwise", q.skip_depthwise,
         "a bool")
  e = config.eval
  for f in ("batch_size", "latency_batch", "latency_repeats"):
    _check(_is_int(e[f], 1), f"eval.{f}", e[f], "an int >= 1")

  teacher, student = _models(config, classes)
  student_eval = student.clone(depthwise_impl="conv")
  x = jax.ShapeDtypeStruct((1, *shape), np.float32)
  init = lambda m: jax.eval_shape(lambda x: m.init(jax.random.key(0), x, train=False), x)
  teacher_shapes, student_shapes = init(teacher), init(student)
  paths = lora_paths(student_shapes["params"], l.rank, l.classifier)
  if not paths:
    flat = dict((selection.path_str(p), x.shape) for p, x in
                jax.tree_util.tree_leaves_with_path(student_shapes["params"]))
    widest = max(min(math.prod(flat[p][:-1]), flat[p][-1])
                 for p in lora_paths(student_shapes["params"], 1, l.classifier))
    raise ValueError(f"lora.rank must be <= {widest} (the widest min(in, out) of the "
                     f"student's non-depthwise kernels), got {l.rank}")
  skip_dw = q.skip_depthwise
  quant_where = lambda p: (selection.default_where(p)
                           and not (skip_dw and "/depthwise/" in f"/{p}"))
  return Setup(
      num_classes=classes, image_shape=shape, teacher=teacher, student=student,
      teacher_apply=vision_train.model_apply(teacher),
      student_apply=vision_train.model_apply(student_eval),
      teacher_name=f"resnet{2 + 2 * sum(teacher.stage_sizes)} w{teacher.width}",
      student_name=f"mobilenet_v2 x{student.width_multiplier:g}",
      teacher_shapes=teacher_shapes, student_shapes=student_shapes, lora_paths=paths,
      weight_spec=weight_spec, act_spec=act_spec, quant_where=quant_where,
      stage_ids={name: i for i, name in enumerate(STAGES)})
