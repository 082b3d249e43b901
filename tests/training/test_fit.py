"""`training.fit`: the best model on validation, kept across a kill and a resume; the image
step (`datasets.image_data_fn` through the shared train step) on 8 devices like one."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compressjax import datasets
from compressjax import training
from compressjax.training import parallel

# ----------------------------------------------------------------- best on validation


def _step(state, *_):
  """A step that counts: params hold the step; a pure function of the state."""
  new = state._replace(step=state.step + 1, params={"w": state.params["w"] + 1.0})
  return new, {"loss": jnp.float32(1.0)}


_STEP = jax.jit(_step)
# The validation score, scripted per step (read off the params, which count steps).
SCRIPTED = {0: 0.95, 2: 0.5, 4: 0.9, 6: 0.9, 8: 0.7, 9: 0.1}


def _state():
  return training.TrainState(jnp.zeros((), jnp.int32), {"w": jnp.zeros(())}, (),
                             jax.random.key(0), {})


def _validation(include_start, seen=None):
  def score(v):
    step = int(v["params"]["w"])
    if seen is not None:
      seen.append(step)
    return SCRIPTED[step]
  return training.Validation(score, every=2, include_start=include_start)


@pytest.mark.parametrize("include_start, best_step", [(False, 6), (True, 0)])
def test_fit_keeps_the_best_validated_model_ties_to_the_later(include_start, best_step):
  seen = []
  state, history, best = training.fit(_state(), _STEP, 9,
                                      validation=_validation(include_start, seen), log_every=5)
  assert seen == ([0] if include_start else []) + [2, 4, 6, 8, 9]
  assert [h["step"] for h in history if "val_accuracy" in h] == seen
  assert int(best.step) == best_step and float(best.score) == SCRIPTED[best_step]
  assert float(best.variables["params"]["w"]) == best_step
  assert int(state.step) == 9


def test_fit_resumes_the_selection_after_a_kill(tmp_path):
  reference = training.fit(_state(), _STEP, 9, validation=_validation(False), log_every=5)

  class Killed(Exception):
    pass

  def dies_at_7(state, *args):
    if int(state.step) == 7:
      raise Killed()
    return _STEP(state, *args)

  with training.RunCheckpoints(tmp_path / "ckpt", every=4) as c:
    with pytest.raises(Killed):
      training.fit(_state(), dies_at_7, 9, validation=_validation(False), checkpoints=c,
                   log_every=5)
  assert (tmp_path / "ckpt" / "4").is_dir()
  seen = []
  with training.RunCheckpoints(tmp_path / "ckpt", every=4) as c:
    state, history, best = training.fit(_state(), _STEP, 9, checkpoints=c, log_every=5,
                                        validation=_validation(False, seen))
  assert seen == [6, 8, 9]  # from the checkpoint at step 4, not from the start
  validations = lambda h: [r for r in h if "val_accuracy" in r]
  assert validations(history) == validations(reference[1])  # restored ones included
  assert int(best.step) == int(reference[2].step) == 6
  assert float(best.variables["params"]["w"]) == 6.0 and int(state.step) == 9


def test_fit_without_validation_is_train():
  state, history, best = training.fit(_state(), _STEP, 5, log_every=5)
  assert best is None and int(state.step) == 5 and len(history) == 1


# ------------------------------------------------------- the image step on 8 devices

BATCH = 16


class _TinyBN(nn.Module):

  @nn.compact
  def __call__(self, x, train=False):
    # No bias before batch norm: its gradient is exactly zero there, and Adam would turn
    # the rounding noise of any reduction order into +-lr steps.
    x = nn.Conv(4, (3, 3), use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(3)(jnp.mean(nn.relu(x), axis=(1, 2)))


def _run(num_devices):
  mesh = parallel.make_mesh(num_devices)
  model = _TinyBN()
  rng = np.random.default_rng(0)
  data = datasets.TrainSet(datasets.to_device(
      rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8), rng.integers(0, 3, 64)),
                           jax.random.key(1))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
  tx = optax.adam(1e-2)

  def forward(v, batch, *, train, rngs, mutable=()):
    out = model.apply(v, batch["image"], train=train, mutable=mutable or False)
    return ({"label": out[0]}, out[1]) if mutable else {"label": out}

  loss = lambda o, b: (optax.softmax_cross_entropy_with_integer_labels(
      o["label"], b["label"]).mean(), {})
  data_fn = parallel.shard_data_fn(datasets.image_data_fn(BATCH, (0.5,) * 3, (0.25,) * 3,
                                                          padding=1, flip=True),
                                   mesh, BATCH, shared=lambda p: False)
  step = training.make_train_step(forward, tx, loss, data_fn, mesh=mesh)
  state = parallel.replicate(training.create_train_state(
      variables["params"], tx, jax.random.key(2), {"batch_stats": variables["batch_stats"]}),
                             mesh)
  state, history = training.train(state, step, 5, log_every=1,
                                  step_args=(None, parallel.replicate(data, mesh)),
                                  max_in_flight=parallel.safe_in_flight(mesh))
  return state, [h["loss"] for h in history]


def test_eight_devices_train_like_one_including_batch_norm_statistics():
  s1, l1 = _run(1)
  s8, l8 = _run(8)
  assert len(set(l1)) > 1
  np.testing.assert_allclose(l8, l1, rtol=1e-4)
  # Batch norm normalizes over the global batch, across devices: the running statistics agree.
  for a, b in zip(jax.tree.leaves(s8.model_state), jax.tree.leaves(s1.model_state)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree.leaves(s8.params), jax.tree.leaves(s1.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5)
  assert jax.tree.leaves(s8.params)[0].sharding.is_fully_replicated
  assert len(jax.tree.leaves(s8.params)[0].sharding.device_set) == 8
