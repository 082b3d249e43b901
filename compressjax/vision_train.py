"""Image classification on a set held on device: the train step, best-on-validation fitting,
evaluation and the cost of one model (the pieces of `compressjax.vision_pipeline`).

A train step draws its batch by index from a `compressjax.datasets.DeviceData` passed as an
argument (a closed-over set would be baked into the compiled program as a constant), augments
it (random crop with padding, horizontal flip) and normalizes it inside ``jit``; batch ``i`` is
a pure function of the data-order key and the state's step, so a run is reproducible.

A *forward* here is ``forward(params, model_state, x) -> (logits, model_state)`` in training
mode: batch norm uses batch statistics and returns its updated running averages (a LoRA forward
may instead keep batch norm in inference mode and return ``model_state`` unchanged). An *apply*
is ``apply(variables, x) -> logits`` in inference mode; one apply object is used for
evaluation, FLOPs and latency, so jit compiles it once per input shape.
"""

from collections.abc import Callable, Mapping
import functools
from typing import Any

from absl import logging
import chex
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import optax

from compressjax import datasets
from compressjax import training
from compressjax.training import metrics as metrics_lib
from compressjax.training import parallel

Forward = Callable[[Any, Mapping[str, Any], chex.Array], tuple[chex.Array, Mapping[str, Any]]]
Apply = Callable[[Mapping[str, Any], chex.Array], chex.Array]
LossFn = Callable[[chex.Array, chex.Array, chex.Array | None], chex.Array]


def model_forward(model: Any) -> Forward:
  """The training-mode forward of a linen model whose mutable collections are ``model_state``."""

  def forward(params, model_state, x):
    if not model_state:
      return model.apply({"params": params}, x, train=True), model_state
    logits, mutated = model.apply({"params": params, **model_state}, x, train=True,
                                  mutable=list(model_state))
    return logits, {**model_state, **mutated}

  return forward


def model_apply(model: Any) -> Apply:
  """The inference-mode apply of a linen model (batch norm on its running averages)."""
  return lambda variables, x: model.apply(variables, x, train=False)


def cross_entropy(logits: chex.Array, labels: chex.Array, teacher_logits=None) -> chex.Array:
  """Mean cross-entropy on integer labels (the teacher's logits are ignored)."""
  del teacher_logits
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def optimizer(name: str, learning_rate: float, steps: int, warmup_steps: int = 0,
              weight_decay: float = 0.0) -> optax.GradientTransformation:
  """SGD (momentum 0.9, Nesterov) or Adam(W), on a linear-warmup cosine schedule to zero.

  Weight decay (coupled L2 for SGD, decoupled for AdamW, Loshchilov & Hutter 2019) touches the
  Dense/Conv kernels only, never batch-norm scales or biases.

  Args:
    name: ``"sgd"``, ``"adam"`` or ``"adamw"`` (``"adam"`` is AdamW with its decay).
    learning_rate: peak learning rate.
    steps: length of the schedule.
    warmup_steps: linear warm-up steps from 0.
    weight_decay: decay coefficient (0 disables it).

  Returns:
    The optimizer.
  """
  sched = optax.warmup_cosine_decay_schedule(0.0 if warmup_steps else learning_rate,
                                             learning_rate, warmup_steps, max(steps, 1))
  mask = lambda p: jax.tree.map(lambda x: getattr(x, "ndim", 0) >= 2, p)
  if name == "sgd":
    return optax.chain(optax.add_decayed_weights(weight_decay, mask=mask),
                       optax.sgd(sched, momentum=0.9, nesterov=True))
  if name in ("adam", "adamw"):
    return optax.adamw(sched, weight_decay=weight_decay, mask=mask)
  raise ValueError(f"optimizer must be one of ('sgd', 'adam', 'adamw'), got {name!r}")


