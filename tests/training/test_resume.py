"""Resumable runs and non-finite gradients: the loop with `RunCheckpoints` and a skip count."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compressjax.training import checkpoint
from compressjax.training import loop
from compressjax.training import steps

NUM_STEPS, EVERY = 9, 3


def _forward(variables, batch, **unused_kw):
  return {"y": batch["x"] @ variables["params"]["w"]}


def _loss(outputs, batch):
  err = (outputs["y"] - batch["t"]) ** 2
  return jnp.mean(err), {}


def _data(key, step=None, data=None):
  x = jax.random.normal(key, (8, 3))
  return {"x": x, "t": x @ jnp.array([1.0, -2.0, 0.5])}


TX = optax.adam(0.1)
STEP = steps.make_train_step(_forward, TX, _loss, _data)


def _fresh():
  return steps.create_train_state({"w": jnp.zeros(3)}, TX, jax.random.key(0))


class _Stop(Exception):
  pass


def _interrupt_at(step):
  def on_log(s, unused_metrics):
    if s == step:
      raise _Stop
  return on_log


@pytest.fixture(scope="module")
def reference():
  state, history = loop.train(_fresh(), STEP, NUM_STEPS, log_every=1)
  return np.asarray(state.params["w"]), history


def test_an_interrupted_run_resumes_to_the_same_params(tmp_path, reference):
  ckpts = checkpoint.RunCheckpoints(tmp_path / "ckpt", every=EVERY)
  with pytest.raises(_Stop):
    loop.train(_fresh(), STEP, NUM_STEPS, log_every=1, checkpoints=ckpts,
               on_log=_interrupt_at(5))
  assert ckpts.all_steps() == [3]
  state, history = loop.train(_fresh(), STEP, NUM_STEPS, log_every=1, checkpoints=ckpts)
  np.testing.assert_array_equal(state.params["w"], reference[0])
  assert int(state.step) == NUM_STEPS
  # The history is whole: the restored entries then the new ones, one per step.
  assert [h["step"] for h in history] == list(range(1, NUM_STEPS + 1))
  np.testing.assert_allclose([h["loss"] for h in history], [h["loss"] for h in reference[1]],
                             rtol=1e-6)
  assert ckpts.all_steps() == [6, 9]  # keep=2: orbax dropped step 3 as 9 landed
  # Called again on a finished run, the loop only restores.
  again, _ = loop.train(_fresh(), STEP, NUM_STEPS, log_every=1, checkpoints=ckpts,
                        on_log=_interrupt_at(-1))
  np.testing.assert_array_equal(again.params["w"], reference[0])
  ckpts.close()


def test_an_unreadable_latest_checkpoint_is_set_aside_and_the_previous_one_used(
    tmp_path, reference, caplog):
  ckpts = checkpoint.RunCheckpoints(tmp_path / "ckpt", every=EVERY, keep=3)
  with pytest.raises(_Stop):
    loop.train(_fresh(), STEP, NUM_STEPS, log_every=1, checkpoints=ckpts,
               on_log=_interrupt_at(8))
  assert ckpts.all_steps() == [3, 6]
  # Truncate every data file of the newest checkpoint (a disk filled mid-write).
  files = [f for f in glob.glob(str(tmp_path / "ckpt" / "6" / "state" / "**"), recursive=True)
           if os.path.isfile(f) and os.path.getsize(f) > 8]
  assert files
  for f in files:
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)
  with caplog.at_level("WARNING"):
    state, _ = loop.train(_fresh(), STEP, NUM_STEPS, log_every=1, checkpoints=ckpts)
  np.testing.assert_array_equal(state.params["w"], reference[0])
  assert any("unreadable" in r.getMessage() for r in caplog.records)
  # Nothing was deleted: the damaged checkpoint was moved aside, untouched.
  moved = tmp_path / "ckpt_unreadable" / "6"
  assert moved.is_dir() and len([f for f in moved.rglob("*") if f.is_file()]) >= len(files)
  assert ckpts.all_steps() == [3, 6, 9]  # step 6 written afresh on the way
  ckpts.close()


def test_checkpoints_of_another_run_length_are_refused(tmp_path):
  with checkpoint.RunCheckpoints(tmp_path / "ckpt", every=EVERY) as ckpts:
    loop.train(_fresh(), STEP, NUM_STEPS, log_every=1, checkpoints=ckpts)
    with pytest.raises(ValueError, match="outside this run's steps"):
      loop.train(_fresh(), STEP, 4, log_every=1, checkpoints=ckpts)


def test_bad_checkpoint_settings_are_rejected(tmp_path):
  with pytest.raises(ValueError, match="every must be an int >= 1"):
    checkpoint.RunCheckpoints(tmp_path, every=0)
  with pytest.raises(ValueError, match="keep must be an int >= 2"):
    checkpoint.RunCheckpoints(tmp_path, every=5, keep=1)


# --- non-finite gradients -----------------------------------------------------------------


def _poisoned_data(key, step=None, data=None):
  """Batches whose targets are NaN with probability 0.3 (drawn from the same key)."""
  batch = _data(key)
  bad = jax.random.uniform(jax.random.fold_in(key, 1)) < 0.3
  return {**batch, "t": jnp.where(bad, jnp.nan, batch["t"])}


def _expected_bad_steps(key, n):
  """The steps the host predicts to be poisoned, by replaying the step's key splits."""
  bad = []
  for i in range(n):
    key, data_key, _ = jax.random.split(key, 3)
    if float(jax.random.uniform(jax.random.fold_in(data_key, 1))) < 0.3:
      bad.append(i)
  return bad


def test_nonfinite_gradients_are_skipped_and_counted():
  tx = optax.apply_if_finite(optax.adam(0.1), max_consecutive_errors=10 ** 6)
  step = steps.make_train_step(_forward, tx, _loss, _poisoned_data)
  n = 30
  state = steps.create_train_state({"w": jnp.zeros(3)}, tx, jax.random.key(0))
  state, history = loop.train(state, step, n, log_every=7, max_nonfinite=n)
  expected = _expected_bad_steps(jax.random.key(0), n)
  assert 0 < len(expected) < n
  assert sum(h["nonfinite"] for h in history) == len(expected)
  assert int(state.opt_state.total_notfinite) == len(expected)
  assert np.all(np.isfinite(state.params["w"]))
  # The good steps still trained the model towards the true weights.
  truth = np.array([1.0, -2.0, 0.5])
  assert np.linalg.norm(state.params["w"] - truth) < 0.3 * np.linalg.norm(truth)


def test_a_run_that_keeps_failing_stops_with_a_clear_error_and_finite_weights():
  tx = optax.apply_if_finite(optax.adam(0.1), max_consecutive_errors=10 ** 6)
  always_nan = lambda key, *_: {**_data(key), "t": jnp.full((8,), jnp.nan)}
  step = steps.make_train_step(_forward, tx, _loss, always_nan, donate=False)
  state = steps.create_train_state({"w": jnp.ones(3)}, tx, jax.random.key(0))
  with pytest.raises(loop.Diverged, match="4 consecutive steps up to step 4 had non-finite"):
    loop.train(state, step, 50, log_every=2, max_nonfinite=4)
  with pytest.raises(ValueError, match="max_nonfinite must be None or an int >= 1"):
    loop.train(state, step, 5, max_nonfinite=0)
