"""Tests of the jitted train step and the loop: on-device data, no retrace, any optax tx."""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compressjax.channels.config import ChannelConfig
from compressjax.channels.simulate import simulate
from compressjax.models import iq_transformer as iqt
from compressjax.training import loop
from compressjax.training import multitask
from compressjax.training import steps

CHANNEL = ChannelConfig(modulation="qpsk", modulations=("bpsk", "qpsk", "psk8"), seq_len=8,
                        num_pilots=2, num_taps=2)


def _counted(fn, counter):
  def wrapped(key, *rest):
    counter.append(1)  # runs only while tracing
    return fn(key, *rest)
  return wrapped


T_CFG = iqt.IQTransformerConfig(width=8, depth=1, num_heads=1, head_dim=4, mlp_dim=8, patch=2,
                                seq_len=8, num_classes=3, num_symbols=4, num_taps=2)


@pytest.fixture(scope="module")
def distill(tiny_model):
  """One compiled student step with a teacher, intermediates and the real simulator."""
  model, params = tiny_model
  teacher = iqt.IQTransformer(T_CFG)
  t_vars = {"params": iqt.init_params(T_CFG, jax.random.key(9))}
  traces = []
  data_fn = _counted(multitask.multitask_data_fn(CHANNEL, 8, simulate=simulate), traces)

  def loss_fn(outputs, batches, teacher_outputs):
    loss, m = multitask.task_losses(outputs, batches)
    gap = jnp.mean((outputs["modulation"] - teacher_outputs["modulation"]) ** 2)
    (attn,) = outputs["intermediates"]["block_0"]["attn"]["attention"]
    (t_attn,) = teacher_outputs["intermediates"]["block_0"]["attn"]["attention"]
    direct = teacher.apply(t_vars, batches["modulation"].iq)["modulation"]
    return loss + gap, {**m, "teacher_gap": jnp.max(jnp.abs(
        direct - teacher_outputs["modulation"])), "rows": jnp.sum(attn) / attn[..., 0].size,
                        "t_heads": t_attn.shape[1]}

  tx = optax.adam(1e-3)
  step = steps.make_train_step(multitask.multitask_forward(model.apply), tx, loss_fn, data_fn,
                               teacher_forward=multitask.multitask_forward(teacher.apply),
                               capture_intermediates=True)
  return {"step": step, "tx": tx, "params": params, "t_vars": t_vars, "traces": traces}


def test_step_draws_data_on_device_without_retracing_and_is_deterministic(distill):
  step, traces = distill["step"], distill["traces"]
  runs = []
  for _ in range(2):
    state = steps.create_train_state(distill["params"], distill["tx"], jax.random.key(7))
    state, history = loop.train(state, step, 5, log_every=2, step_args=(distill["t_vars"],))
    runs.append((state, history))
  assert len(traces) == 1
  assert [h["step"] for h in runs[0][1]] == [2, 4, 5]
  assert int(runs[0][0].step) == 5
  np.testing.assert_array_equal(jax.random.key_data(runs[0][0].key),
                                jax.random.key_data(runs[1][0].key))
  for a, b in zip(jax.tree.leaves(runs[0][0].params), jax.tree.leaves(runs[1][0].params)):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(runs[0][0].params["embed"]["kernel"],
                            distill["params"]["embed"]["kernel"])
  # A second call continues the same run, still without a new trace.
  state, history = loop.train(runs[0][0], step, 2, log_every=10,
                              step_args=(distill["t_vars"],))
  assert history[-1]["step"] == 7 and int(state.step) == 7 and len(traces) == 1
  assert {"loss", "grad_norm", "symbols/ser", "steps_per_s"} <= set(history[-1])


def test_teacher_runs_on_the_same_batches_and_intermediates_are_captured(distill):
  state = steps.create_train_state(distill["params"], distill["tx"], jax.random.key(4))
  with pytest.raises(ValueError, match="teacher_variables"):
    distill["step"](state)
  _, m = distill["step"](state, distill["t_vars"])
  # The teacher's outputs equal a direct teacher apply on the batches the student saw.
  assert float(m["teacher_gap"]) < 1e-5
  np.testing.assert_allclose(m["rows"], 1.0, rtol=1e-5)  # student attention rows sum to 1
  assert int(m["t_heads"]) == 1  # the teacher's own maps (1 head; the student has 2)


class KeepZeroState(NamedTuple):
  inner_state: optax.OptState
  mask: optax.Params
  count: jax.Array


