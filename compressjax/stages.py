"""Pipeline stages: parsing, config validation, and the stacking of constraint wrappers.

A pipeline is a comma-separated list of stages (`STAGES`); `validate` checks every field
a run uses before any work, and `compose` builds a stage's optimizer as the stack of the
constraint wrappers of the stages so far (earliest innermost).
"""

from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from compressjax import pruning
from compressjax import quantization
from compressjax import selection
from compressjax import training
from compressjax.training import parallel
from compressjax.channels import ChannelConfig
from compressjax.channels import constellations
from compressjax.models import iq_transformer

STAGES = ("prune", "quantize", "distill", "finetune")
DISTILL_STUDENTS = ("inherit", "small")


class Stage(NamedTuple):
  """One pipeline stage: its kind (a name in `STAGES`) and an option (or None)."""
  kind: str
  option: str | None = None


class PrunePlan(NamedTuple):
  """A prune stage's settings (`pruning.wrap`'s arguments; ``schedule``: how it ramps).

  Attributes:
    sparsity: the target sparsity (None: the structure's own, e.g. 2:4).
    score: a registered pruning score.
    structure: a registered pruning structure.
    scope: ``"layer"`` or ``"global"``.
    schedule: ``"polynomial"`` (Zhu & Gupta, over the stage's first half) or
      ``"one_shot"`` (at its first step).
  """
  sparsity: float | None = 0.5
  score: str = "magnitude"
  structure: str = "unstructured"
  scope: str = "layer"
  schedule: str = "polynomial"


class Setup(NamedTuple):
  """What a config resolves to, validated before any work."""
  channel: ChannelConfig
  teacher: iq_transformer.IQTransformerConfig
  student: iq_transformer.IQTransformerConfig
  pipelines: dict[str, tuple[Stage, ...]]
  spec: quantization.Spec
  prune: PrunePlan


def parse_stages(text: str, field: str = "pipelines") -> tuple[Stage, ...]:
  """Parses ``"prune,quantize,distill:small"`` into stages (errors name ``field``)."""
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
    elif option:
      raise ValueError(f"{field}: stage {kind!r} takes no option, got {item!r}")
    stages.append(Stage(kind, option or None))
  return tuple(stages)


def _check(cond: bool, field: str, value: Any, allowed: str) -> None:
  if not cond:
    raise ValueError(f"{field} must be {allowed}, got {value!r}")


def _is_int(v: Any, lo: int) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v >= lo


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


def validate(config: Any) -> Setup:
  """Checks every field a run uses and resolves the config; raises before any work.

  Args:
    config: an ``ml_collections.ConfigDict`` shaped like ``experiments/common.py``.

  Returns:
    The resolved `Setup`.

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
  seeds = tuple(config.seeds)
  _check(len(seeds) > 0 and all(_is_int(s, 0) for s in seeds), "seeds", config.seeds,
         "a non-empty tuple of ints >= 0")
  _check(len(set(seeds)) == len(seeds), "seeds", config.seeds, "distinct")
  t = config.train
  _check(_is_int(t.steps, 1), "train.steps", t.steps, "an int >= 1")
  _check(_is_int(t.batch_size, 1), "train.batch_size", t.batch_size, "an int >= 1")
  _check(_is_int(t.warmup_steps, 0) and t.warmup_steps < t.steps, "train.warmup_steps",
         t.warmup_steps, f"an int in [0, train.steps={t.steps})")
  _check(_is_int(t.log_every, 1), "train.log_every", t.log_every, "an int >= 1")
  _check(isinstance(t.vmap_seeds, bool), "train.vmap_seeds", t.vmap_seeds, "True or False")
  _check(_is_int(t.checkpoint_every, 0), "train.checkpoint_every", t.checkpoint_every,
         "an int >= 0 (0 = no periodic checkpoints)")
  _check(_is_int(t.keep_checkpoints, 2), "train.keep_checkpoints", t.keep_checkpoints,
         "an int >= 2 (one to fall back on)")
  _check(_is_int(t.max_nonfinite, 1), "train.max_nonfinite", t.max_nonfinite, "an int >= 1")
  try:
    devices = parallel.check_num_devices(t.num_devices, "train.num_devices")
    parallel.check_batch_size(t.batch_size, devices, "train.batch_size")
  except ValueError as e:
    raise ValueError(f"{e} (train.num_devices={t.num_devices})") from None
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
  _check(isinstance(d.temperature, (int, float)) and d.temperature > 0,
         "distill.temperature", d.temperature, "a number > 0")
  _check(isinstance(d.alpha, (int, float)) and 0 <= d.alpha <= 1, "distill.alpha",
         d.alpha, "a number in [0, 1]")
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
  pipelines = {}
  for name, text in config.pipelines.items():
    _check(isinstance(text, str), f"pipelines.{name}", text,
           f"a comma-separated string of stages from {STAGES}")
    stages = parse_stages(text, f"pipelines.{name}")
    _check(len(stages) > 0, f"pipelines.{name}", text, f"at least one stage of {STAGES}")
    pipelines[name] = stages
  return Setup(channel, teacher, student, pipelines, spec, prune)


def prune_plan(p: Any) -> PrunePlan:
  """Checks a config's ``prune`` block (errors name ``prune.<field>``); returns its plan."""
  _check(p.schedule in ("polynomial", "one_shot"), "prune.schedule", p.schedule,
         "one of ('polynomial', 'one_shot')")
  plan = PrunePlan(p.sparsity, p.score, p.structure, p.scope, p.schedule)
  # The wrapper validates sparsity, score, structure and scope; build one to ask it.
  try:
    _prune_tx(optax.sgd(0.0), plan, pruning.one_shot(0))
  except ValueError as e:
    raise ValueError(f"prune.{e}") from None
  return plan


