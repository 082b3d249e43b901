"""`studies.engine`: non-finite updates skipped and counted, a best-on-validation stage,
vmapped seeds equal to one by one, files from process 0 only, restore instead of rerun."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compressjax.studies import engine
from compressjax.training import parallel

PLAN = engine.TrainPlan(batch_size=8, log_every=5, checkpoint_every=0, keep_checkpoints=2,
                        max_nonfinite=50, num_devices=1, vmap_seeds=False)


def _forward(variables, batch, *, train, rngs, mutable=()):
  del train, rngs, mutable
  return {"y": batch["x"] @ variables["params"]["w"]}


def _loss(outputs, batch):
  return jnp.mean((outputs["y"] - batch["t"]) ** 2), {}


def _data(key, step=None, data=None):
  x = jax.random.normal(key, (8, 3))
  return {"x": x, "t": x @ jnp.array([1.0, -2.0, 0.5])}


def _poisoned(key, step=None, data=None):
  """Targets that are NaN on every third step (the step is an argument of the data_fn)."""
  batch = _data(key)
  return {**batch, "t": jnp.where(step % 3 == 0, jnp.nan, batch["t"])}


def _group(data_fn, seeds=(0,), **kw):
  inits = [{"w": jnp.zeros(3)} for _ in seeds]
  return engine.train_group(PLAN, "test", forward=_forward, loss_fn=_loss, data_fn=data_fn,
                            inits=inits, txs=[optax.sgd(0.1)] * len(seeds),
                            keys=[jax.random.key(s) for s in seeds], steps=30,
                            ckpt_dir="/nonexistent", **kw)


def test_non_finite_updates_are_skipped_and_counted():
  (r,), (clean,) = _group(_poisoned), _group(_data)
  assert engine.nonfinite_steps(r.history) == 10   # steps 0, 3, ..., 27
  assert engine.nonfinite_steps(clean.history) == 0
  w = np.asarray(r.variables["params"]["w"])
  assert np.all(np.isfinite(w))
  np.testing.assert_allclose(w, [1.0, -2.0, 0.5], atol=0.1)  # it still learned


def test_a_stage_keeps_its_best_validated_model():
  # Validation prefers w[0] closest to 0.5: an early model, not the final one (near 1).
  score = lambda v: -abs(float(v["params"]["w"][0]) - 0.5)
  (r,) = _group(_data, validate=score, validate_every=5)
  (final,) = _group(_data)
  assert 0 < r.best["step"] < 30
  assert abs(float(r.variables["params"]["w"][0]) - 0.5) < abs(
      float(final.variables["params"]["w"][0]) - 0.5)


def test_vmapped_seeds_equal_the_seeds_one_by_one():
  swept = _group(_data, seeds=(0, 1))
  for i, s in enumerate((0, 1)):
    (one,) = _group(_data, seeds=(s,))
    np.testing.assert_allclose(swept[i].variables["params"]["w"],
                               one.variables["params"]["w"], rtol=1e-5, atol=1e-6)
  assert not np.allclose(swept[0].variables["params"]["w"], swept[1].variables["params"]["w"])


def _stage(tmp_path, name="s"):
  d = str(tmp_path / name)
  trained = engine.Trained({"params": {"w": np.ones(3, np.float32)}}, [{"loss": 1.0}], None,
                           {"step": 2, "val_accuracy": 0.5})
  target = {"params": {"w": np.zeros(3, np.float32)}}
  return d, trained, target


def test_only_process_zero_writes_files(tmp_path, monkeypatch):
  monkeypatch.setattr(parallel, "is_main_process", lambda: False)
  d, trained, target = _stage(tmp_path)
  engine.restore_or_run([d], [target], lambda: [trained])
  engine.record(d, "s", lambda: {"accuracy": 1.0})
  engine.write_report(str(tmp_path), [{"name": "s", "accuracy": 1.0}], columns=(
      ("name", "stage", "{}"),))
  written = sorted(os.path.relpath(os.path.join(r, f), tmp_path)
                   for r, _, fs in os.walk(tmp_path) for f in fs)
  # Only the orbax checkpoint (a collective every process joins): no JSON, no report.
  assert written and all(w.startswith(os.path.join("s", "variables")) for w in written)


def test_a_finished_stage_is_restored_not_rerun(tmp_path):
  d, trained, target = _stage(tmp_path)
  engine.restore_or_run([d], [target], lambda: [trained])

  def rerun():
    raise AssertionError("a finished stage ran again")

  (restored,) = engine.restore_or_run([d], [target], rerun)
  np.testing.assert_array_equal(restored.variables["params"]["w"], np.ones(3))
  assert restored.best == trained.best and restored.history == trained.history
  assert json.load(open(os.path.join(d, "history.json")))["best"]["step"] == 2


def test_optimizer_plans():
  for name in engine.OPTIMIZERS:
    tx = engine.optimizer(engine.OptimizerPlan(name, 0.1, 10, 2, 1e-4, 0.05, True))
    params = {"k": jnp.ones((2, 2)), "b": jnp.ones(2)}
    state = tx.init(params)
    for _ in range(3):  # past the warm-up's first step (learning rate 0)
      updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    # Kernels-only decay: with zero gradients the kernel decays, the bias does not move.
    assert float(jnp.abs(updates["b"]).max()) == 0.0
    assert float(updates["k"].max()) < 0.0
  with pytest.raises(ValueError, match="optimizer must be one of"):
    engine.optimizer(engine.OptimizerPlan("rmsprop", 0.1, 10))
