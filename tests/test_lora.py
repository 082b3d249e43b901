import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compressjax import lora
from compressjax import quantization
from tests import helpers


class _Mlp(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16, name="fc1")(x))
    return nn.Dense(3, name="fc2")(x)


_MODEL = _Mlp()
_PARAMS = _MODEL.init(jax.random.key(0), jnp.zeros((1, 6)))["params"]
_X = jax.random.normal(jax.random.key(1), (10, 6))


def _attn_like_params():
  return {
      "conv": {"kernel": jnp.ones((3, 3, 2, 8)), "bias": jnp.zeros(8)},
      "attn": {"query": {"kernel": jnp.ones((8, 2, 4))}, "out": {"kernel": jnp.ones((2, 4, 8))}},
      "ln": {"scale": jnp.ones(8)},
  }


def test_init_shapes_layouts_and_exact_parameter_count():
  r = 2
  ad = lora.init(jax.random.key(0), _attn_like_params(), rank=r, alpha=4)
  chex.assert_shape([ad["conv"]["kernel"]["a"], ad["conv"]["kernel"]["b"]], [(r, 18), (8, r)])
  chex.assert_shape([ad["attn"]["query"]["kernel"]["a"], ad["attn"]["query"]["kernel"]["b"]],
                    [(r, 8), (8, r)])
  chex.assert_shape([ad["attn"]["out"]["kernel"]["a"], ad["attn"]["out"]["kernel"]["b"]],
                    [(r, 8), (8, r)])
  assert ad["conv"]["bias"] is None and ad["ln"]["scale"] is None
  assert lora.num_parameters(ad) == r * (18 + 8) + r * (8 + 8) + r * (8 + 8)
  np.testing.assert_array_equal(ad["conv"]["kernel"]["b"], 0.0)
  mlp = lora.init(jax.random.key(0), _PARAMS, rank=3)
  assert lora.num_parameters(mlp) == 3 * (6 + 16) + 3 * (16 + 3)


def test_init_is_deterministic_and_a_has_the_documented_scale():
  p = {"fc": {"kernel": jnp.zeros((400, 300))}}
  a1 = lora.init(jax.random.key(5), p, rank=8)["fc"]["kernel"]["a"]
  a2 = lora.init(jax.random.key(5), p, rank=8)["fc"]["kernel"]["a"]
  np.testing.assert_array_equal(a1, a2)
  # std 1/sqrt(in) = 0.05; 3200 samples put the estimate within ~4% at 3 sigma.
  np.testing.assert_allclose(float(jnp.std(a1)), 0.05, rtol=0.05)


def test_zero_b_leaves_outputs_unchanged():
  ad = lora.init(jax.random.key(2), _PARAMS, rank=3, alpha=8)
  base = _MODEL.apply({"params": _PARAMS}, _X)
  adapted = _MODEL.apply({"params": lora.apply(_PARAMS, ad, 8)}, _X)
  np.testing.assert_array_equal(adapted, base)


def _random_b(adapters, seed):
  """Adapters with B replaced by Gaussian noise, so the update is not zero."""
  def fill(path, x):
    if path[-1].key != "b":
      return x
    return jax.random.normal(jax.random.fold_in(jax.random.key(seed), x.size), x.shape)
  return jax.tree_util.tree_map_with_path(fill, adapters)