def keep_zero(inner, mask):
  """A pruning-like wrapper: masked-out weights land exactly on 0 inside update."""
  def init_fn(params):
    return KeepZeroState(inner.init(params), mask, jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, **extra):
    u, inner_state = inner.update(updates, state.inner_state, params, **extra)
    u = jax.tree.map(lambda u, m, p: jnp.where(m, u, -p), u, state.mask, params)
    return u, KeepZeroState(inner_state, state.mask, state.count + 1)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def test_loss_decreases_under_a_wrapper_that_keeps_its_state_in_opt_state(tiny_model,
                                                                          fake_data_fn):
  # A fixed batch (memorization), so the decrease is not at the mercy of fresh data.
  model, params = tiny_model
  fixed = jax.jit(fake_data_fn)(jax.random.key(3))
  mask = jax.tree.map(lambda p: jnp.arange(p.size).reshape(p.shape) % 3 != 0, params)
  tx = optax.chain(optax.clip_by_global_norm(1.0), keep_zero(optax.adam(1e-2), mask))
  step = steps.make_train_step(multitask.multitask_forward(model.apply), tx,
                               multitask.task_losses, lambda key, *_: fixed)
  state = steps.create_train_state(params, tx, jax.random.key(2))
  losses = []
  for _ in range(30):
    state, m = step(state)
    losses.append(float(m["loss"]))
  assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
  assert int(state.opt_state[1].count) == 30
  for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(mask)):
    assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)
  kernel = state.params["block_0"]["mlp"]["fc1"]["kernel"]
  assert not np.allclose(kernel, params["block_0"]["mlp"]["fc1"]["kernel"])


class _BnNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(4)(x.reshape(x.shape[0], -1))
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(3)(x)


def test_batch_stats_are_carried_in_model_state(fake_data_fn):
  data_fn = fake_data_fn
  net = _BnNet()
  x0 = jnp.zeros((1, 8, 2))
  variables = net.init(jax.random.key(0), x0)

  def forward(v, batches, *, train, rngs, mutable=False):
    res = net.apply(v, batches["modulation"].iq, train=train, rngs=rngs, mutable=mutable)
    return ({"modulation": res[0]}, res[1]) if mutable else {"modulation": res}

  loss_fn = lambda out, b: multitask.task_losses(out, {"modulation": b["modulation"]})
  tx = optax.sgd(0.0)
  step = steps.make_train_step(forward, tx, loss_fn, data_fn)
  key = jax.random.key(5)
  state = steps.create_train_state(variables["params"], tx, key,
                                   {"batch_stats": variables["batch_stats"]})
  state, _ = step(state)
  batches = data_fn(jax.random.split(key, 3)[1])
  _, want = net.apply(variables, batches["modulation"].iq, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(state.model_state["batch_stats"]["BatchNorm_0"]["mean"],
                             want["batch_stats"]["BatchNorm_0"]["mean"], rtol=1e-5, atol=1e-7)
  assert np.any(np.asarray(state.model_state["batch_stats"]["BatchNorm_0"]["mean"]) != 0)


def test_params_in_loss_trains_extra_entries_beside_the_model(fake_data_fn):
  net = _BnNet()
  variables = net.init(jax.random.key(0), jnp.zeros((1, 8, 2)))
  params = {**variables["params"], "extra": jnp.array([1.0, -2.0])}

  def forward(v, batches, *, train, rngs, mutable=False):
    res = net.apply(v, batches["modulation"].iq, train=train, rngs=rngs, mutable=mutable)
    return ({"modulation": res[0]}, res[1]) if mutable else {"modulation": res}

  def loss_fn(out, b, params):
    loss, m = multitask.task_losses(out, {"modulation": b["modulation"]})
    return loss + jnp.sum(params["extra"] ** 2), m

  tx = optax.sgd(0.1)
  step = steps.make_train_step(forward, tx, loss_fn, fake_data_fn, params_in_loss=True)
  state = steps.create_train_state(params, tx, jax.random.key(6),
                                   {"batch_stats": variables["batch_stats"]})
  state, _ = step(state)
  # d/dx x^2 = 2x, so one SGD step scales the entry by (1 - 0.2).
  np.testing.assert_allclose(state.params["extra"], [0.8, -1.6], rtol=1e-6)


def test_progress_line_and_loop_arguments():
  line = loop.progress_line("train", 5, 10, {"loss": 0.5, "steps_per_s": 12.0}, width=10)
  assert line == "train [#####.....] 5/10  loss 0.5  12.0 steps/s"
  with pytest.raises(ValueError, match="log_every"):
    loop.train(None, None, 3, log_every=0)
