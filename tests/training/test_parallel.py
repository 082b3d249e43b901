"""Data parallelism and vmapped sweeps: same numbers on 1 and 8 devices, one program for N seeds.

The test process has 8 CPU devices (tests/conftest.py sets XLA_FLAGS).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compressjax.channels.config import ChannelConfig
from compressjax.models import iq_transformer as iqt
from compressjax.training import loop
from compressjax.training import multitask
from compressjax.training import parallel
from compressjax.training import steps
from tests import helpers

CHANNEL = ChannelConfig(modulation="qpsk", modulations=("bpsk", "qpsk", "psk8"), seq_len=8,
                        num_pilots=2, num_taps=2, doppler_hz=100.0)
CFG = iqt.IQTransformerConfig(width=16, depth=1, num_heads=2, head_dim=4, mlp_dim=16, patch=2,
                              seq_len=8, num_classes=3, num_symbols=4, num_taps=2)
BATCH = 16
NUM_STEPS = 6


def test_the_process_has_eight_devices():
  assert jax.device_count() == 8


def _run(num_devices, seed=0, steps_=NUM_STEPS):
  mesh = parallel.make_mesh(num_devices)
  model = iqt.IQTransformer(CFG)
  tx = optax.adam(3e-3)
  data_fn = parallel.shard_data_fn(multitask.multitask_data_fn(CHANNEL, BATCH), mesh, BATCH)
  step = steps.make_train_step(multitask.multitask_forward(model.apply), tx,
                               multitask.task_losses, data_fn, mesh=mesh)
  state = steps.create_train_state(iqt.init_params(CFG, jax.random.key(seed)), tx,
                                   jax.random.key(seed + 100))
  state = parallel.replicate(state, mesh)
  state, history = loop.train(state, step, steps_, log_every=1,
                              max_in_flight=parallel.safe_in_flight(mesh))
  return state, [h["loss"] for h in history], step


@pytest.fixture(scope="module")
def one_and_eight():
  return _run(1), _run(8)


def test_one_and_eight_devices_give_the_same_loss_trajectory(one_and_eight):
  (s1, l1, _), (s8, l8, _) = one_and_eight
  assert len(l1) == NUM_STEPS and len(set(l1)) > 1  # the loss moves
  np.testing.assert_allclose(l8, l1, rtol=2e-5)
  _assert_params_close(s8.params, s1.params)


def _assert_params_close(got, want):
  """Params agree to float tolerance; the key bias (`helpers.is_key_bias`) stayed tiny."""
  helpers.assert_params_close(got, want, rtol=1e-4, atol=1e-6)
  for path, a in jax.tree_util.tree_leaves_with_path(got):
    if helpers.is_key_bias(path):
      assert np.max(np.abs(np.asarray(a))) < NUM_STEPS * 3e-3 + 1e-6


def test_eight_devices_really_split_the_batch(one_and_eight):
  (_, _, step1), (s8, _, step8) = one_and_eight
  # The params stay replicated on all 8 devices, and the compiled step reduces gradients
  # across them (the single-device step has nothing to reduce).
  leaf = jax.tree.leaves(s8.params)[0]
  assert len(leaf.sharding.device_set) == 8 and leaf.sharding.is_fully_replicated
  hlo8 = step8.lower(s8).compile().as_text()
  assert "all-reduce" in hlo8
  assert "all-gather" not in hlo8  # the batch stays where it was generated
  s1 = parallel.replicate(s8, parallel.make_mesh(1))
  assert "all-reduce" not in step1.lower(s1).compile().as_text()


def test_sharded_data_equals_unsharded_and_lives_split_over_devices():
  mesh = parallel.make_mesh(8)
  # The frame is as long as the batch: the shared pilot mask [L] must still not be split
  # (split, every step would all-gather it back).
  channel = ChannelConfig(modulation="qpsk", modulations=("bpsk", "qpsk"), seq_len=BATCH,
                          num_pilots=2, num_taps=2, doppler_hz=100.0)
  data_fn = multitask.multitask_data_fn(channel, BATCH)
  sharded = jax.jit(parallel.shard_data_fn(data_fn, mesh, BATCH))(jax.random.key(3))
  plain = jax.jit(data_fn)(jax.random.key(3))
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain)):
    np.testing.assert_array_equal(a, b)
  iq = sharded["symbols"].iq
  assert iq.sharding.spec[0] == parallel.DATA
  assert {s.data.shape[0] for s in iq.addressable_shards} == {BATCH // 8}
  assert sharded["symbols"].pilot_mask.sharding.is_fully_replicated


def test_replicate_keeps_values_and_typed_keys():
  mesh = parallel.make_mesh(4)
  tree = {"w": np.arange(6.0).reshape(2, 3), "key": jax.random.key(5)}
  out = parallel.replicate(tree, mesh)
  np.testing.assert_array_equal(out["w"], tree["w"])
  np.testing.assert_array_equal(jax.random.key_data(out["key"]),
                                jax.random.key_data(tree["key"]))
  assert out["w"].sharding.is_fully_replicated and len(out["w"].sharding.device_set) == 4


def test_multi_device_cpu_meshes_run_one_step_at_a_time():
  # XLA:CPU can deadlock with several multi-device steps queued (parallel.safe_in_flight).
  assert parallel.safe_in_flight(parallel.make_mesh(8)) == 1
  assert parallel.safe_in_flight(parallel.make_mesh(1)) == 2
  with pytest.raises(ValueError, match="max_in_flight must be None or an int >= 1"):
    loop.train(None, None, 1, max_in_flight=0)


def test_bad_device_counts_and_batch_sizes_are_rejected():
  with pytest.raises(ValueError, match=r"num_devices must be an int in \[0, 8\]"):
    parallel.make_mesh(9)
  with pytest.raises(ValueError, match="num_devices"):
    parallel.make_mesh(-1)
  with pytest.raises(ValueError, match="batch_size must be a multiple of the 8 devices"):
    parallel.shard_data_fn(lambda k: k, parallel.make_mesh(8), 12)
  with pytest.raises(ValueError, match="distributed must be one of"):
    parallel.initialize("sometimes")


@pytest.mark.parametrize("env, want", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "explicit"),
    ({k: "1" for k in parallel._SLURM} | {"SLURM_NTASKS": "4"}, "slurm"),
    ({k: "1" for k in parallel._SLURM}, None),  # a one-task SLURM job is one process
    ({"OMPI_MCA_orte_hnp_uri": "x"}, "openmpi"),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "t0"}, None),
])
def test_cluster_environment_detection(env, want):
  assert parallel.cluster_environment(env) == want


# --- vmapped sweeps -------------------------------------------------------------------------


def _sweep_parts(tx):
  model = iqt.IQTransformer(CFG)
  data_fn = multitask.multitask_data_fn(CHANNEL, 8)
  fwd = multitask.multitask_forward(model.apply)
  single = steps.make_train_step(fwd, tx, multitask.task_losses, data_fn)
  swept = steps.make_train_step(fwd, tx, multitask.task_losses, data_fn, vmap=True)
  return single, swept


def _state(seed, tx):
  return steps.create_train_state(iqt.init_params(CFG, jax.random.key(seed)), tx,
                                  jax.random.key(seed + 100))


def test_a_vmapped_sweep_of_three_seeds_equals_three_separate_runs():
  tx = optax.adam(3e-3)
  single, swept = _sweep_parts(tx)
  seeds = (0, 1, 2)
  sweep_state, sweep_hist = loop.train(steps.stack([_state(s, tx) for s in seeds]), swept,
                                       4, log_every=2)
  assert len(sweep_hist[-1]["loss"]) == 3  # one value per member
  for i, s in enumerate(seeds):
    state, hist = loop.train(_state(s, tx), single, 4, log_every=2)
    np.testing.assert_allclose([h["loss"][i] for h in sweep_hist],
                               [h["loss"] for h in hist], rtol=2e-5)
    _assert_params_close(steps.unstack(sweep_state)[i].params, state.params)
  # The members differ (different inits and data), so the comparison above means something.
  assert len({round(h, 6) for h in sweep_hist[-1]["loss"]}) == 3


def test_a_learning_rate_sweep_is_one_program_with_the_rate_in_the_state():
  rates = (1e-3, 1e-2)
  tx = optax.inject_hyperparams(optax.adam)(learning_rate=rates[0])
  single, swept = _sweep_parts(tx)

  def with_rate(lr):
    state = _state(0, tx)
    hp = {**state.opt_state.hyperparams, "learning_rate": jnp.asarray(lr, jnp.float32)}
    return state._replace(opt_state=state.opt_state._replace(hyperparams=hp))

  sweep_state, _ = loop.train(steps.stack([with_rate(r) for r in rates]), swept, 3,
                              log_every=3)
  finals = []
  for i, lr in enumerate(rates):
    state, _ = loop.train(with_rate(lr), single, 3, log_every=3)
    member = steps.unstack(sweep_state)[i]
    np.testing.assert_allclose(member.params["embed"]["kernel"],
                               state.params["embed"]["kernel"], rtol=1e-4, atol=1e-6)
    finals.append(state.params["embed"]["kernel"])
  assert not np.allclose(finals[0], finals[1])


def test_stack_rejects_an_empty_list():
  with pytest.raises(ValueError, match="trees must be a non-empty"):
    steps.stack([])
