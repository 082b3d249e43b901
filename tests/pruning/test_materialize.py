"""`pruning.materialize`: the smaller dense model gives the masked model's outputs."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from compressjax import models
from compressjax import pruning
from compressjax.models.mlp import MLP


def _random_params(init_fn, *args, seed=0):
  """Params of the layout ``init_fn`` makes, filled from NumPy (no PRNG compile).

  Biases are non-zero too, so that a dead unit's bias must really be handled.
  """
  r = np.random.default_rng(seed)
  shapes = jax.eval_shape(init_fn, *args)
  fill = lambda s: jnp.asarray(r.normal(size=s.shape) / np.sqrt(max(s.shape[0], 1)), s.dtype)
  return jax.tree.map(fill, shapes)


def _mask_once(tx, params):
  """One update with zero gradients and learning rate 0: just the masking."""
  @jax.jit
  def masked(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    return optax.apply_updates(params, updates)
  return masked(params)


def test_mlp_neuron_pruned_materializes_to_equal_outputs():
  mlp = MLP(hidden=(16, 12), num_outputs=3)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 8)), jnp.float32)
  params = _random_params(mlp.init, jax.random.key(0), x, seed=2)["params"]
  hidden = lambda p: p in ("Dense_0/kernel", "Dense_1/kernel")
  masked = _mask_once(pruning.wrap(optax.sgd(0.0), 0.5, structure="neuron", where=hidden), params)
  small = pruning.materialize(masked)
  assert [small[f"Dense_{i}"]["kernel"].shape for i in range(3)] == [(8, 8), (8, 6), (6, 3)]
  want = mlp.apply({"params": masked}, x)
  got = MLP(hidden=(8, 6), num_outputs=3).apply({"params": small}, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Under a "params" collection the same happens.
  wrapped = pruning.materialize({"params": masked})["params"]
  np.testing.assert_array_equal(wrapped["Dense_1"]["kernel"], small["Dense_1"]["kernel"])


def test_mlp_dead_units_with_bias_are_folded_only_given_the_activation():
  mlp = MLP(hidden=(16,), num_outputs=3)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 8)), jnp.float32)
  params = _random_params(mlp.init, jax.random.key(0), x, seed=3)["params"]
  k = np.asarray(params["Dense_0"]["kernel"]).copy()
  k[:, :5] = 0  # five units with no input weights but a non-zero bias: relu(b) constants
  params["Dense_0"]["kernel"] = jnp.asarray(k)
  want = mlp.apply({"params": params}, x)
  kept = pruning.materialize(params)  # act(b) unknown: nothing provably removable
  assert kept["Dense_0"]["kernel"].shape == (8, 16)
  folded = pruning.materialize(params, activation=nn.relu)
  assert folded["Dense_0"]["kernel"].shape == (8, 11)
  got = MLP(hidden=(11,), num_outputs=3).apply({"params": folded}, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_iq_transformer_head_and_neuron_pruned_materializes_to_equal_outputs():
  cfg = models.IQTransformerConfig(width=16, depth=2, num_heads=4, head_dim=4, mlp_dim=16,
                                   patch=4, seq_len=16, num_classes=3, num_symbols=4,
                                   num_taps=2)
  params = _random_params(functools.partial(models.init_params, cfg), jax.random.key(0), seed=4)
  heads = pruning.wrap(optax.sgd(0.0), 0.5, structure="head")
  per_block = lambda p: 0.5 if p.startswith("block_0") else 0.75
  # Two pruning wrappers nested: heads inside, fc1 units outside.
  tx = pruning.wrap(heads, per_block, structure="neuron", where=lambda p: p.endswith("fc1/kernel"))
  masked = _mask_once(tx, params)
  out_kernel = np.asarray(masked["block_1"]["attn"]["out"]["kernel"])
  masked["block_1"]["attn"]["out"]["kernel"] = jnp.zeros_like(out_kernel)  # all heads dead
  small = pruning.materialize(masked)
  small_cfg = models.config_from_params(cfg, small)
  assert small_cfg.num_heads == (2, 0) and small_cfg.mlp_dim == (8, 4)
  assert small["block_0"]["attn"]["query"]["kernel"].shape == (16, 2, 4)
  assert small["block_0"]["attn"]["out"]["kernel"].shape == (2, 4, 16)
  assert small["block_1"]["mlp"]["fc2"]["kernel"].shape == (4, 16)
  iq = jnp.asarray(np.random.default_rng(5).normal(size=(3, 16, 2)), jnp.float32)
  want = jax.jit(models.IQTransformer(cfg).apply)({"params": masked}, iq)
  got = jax.jit(models.IQTransformer(small_cfg).apply)({"params": small}, iq)
  for task in want:
    np.testing.assert_allclose(got[task], want[task], rtol=1e-5, atol=1e-5)
