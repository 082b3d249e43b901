"""`serving.serve`: the deployed form computes the stage's function, smaller where it can be."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compressjax import pruning
from compressjax import quantization
from compressjax import serving
from compressjax import stages
from compressjax.models import iq_transformer

_CFG = iq_transformer.IQTransformerConfig(width=16, depth=2, num_heads=4, head_dim=4,
                                          mlp_dim=16, patch=4, seq_len=16, num_taps=2)


@pytest.fixture(scope="module")
def setup():
  params = iq_transformer.init_params(_CFG, jax.random.key(0))
  # Non-zero biases everywhere, so removed units must really contribute nothing.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 if jax.tree_util.keystr(p).endswith("'bias']") else x, params)
  x = jax.random.normal(jax.random.key(1), (3, _CFG.seq_len, 2))
  return params, x


def _pruned(params, structure, sparsity=0.5):
  """One prune event of ``structure`` (a zero-gradient step of the stage's wrappers)."""
  plan = stages.PrunePlan(sparsity=sparsity, structure=structure, schedule="one_shot")
  tx = stages.compose(optax.sgd(0.0), ("prune",), plan, quantization.Spec(8))
  u, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  return optax.apply_updates(params, u)


def _outputs(apply, variables, x):
  return {k: np.asarray(v) for k, v in apply(variables, x).items()}


def _reference(params, x):
  return _outputs(jax.jit(iq_transformer.IQTransformer(_CFG).apply), {"params": params}, x)


def _close(got, want, rtol):
  assert got.keys() == want.keys()
  for k in want:
    scale = np.abs(want[k]).max()
    np.testing.assert_allclose(got[k], want[k], atol=rtol * scale, err_msg=k)


def test_structured_pruning_is_materialized_and_computes_the_same(setup):
  params, x = setup
  pruned = _pruned(params, "head+neuron")
  s = serving.serve(iq_transformer.IQTransformer, _CFG, pruned,
                    config_from_params=iq_transformer.config_from_params)
  assert s.config.num_heads == 2 and s.config.mlp_dim == 8   # half of each, every block
  assert "materialized: 4/8 heads, 16/32 MLP units" in s.form
  block = s.variables["params"]["block_0"]
  assert block["attn"]["query"]["kernel"].shape == (16, 2, 4)
  assert block["mlp"]["fc2"]["kernel"].shape == (8, 16)
  _close(_outputs(s.apply, s.variables, x), _reference(pruned, x), 1e-5)


@pytest.mark.parametrize("spec", [quantization.Spec(8, granularity="channel"),
                                  quantization.Spec(4, granularity="tensor"),
                                  quantization.Spec(4, symmetric=False, granularity="channel")])
def test_integer_weights_dequantize_to_the_fake_quantized_ones(setup, spec):
  params, x = setup
  pruned = _pruned(params, "head+neuron")
  fq = quantization.quantize_tree(pruned, spec)
  s = serving.serve(iq_transformer.IQTransformer, _CFG, fq, spec,
                    config_from_params=iq_transformer.config_from_params)
  small = s.variables["params"]
  q = small["block_1"]["mlp"]["fc2"]["kernel"]
  assert isinstance(q, serving.QTensor) and q.codes.dtype == jnp.int8
  assert int(jnp.max(q.codes)) - int(jnp.min(q.codes)) < 2 ** spec.bits
  # Bit for bit the fake-quantized values that survived materialization.
  want = pruning.materialize(jax.device_get(fq), jax.nn.gelu)
  got = serving.dequantize(small)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
  _close(_outputs(s.apply, s.variables, x), _reference(fq, x), 1e-5)
  assert f"({spec.bits}-bit grid) dequantized in jit" in s.form


def test_unstructured_zeros_stay_dense_and_are_named(setup):
  params, x = setup
  pruned = _pruned(params, "unstructured")
  s = serving.serve(iq_transformer.IQTransformer, _CFG, pruned,
                    config_from_params=iq_transformer.config_from_params)
  assert s.config == _CFG
  assert "zeros kept in dense kernels" in s.form
  _close(_outputs(s.apply, s.variables, x), _reference(pruned, x), 1e-6)


def test_composite_masks_are_carried_and_rebuilt(setup):
  params, _ = setup
  plan = stages.PrunePlan(sparsity=0.5, structure="head+neuron", schedule="one_shot")
  pruned = _pruned(params, "head+neuron")
  masks = stages.masks_from_params(pruned, plan)
  kept = masks["block_0"]["attn"]["query"]["kernel"]
  assert kept.shape == (16, 4, 4) and int(kept.all(axis=(0, 2)).sum()) == 2
  assert int(masks["block_0"]["mlp"]["fc1"]["kernel"].all(axis=0).sum()) == 8
  # Carried into a later stage: a training step toward other weights keeps every zero.
  tx = stages.compose(optax.sgd(0.1), ("prune",), plan, quantization.Spec(8), masks=masks)
  g = jax.tree.map(lambda p: -jnp.ones_like(p), pruned)
  u, state = tx.update(g, tx.init(pruned), pruned)
  after = optax.apply_updates(pruned, u)
  for m, p in ((kept, after["block_0"]["attn"]["query"]["kernel"]),
               (masks["block_1"]["mlp"]["fc1"]["kernel"],
                after["block_1"]["mlp"]["fc1"]["kernel"])):
    np.testing.assert_array_equal(np.asarray(p)[~np.asarray(m)], 0.0)
  merged = stages.carried_masks(state)
  np.testing.assert_array_equal(merged["block_1"]["mlp"]["fc1"]["kernel"],
                                masks["block_1"]["mlp"]["fc1"]["kernel"])


def test_mixed_precision_serves_each_layer_on_its_own_grid(setup):
  params, x = setup
  specs = {"block_0/mlp/fc1/kernel": quantization.Spec(2), "embed/kernel": None,
           "block_1/attn/query/kernel": quantization.Spec(4, granularity="tensor")}
  spec = lambda path: specs.get(path, quantization.Spec(8))
  fq = quantization.quantize_tree(params, spec)
  s = serving.serve(iq_transformer.IQTransformer, _CFG, fq, spec)
  p = s.variables["params"]
  assert not isinstance(p["embed"]["kernel"], serving.QTensor)   # left float
  fc1 = p["block_0"]["mlp"]["fc1"]["kernel"]
  assert len(np.unique(np.asarray(fc1.codes))) <= 3             # 2 bits: -1, 0, 1
  assert np.asarray(p["block_1"]["attn"]["query"]["kernel"].scale).size == 1
  for a, b in zip(jax.tree.leaves(serving.dequantize(p)), jax.tree.leaves(fq)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert "per-layer grids" in s.form
  _close(_outputs(s.apply, s.variables, x), _reference(fq, x), 1e-5)