def make_step(forward: Forward, tx: optax.GradientTransformation, loss_fn: LossFn, *,
              batch_size: int, mean: Any, std: Any, order_key: chex.PRNGKey, padding: int = 4,
              flip: bool = True, teacher_apply: Apply | None = None,
              mesh: Mesh | None = None):
  """Builds ``step(state, data, teacher_variables) -> (state, metrics)``, jitted.

  Args:
    forward: the trained model's forward (see the module docstring).
    tx: optax transformation over ``state.params``.
    loss_fn: ``loss_fn(logits, labels, teacher_logits) -> scalar``.
    batch_size: examples per step (static).
    mean: per-channel normalization mean (`VisionData.mean`).
    std: per-channel normalization std.
    order_key: the data-order key (epoch permutations); augmentation uses ``state.key``.
    padding: random-crop padding in pixels (0: no crop).
    flip: random horizontal flips.
    teacher_apply: the teacher's inference apply; its logits, under ``stop_gradient``, go to
      ``loss_fn`` (``teacher_variables`` from the call; None without a teacher).
    mesh: data parallelism: each step's batch is split over this mesh (batch norm then
      normalizes over the whole batch, across devices) and the state is kept replicated;
      pass the state, data and teacher variables through `parallel.replicate`.

  Returns:
    The jitted step, the state donated. Metrics: ``loss`` and the batch ``accuracy``.
  """
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

  def step(state: training.TrainState, data: datasets.DeviceData, teacher_variables: Any):
    key, aug_key = jax.random.split(state.key)
    images, labels = datasets.train_batch(data, order_key, state.step, batch_size)
    if padding or flip:
      images = datasets.augment_batch(aug_key, images, padding, flip)
    x = datasets.normalize(images, mean, std)
    if mesh is not None:
      x, labels = parallel.shard_batch((x, labels), mesh, batch_size, shared=lambda p: False)
    teacher_logits = None
    if teacher_apply is not None:
      teacher_logits = jax.lax.stop_gradient(teacher_apply(teacher_variables, x))

    def objective(params):
      logits, model_state = forward(params, state.model_state, x)
      return loss_fn(logits, labels, teacher_logits), (logits, model_state)

    (loss, (logits, model_state)), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    acc = jnp.mean(jnp.argmax(logits, -1) == labels)
    new = training.TrainState(state.step + 1, params, opt_state, key, dict(model_state))
    if mesh is not None:
      new = jax.lax.with_sharding_constraint(new, parallel.replicated(mesh))
    return new, {"loss": loss, "accuracy": acc}

  return jax.jit(step, donate_argnums=(0,))


@functools.partial(jax.jit, static_argnums=(2,))
def _eval_images(data, index, batch_size, mean, std):
  images, labels, mask = datasets.eval_batch(data, index, batch_size)
  return datasets.normalize(images, mean, std), labels, mask


def predict(apply: Apply, variables: Mapping[str, Any], data: datasets.DeviceData,
            batch_size: int, mean: Any, std: Any) -> tuple[np.ndarray, np.ndarray]:
  """Predicted classes of every example of ``data``, in order.

  Args:
    apply: inference apply (jitted here; pass the same object to `cost` to share compiles).
    variables: the model's variables.
    data: the set on device.
    batch_size: evaluation batch size (the last batch is padded and masked out).
    mean: normalization mean.
    std: normalization std.

  Returns:
    ``(labels, preds)`` host int arrays of the set's size.
  """
  fn = jax.jit(apply)
  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  out = []
  for i in range(datasets.num_eval_batches(int(data.labels.shape[0]), batch_size)):
    x, labels, mask = _eval_images(data, i, batch_size, mean, std)
    out.append((jnp.argmax(fn(variables, x), -1), labels, mask))
  preds, labels, mask = (np.concatenate(a) for a in zip(*jax.device_get(out)))
  return labels[mask], preds[mask]


