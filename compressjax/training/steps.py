"""The train state and the jitted train step that draws its own data on device.

One step is ``key -> data_fn -> forward -> loss -> grads -> tx.update -> apply_updates``,
all inside one ``jax.jit`` with the state donated, so training never touches the host
(the flax examples' ``train_step`` is the model). ``tx`` is any optax transformation:
the compression wrappers keep their state (masks, latent weights, counts) in
``opt_state`` and land the params on their constraints inside ``update``, so the step
needs nothing beyond ``optax.apply_updates``.

A *forward function* follows Flax's ``apply`` protocol but takes the whole batch
pytree::

  forward(variables, batches, *, train, rngs, mutable) -> outputs
                                                 (or (outputs, mutated) if mutable)

and returns a dict of arrays. `compressjax.training.multitask.multitask_forward` builds
one for the I/Q transformer; a single-input model needs only
``lambda v, b, **kw: {"label": model.apply(v, b.image, **kw)}``.

Distillation: give ``teacher_forward`` and the step runs the teacher on the same
batches under ``lax.stop_gradient`` and calls ``loss_fn(outputs, batches,
teacher_outputs)``; the teacher's variables are an argument of the step (not closed
over, so they are not baked into the compiled program as constants).
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import optax

Batches = Any
Outputs = dict[str, Any]
Metrics = dict[str, jax.Array]
ForwardFn = Callable[..., Any]
DataFn = Callable[[chex.PRNGKey, jax.Array, Any], Batches]
LossFn = Callable[..., tuple[jax.Array, Metrics]]
StepFn = Callable[..., tuple["TrainState", Metrics]]

INTERMEDIATES = "intermediates"


class TrainState(NamedTuple):
  """Everything a training run carries from step to step (a pytree; orbax-checkpointable).

  Attributes:
    step: int32 scalar, steps taken.
    params: the ``"params"`` collection.
    opt_state: state of ``tx`` (inner optimizer and any compression wrapper).
    key: typed PRNG key; each step splits it for its data and dropout.
    model_state: other mutable collections, e.g. ``{"batch_stats": ...}``; empty for
      models without batch norm.
  """
  step: jax.Array
  params: optax.Params
  opt_state: optax.OptState
  key: jax.Array
  model_state: Mapping[str, Any]

  def variables(self) -> dict[str, Any]:
    """``{"params": params, **model_state}``, ready for ``model.apply``."""
    return {"params": self.params, **self.model_state}


def create_train_state(params: optax.Params, tx: optax.GradientTransformation,
                       key: chex.PRNGKey, model_state: Mapping[str, Any] | None = None
                       ) -> TrainState:
  """Builds a step-0 `TrainState`, initializing ``tx`` on ``params``.

  Args:
    params: initial parameters.
    tx: any optax transformation.
    key: a typed PRNG key (``jax.random.key``); raw uint32 keys are wrapped.
    model_state: other variable collections (``batch_stats``), or None.

  Returns:
    The state, holding its own copies of every array (the step donates the state's
    buffers; the caller's arrays, and any array ``tx.init`` captured, stay valid).
  """
  if not jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))
  # Copies, so that donating the state to the step never deletes the caller's arrays
  # (a teacher's params reused to start a student, a mask a wrapper keeps in its state).
  params, key, model_state = jax.tree.map(jnp.copy, (params, key, dict(model_state or {})))
  opt_state = jax.tree.map(jnp.copy, tx.init(params))
  return TrainState(jnp.zeros((), jnp.int32), params, opt_state, key, model_state)


def _run_forward(forward: ForwardFn, variables: Mapping[str, Any], batches: Batches, *,
                 train: bool, rngs: dict[str, Any], mutable: list[str],
                 capture: bool) -> tuple[Outputs, dict[str, Any]]:
  if mutable:
    outputs, mutated = forward(variables, batches, train=train, rngs=rngs, mutable=mutable)
    mutated = dict(mutated)
  else:
    outputs, mutated = forward(variables, batches, train=train, rngs=rngs), {}
  if capture:
    outputs = {**outputs, INTERMEDIATES: mutated.pop(INTERMEDIATES, {})}
  return outputs, mutated


def make_train_step(forward: ForwardFn, tx: optax.GradientTransformation, loss_fn: LossFn,
                    data_fn: DataFn, *, teacher_forward: ForwardFn | None = None,
                    capture_intermediates: bool = False, params_in_loss: bool = False,
                    donate: bool = True, mesh: Mesh | None = None,
                    vmap: bool = False) -> StepFn:
  """Builds ``step(state, teacher_variables=None, data=None) -> (state, metrics)``, jitted.

  Args:
    forward: the student's forward function (see the module docstring).
    tx: any optax transformation, compression wrappers included.
    loss_fn: ``loss_fn(outputs, batches) -> (scalar, metrics)``; with a teacher,
      ``loss_fn(outputs, batches, teacher_outputs)``. Metrics are dicts of scalars.
    data_fn: ``data_fn(key, step, data) -> batches``, traced into the step: ``key`` is
      fresh per step, ``step`` the state's step count and ``data`` the step's ``data``
      argument (None when not given). A simulator draws from the key alone
      (`compressjax.training.multitask.multitask_data_fn`); a set held on device is passed
      as ``data`` (an argument, not closed over: a constant would be baked into the
      compiled program) and indexed by the step (`compressjax.datasets.image_data_fn`).
    teacher_forward: optional teacher forward; run with ``train=False`` on the same
      batches, under ``stop_gradient``, with ``teacher_variables`` from the call.
    capture_intermediates: also collect the sown ``intermediates`` (attention maps,
      block features) of student and teacher, as ``outputs["intermediates"]``.
    params_in_loss: also call ``loss_fn(..., params=params)`` with the trainable tree,
      for a weight penalty or a trainable loss part such as a FitNets hint projection
      kept beside the model's entries (``params["kd_projection"]``: Flax ignores the
      entries a model does not use; keep it out of the compression ``where=``).
    donate: donate the state's buffers to the step (the caller must not reuse the
      state it passed in).
    mesh: data parallelism: the state is kept replicated over this mesh (pass a state
      from `parallel.replicate` and a ``data_fn`` from `parallel.shard_data_fn`).
    vmap: a sweep in one program: the state and the teacher's variables carry a leading
      axis (`stack`, one entry per seed or hyperparameter value) and the step is
      ``jax.vmap``-ed over it; metrics gain that axis.

  Returns:
    The jitted step. Its metrics hold ``loss``, ``grad_norm``, ``nonfinite`` (1.0 when
    a gradient had a NaN or Inf, for `loop.train` to count; wrap ``tx`` in
    ``optax.apply_if_finite`` to skip such updates) and whatever ``loss_fn`` reports;
    they stay on device until the caller fetches them.
  """
  capture = bool(capture_intermediates)
  loss_kwargs = (lambda p: {"params": p}) if params_in_loss else (lambda p: {})

  def step(state: TrainState, teacher_variables: Any = None, data: Any = None):
    if teacher_forward is not None and teacher_variables is None:
      raise ValueError("teacher_variables must be given to a step built with a "
                       "teacher_forward, got None")
    key, data_key, dropout_key = jax.random.split(state.key, 3)
    batches = data_fn(data_key, state.step, data)
    extra = ()
    if teacher_forward is not None:
      teacher_out, _ = _run_forward(
          teacher_forward, teacher_variables, batches, train=False, rngs={},
          mutable=[INTERMEDIATES] if capture else [], capture=capture)
      extra = (jax.lax.stop_gradient(teacher_out),)
    mutable = list(state.model_state) + ([INTERMEDIATES] if capture else [])

    def objective(params):
      outputs, mutated = _run_forward(
          forward, {"params": params, **state.model_state}, batches, train=True,
          rngs={"dropout": dropout_key}, mutable=mutable, capture=capture)
      loss, metrics = loss_fn(outputs, batches, *extra, **loss_kwargs(params))
      return loss, (metrics, mutated)

    (loss, (metrics, mutated)), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
               "nonfinite": 1.0 - finite.astype(jnp.float32)}
    new_state = TrainState(state.step + 1, params, opt_state, key,
                           {**state.model_state, **mutated})
    if mesh is not None:
      new_state = jax.lax.with_sharding_constraint(new_state, NamedSharding(mesh, P()))
    return new_state, metrics

  if vmap:
    step = jax.vmap(step)
  return jax.jit(step, donate_argnums=(0,) if donate else ())


def stack(trees: Sequence[Any]) -> Any:
  """Stacks pytrees of one structure along a new leading axis (states of a sweep)."""
  if not trees:
    raise ValueError("trees must be a non-empty sequence, got an empty one")
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Any) -> list[Any]:
  """Inverse of `stack`: the list of pytrees along the leading axis."""
  n = jax.tree.leaves(tree)[0].shape[0]
  return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


def make_predict_fn(forward: ForwardFn) -> Callable[[Mapping[str, Any], Batches], Outputs]:
  """Jitted ``predict(variables, batches) -> outputs`` in inference mode (``train=False``)."""

  def predict(variables, batches):
    return forward(variables, batches, train=False, rngs={})

  return jax.jit(predict)
