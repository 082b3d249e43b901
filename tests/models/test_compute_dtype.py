"""``train.compute_dtype``: bfloat16 compute with float32 params and optimizer state."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compressjax import training
from compressjax.channels import ChannelConfig
from compressjax.models import iq_transformer
from compressjax.studies import wireless
from experiments import sweep
from tests import helpers

_CHANNEL = ChannelConfig(modulation="qpsk", modulations=("bpsk", "qpsk"), seq_len=16,
                         num_pilots=0, profile="awgn", snr_db=20.0)
_CFG = iq_transformer.IQTransformerConfig(width=16, depth=1, num_heads=2, head_dim=8,
                                          mlp_dim=32, patch=2, seq_len=16, num_classes=2,
                                          num_symbols=4, num_taps=1, dtype="bfloat16")


def _dtypes(tree):
  return {str(x.dtype) for x in jax.tree.leaves(tree)}


def test_bfloat16_computes_in_bfloat16_and_returns_float32():
  params = iq_transformer.init_params(_CFG, jax.random.key(0))
  assert _dtypes(params) == {"float32"}
  x = jax.random.normal(jax.random.key(1), (4, 16, 2))
  apply = iq_transformer.IQTransformer(_CFG).apply
  out = apply({"params": params}, x)
  assert {str(v.dtype) for v in out.values()} == {"float32"}
  # Every matmul of the embedding, blocks and heads runs on bfloat16 operands (the residual
  # stream stays float32, as with float32 params added to it).
  dots = [e for e in jax.make_jaxpr(apply)({"params": params}, x).jaxpr.eqns
          if e.primitive.name == "dot_general"]
  assert len(dots) >= 8 and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
  f32 = iq_transformer.IQTransformer(dataclasses.replace(_CFG, dtype="float32"))
  ref = f32.apply({"params": params}, x)
  for k in ref:   # bfloat16 keeps 8 bits of mantissa: close, not equal
    err = np.abs(np.asarray(out[k]) - np.asarray(ref[k])).max()
    assert 0 < err < 0.05 * np.abs(np.asarray(ref[k])).max() + 1e-2, k


def test_a_bfloat16_step_trains_on_cpu_with_float32_state():
  model = iq_transformer.IQTransformer(_CFG)
  tx = optax.adam(3e-3)
  step = training.make_train_step(
      training.multitask_forward(model.apply), tx,
      lambda o, b: training.task_losses(o, b),
      training.multitask_data_fn(_CHANNEL, 32, ("modulation", "symbols")))
  state = training.create_train_state(iq_transformer.init_params(_CFG, jax.random.key(0)),
                                      tx, jax.random.key(1))
  losses = []
  for _ in range(40):
    state, metrics = step(state)
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
  assert _dtypes(state.params) == {"float32"}
  assert _dtypes(state.opt_state) <= {"float32", "int32"}


def test_compute_dtype_reaches_the_models_and_is_checked():
  c = sweep.get_config("tiny")
  helpers.set_fields(c, {"train.compute_dtype": "bfloat16"})
  plan = wireless.validate(c)
  assert plan.teacher.dtype == plan.student.dtype == "bfloat16"
  assert plan.train.compute_dtype == "bfloat16"
  helpers.set_fields(c, {"train.compute_dtype": "float16"})
  with pytest.raises(ValueError, match=r"train.compute_dtype must be one of \('float32', "
                                       r"'bfloat16'\), got 'float16'"):
    wireless.validate(c)