def fit(state: training.TrainState, step_fn: Callable[..., Any], steps: int, *,
        step_args: tuple[Any, ...], to_variables: Callable[[training.TrainState], Any],
        val_accuracy: Callable[[Any], float], eval_every: int, log_every: int,
        name: str, include_start: bool = False, max_in_flight: int | None = 2
        ) -> tuple[Any, list[dict[str, float]], dict[str, float]]:
  """Trains ``steps`` steps, evaluating on validation every ``eval_every``; keeps the best.

  Ties go to the later model.

  Args:
    state: the starting state (donated).
    step_fn: from `make_step`.
    steps: steps to run.
    step_args: ``(data, teacher_variables)`` for every step.
    to_variables: the deployable variables of a state (e.g. LoRA adapters merged).
    val_accuracy: validation accuracy of such variables.
    eval_every: steps between validations (the last step is always validated).
    log_every: steps between progress lines.
    name: label of the progress lines.
    include_start: the model before the first step is a candidate too (for fine-tuning: the
      stage then never ends worse on validation than it began).
    max_in_flight: steps queued ahead at most (`parallel.safe_in_flight` of the mesh).

  Returns:
    ``(best_variables, history, best)``: host arrays of the best model, the train log plus one
    ``{"step", "val_accuracy"}`` entry per validation, and ``{"step", "val_accuracy"}`` of the
    best.

  Raises:
    FloatingPointError: if the loss or the weights became non-finite.
  """
  history: list[dict[str, float]] = []
  best = {"step": -1, "val_accuracy": -1.0}
  best_vars = None
  done = 0
  while True:
    if done > 0 or include_start or steps == 0:
      variables = jax.device_get(to_variables(state))
      acc = float(val_accuracy(variables))
      history.append({"step": done, "val_accuracy": acc})
      logging.info("%s step %d/%d: val accuracy %.4f", name, done, steps, acc)
      if acc >= best["val_accuracy"]:
        best, best_vars = {"step": done, "val_accuracy": acc}, variables
    if done >= steps:
      break
    n = min(eval_every, steps - done)
    state, log = training.train(state, step_fn, n, log_every=min(log_every, n),
                                step_args=step_args, name=f"{name} @{done}",
                                show=("loss", "accuracy"), max_in_flight=max_in_flight)
    history += log
    done += n
    if not np.isfinite(log[-1]["loss"]):
      raise FloatingPointError(f"{name}: the loss became non-finite at step {done}; lower "
                               f"the learning rate")
  bad = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(best_vars)
         if not np.all(np.isfinite(np.asarray(x)))]
  if bad:
    raise FloatingPointError(f"{name}: non-finite weights in {bad[:3]}")
  return best_vars, history, best


def classify(apply: Apply, variables: Mapping[str, Any], data: datasets.DeviceData,
             batch_size: int, mean: Any, std: Any, num_classes: int) -> dict[str, Any]:
  """Accuracy, macro precision/recall/F1 and the confusion matrix of a model on ``data``."""
  labels, preds = predict(apply, variables, data, batch_size, mean, std)
  return metrics_lib.classification_report(labels, preds, num_classes)


def cost(apply: Apply, variables: Mapping[str, Any], sample: chex.Array, nbytes: int,
         repeats: int) -> dict[str, Any]:
  """Parameter counts of ``variables["params"]``, the given bytes, XLA FLOPs and latency.

  Args:
    apply: inference apply (the same object as in `predict`, so it compiles once per shape).
    variables: the model's variables.
    sample: one normalized input batch (its batch size is the one measured).
    nbytes: bytes of the packed export (computed by the caller from the export).
    repeats: timed calls for the median latency.

  Returns:
    ``{"params_total", "params_nonzero", "bytes", "flops", "latency_ms"}``.
  """
  counts = training.param_counts(variables["params"])
  return {"params_total": counts["params"], "params_nonzero": counts["nonzero"],
          "bytes": int(nbytes), "flops": training.flops(apply, variables, sample),
          "latency_ms": 1e3 * training.latency(apply, variables, sample, repeats=repeats)}