def _prune_tx(inner, p: PrunePlan, schedule, masks=None, where=None):
  return pruning.wrap(inner, sparsity=p.sparsity, score=p.score, structure=p.structure,
                      scope=p.scope, schedule=schedule, initial_masks=masks,
                      **({} if where is None else {"where": where}))


def compose(inner: optax.GradientTransformation, kinds: tuple[str, ...], prune: PrunePlan,
            spec: quantization.Spec, fresh: str | None = None, steps: int = 0,
            masks: Any = None, where: Any = None) -> optax.GradientTransformation:
  """Stacks the wrappers of the constraint ``kinds`` around ``inner``, earliest innermost.

  Args:
    inner: the optimizer.
    kinds: constraint stages in order ("prune", "quantize").
    prune: the prune stage's settings.
    spec: the quantize stage's quantizer.
    fresh: the kind this stage introduces (its schedule runs over the stage); earlier
      kinds are re-applied at step 0 (the grid from the incoming weights; the masks
      from ``masks``, else re-derived by the stage's score, which keeps the pruned set
      only when the score ranks the zeros lowest).
    steps: the stage's steps (for the gradual pruning schedule).
    masks: the prune stage's keep masks (`carried_masks` or `masks_from_params`),
      passed as ``initial_masks`` to every prune wrapper, so that no weight it pruned
      comes back and no other is pruned in its place; None re-derives them.
    where: which parameters both wrappers act on (a path predicate); None: their
      default (the kernels).

  Returns:
    The wrapped optimizer.
  """
  tx = inner
  for kind in kinds:
    if kind == "prune":
      if kind == fresh and prune.schedule == "polynomial":
        end = max(steps // 2, 1)
        schedule = pruning.polynomial(begin=0, end=end, every=max(end // 10, 1))
      else:
        schedule = pruning.one_shot(0)
      tx = _prune_tx(tx, prune, schedule, masks, where)
    elif kind == "quantize":
      tx = quantization.wrap(tx, spec, **({} if where is None else {"where": where}))
  return tx


def carried_masks(opt_state: Any) -> Any:
  """The keep masks of the pruning wrapper in an optimizer state, or None if it has none.

  Args:
    opt_state: the final optimizer state of a stage (a vmapped sweep's holds every
      member's masks stacked on a leading axis: unstack them first).

  Returns:
    Masks to pass to `compose` (``masks=``) in the stages after it, or None.
  """
  try:
    return pruning.masks(opt_state)
  except ValueError:
    return None


def masks_from_params(params: Any, prune: PrunePlan) -> Any:
  """Keep masks read off the prune stage's params: its pruned weights are its exact zeros.

  Exact on the output of a prune stage that runs on float weights (``prune`` before
  ``quantize``), where a kept weight is 0.0 with probability zero. On params already
  on a grid (``quantize,prune``) a kept weight that rounds to 0 reads as pruned; the
  exact masks are those of the stage's state (`carried_masks`). Biases of pruned
  neurons/channels/heads are left to follow their kernels.

  Args:
    params: the prune stage's final params.
    prune: the prune stage's settings (they pick the pruned kernels).

  Returns:
    Masks for `compose` (``masks=``): ``params != 0`` at the pruned kernels, None
    elsewhere.
  """
  state = _prune_tx(optax.identity(), prune, pruning.one_shot(0)).init(params)

  def mask(path, m, x):
    if isinstance(m, optax.MaskedNode) or not selection.default_where(
        selection.path_str(path)):
      return None
    return np.asarray(x) != 0
  return jax.tree_util.tree_map_with_path(
      mask, state.masks, params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