def test_apply_and_merge_equal_the_factored_forward_pass():
  alpha, r = 6.0, 3
  ad = _random_b(lora.init(jax.random.key(3), _PARAMS, rank=r, alpha=alpha), 4)

  def factored_dense(x, name):  # x W + b + (alpha/r) (x A^T) B^T, never forming B A
    p, a = _PARAMS[name], ad[name]["kernel"]
    return x @ p["kernel"] + p["bias"] + (alpha / r) * (x @ a["a"].T) @ a["b"].T

  want = factored_dense(jax.nn.relu(factored_dense(_X, "fc1")), "fc2")
  adapted = _MODEL.apply({"params": lora.apply(_PARAMS, ad, alpha, rank=r)}, _X)
  merged = lora.merge(_PARAMS, ad, alpha)
  np.testing.assert_allclose(adapted, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_MODEL.apply({"params": merged}, _X), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(merged["fc1"]["bias"], _PARAMS["fc1"]["bias"])


def test_conv_delta_is_the_reshaped_matrix_update():
  p = _attn_like_params()
  ad = lora.init(jax.random.key(6), p, rank=2, alpha=2, where=lambda s: s == "conv/kernel")
  ad["conv"]["kernel"]["b"] = jnp.ones((8, 2))
  a = np.asarray(ad["conv"]["kernel"]["a"])
  want = np.ones((3, 3, 2, 8)) + (np.ones((8, 2)) @ a).T.reshape(3, 3, 2, 8)  # alpha/r = 1
  np.testing.assert_allclose(lora.apply(p, ad, 2)["conv"]["kernel"], want, rtol=1e-6)


def test_gradient_at_init_flows_to_b_only():
  ad = lora.init(jax.random.key(7), _PARAMS, rank=2)
  y = jnp.arange(10) % 3
  loss = lambda ad: helpers.cross_entropy(_MODEL.apply({"params": lora.apply(_PARAMS, ad, 16)},
                                                       _X), y)
  g = jax.jit(jax.grad(loss))(ad)
  np.testing.assert_array_equal(g["fc1"]["kernel"]["a"], 0.0)  # dL/dA = (alpha/r) B^T ... = 0
  assert float(jnp.abs(g["fc2"]["kernel"]["b"]).max()) > 0


def test_training_with_optimizer_changes_only_adapters():
  w_true = jax.random.normal(jax.random.key(8), (6, 3))

  def data_fn(key):
    x = jax.random.normal(key, (32, 6))
    return x, jnp.argmax(x @ w_true, -1)

  alpha = 8.0
  tree = {"base": _PARAMS, "lora": lora.init(jax.random.key(9), _PARAMS, rank=2, alpha=alpha)}
  apply_fn = lambda t, x: _MODEL.apply({"params": lora.apply(t["base"], t["lora"], alpha)}, x)
  x, y = data_fn(jax.random.key(99))
  before = helpers.cross_entropy(apply_fn(tree, x), y)
  trained, _ = helpers.train_classifier(apply_fn, tree, lora.optimizer(optax.adam(1e-2)),
                                        data_fn, steps=30, key=jax.random.key(10))
  jax.tree.map(np.testing.assert_array_equal, trained["base"], _PARAMS)
  assert float(jnp.abs(trained["lora"]["fc1"]["kernel"]["b"]).max()) > 0
  assert float(jnp.abs(trained["lora"]["fc2"]["kernel"]["a"]
                       - tree["lora"]["fc2"]["kernel"]["a"]).max()) > 0
  assert float(helpers.cross_entropy(apply_fn(trained, x), y)) < float(before)
  mask = lora.trainable_mask(tree)
  assert not any(jax.tree.leaves(mask["base"])) and all(jax.tree.leaves(mask["lora"]))


def test_base_transform_applies_to_adapted_kernels_only():
  # A hand-written rounding quantizer (step 0.25) stands in for quantization.fake_quant.
  quant = lambda w: jnp.round(w / 0.25) * 0.25
  ad = _random_b(lora.init(jax.random.key(11), _PARAMS, rank=2, alpha=2), 12)
  got = lora.apply(_PARAMS, ad, 2, base_transform=quant)
  for name in ("fc1", "fc2"):
    k, a = np.asarray(_PARAMS[name]["kernel"]), ad[name]["kernel"]
    want = np.round(k / 0.25) * 0.25 + (np.asarray(a["b"]) @ np.asarray(a["a"])).T
    np.testing.assert_allclose(got[name]["kernel"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[name]["bias"], _PARAMS[name]["bias"])


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="rank must be a positive int, got 0"):
    lora.init(jax.random.key(0), _PARAMS, rank=0)
  with pytest.raises(ValueError, match="rank must be <= min\\(in, out\\) = 3 for fc2/kernel"):
    lora.init(jax.random.key(0), _PARAMS, rank=4)
  with pytest.raises(ValueError, match="alpha must be > 0, got 0"):
    lora.init(jax.random.key(0), _PARAMS, alpha=0)
  with pytest.raises(ValueError, match="lora.init: `where` selects no parameter"):
    lora.init(jax.random.key(0), _PARAMS, where=lambda p: False)
  ad = lora.init(jax.random.key(0), _PARAMS, rank=2)
  with pytest.raises(ValueError, match="rank must match the adapters' rank 2 at fc1/kernel"):
    lora.apply(_PARAMS, ad, 16, rank=3)


def test_qlora_over_fake_quantized_base():
  spec = quantization.Spec(bits=4)
  quant = lambda w: quantization.fake_quant(w, spec)
  alpha = 4.0
  ad = _random_b(lora.init(jax.random.key(13), _PARAMS, rank=2, alpha=alpha), 14)
  got = lora.apply(_PARAMS, ad, alpha, base_transform=quant)
  for name in ("fc1", "fc2"):
    shape = _PARAMS[name]["kernel"].shape
    base = got[name]["kernel"] - lora.delta(ad[name]["kernel"], alpha, shape)
    np.testing.assert_allclose(base, quant(_PARAMS[name]["kernel"]), atol=1e-5)
    assert np.unique(np.asarray(quant(_PARAMS[name]["kernel"]))).size <= 15  # 4-bit symmetric
  # Adapters still train through the quantized base.
  y = jnp.arange(10) % 3
  g = jax.jit(jax.grad(lambda ad: helpers.cross_entropy(_MODEL.apply(
      {"params": lora.apply(_PARAMS, ad, alpha, base_transform=quant)}, _X), y)))(ad)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))
  assert float(jnp.abs(g["fc1"]["kernel"]["a"]).max()) > 0
