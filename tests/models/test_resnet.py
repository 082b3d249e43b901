"""Tests of the CIFAR ResNet-18 (compressjax/models/resnet.py)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax.models import resnet

# Published CIFAR ResNet-18 (kuangliu/pytorch-cifar, models/resnet.py; torchsummary "Total
# params"): 11,173,962 at 10 classes. At 100 classes only the classifier changes:
# + 512 * 90 + 90 = 11,220,132. BN scale and bias are parameters; running stats are not.
PUBLISHED = {10: 11_173_962, 100: 11_220_132}


def _count_by_hand(stage_sizes, width, num_classes):
  """Parameter and running-stat counts, layer by layer, from He et al. 2016 (CIFAR stem)."""
  conv = lambda k, cin, cout: k * k * cin * cout  # no bias: BN follows
  params = conv(3, 3, width) + 2 * width
  stats = 2 * width
  cin = width
  for i, blocks in enumerate(stage_sizes):
    c = width * 2**i
    for j in range(blocks):
      stride = 2 if i > 0 and j == 0 else 1
      params += conv(3, cin, c) + conv(3, c, c) + 4 * c
      stats += 4 * c
      if stride != 1 or cin != c:  # projection shortcut: 1x1 conv + BN
        params += conv(1, cin, c) + 2 * c
        stats += 2 * c
      cin = c
  return params + cin * num_classes + num_classes, stats


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("num_classes", [10, 100])
def test_parameter_count_matches_published_cifar_resnet18(num_classes):
  model = resnet.resnet18(num_classes=num_classes)
  shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3))), jax.random.key(0))
  by_hand, stats = _count_by_hand((2, 2, 2, 2), 64, num_classes)
  assert by_hand == PUBLISHED[num_classes]
  assert _count(shapes["params"]) == PUBLISHED[num_classes]
  assert _count(shapes["batch_stats"]) == stats == 9600
  assert set(shapes) == {"params", "batch_stats"}


def test_tiny_width_count_and_layout():
  model = resnet.ResNet(stage_sizes=(1, 2, 1, 1), num_classes=7, width=4)
  shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3))), jax.random.key(0))
  assert _count(shapes["params"]) == _count_by_hand((1, 2, 1, 1), 4, 7)[0]
  p = shapes["params"]
  chex.assert_shape(p["stem_conv"]["kernel"], (3, 3, 3, 4))
  assert "shortcut_conv" not in p["stage0_block0"]
  chex.assert_shape(p["stage1_block0"]["shortcut_conv"]["kernel"], (1, 1, 4, 8))
  assert "shortcut_conv" not in p["stage1_block1"]
  chex.assert_shape(p["classifier"]["kernel"], (32, 7))


def _numpy_variables(model, x, seed):
  """He-normal kernels, unit BN scales, zero biases, drawn in NumPy.

  model.init would compile the threefry RNG of every parameter (tens of seconds on CPU); the
  tests need only reasonable values, not Flax's initializers.
  """
  shapes = jax.eval_shape(lambda k: model.init(k, x, train=False), jax.random.key(0))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      return jnp.asarray(rng.normal(size=s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1])),
                         jnp.float32)
    return jnp.ones(s.shape) if ("scale" in name or "var" in name) else jnp.zeros(s.shape)

  return jax.tree_util.tree_map_with_path(draw, shapes)


class _Tiny:
  """A tiny ResNet-18 with one jitted eval and one jitted train step (two compilations)."""

  def __init__(self):
    self.model = model = resnet.resnet18(num_classes=5, width=4)
    self.x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
    self.eval = jax.jit(lambda v, x: model.apply(
        v, x, train=False, capture_intermediates=True, mutable=["intermediates"]))
    self.train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    self.variables = _numpy_variables(model, self.x, seed=0)


@pytest.fixture(scope="module")
def tiny():
  return _Tiny()


def test_forward_shapes_cifar_strides_and_sown_features(tiny):
  logits, state = tiny.eval(tiny.variables, tiny.x)
  chex.assert_shape(logits, (2, 5))
  inter = state["intermediates"]
  # CIFAR variant: stride-1 stem, no max-pool, so 32 -> 32 -> 16 -> 8 -> 4 over the stages.
  chex.assert_shape(inter["stem_conv"]["__call__"][0], (2, 32, 32, 4))
  for i, size in enumerate([32, 16, 8, 4]):
    chex.assert_shape(inter[f"stage{i}_block1"]["__call__"][0], (2, size, size, 4 * 2**i))
  chex.assert_shape(inter["features"][0], (2, 32))
  np.testing.assert_allclose(
      inter["features"][0],
      np.asarray(inter["stage3_block1"]["__call__"][0]).mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)


def _numpy_conv3x3_same(x, k):
  n, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros((n, h, w, k.shape[-1]))
  for dy in range(3):
    for dx in range(3):
      out += xp[:, dy:dy + h, dx:dx + w, :] @ k[dy, dx]
  return out


def test_train_updates_batch_stats_with_momentum(tiny):
  variables, x = tiny.variables, tiny.x
  _, updates = tiny.train(variables, x)
  stem = _numpy_conv3x3_same(np.asarray(x, np.float64),
                             np.asarray(variables["params"]["stem_conv"]["kernel"], np.float64))
  mean, var = stem.mean(axis=(0, 1, 2)), stem.var(axis=(0, 1, 2))
  got = updates["batch_stats"]["stem_bn"]
  # Flax convention: new = momentum * old + (1 - momentum) * batch, momentum 0.9; init 0 / 1.
  np.testing.assert_allclose(got["mean"], 0.1 * mean, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(got["var"], 0.9 + 0.1 * var, rtol=1e-4)
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
      variables["batch_stats"])


def test_eval_is_per_example_and_train_uses_the_batch(tiny):
  x = tiny.x
  _, updates = tiny.train(tiny.variables, x)
  v = {"params": tiny.variables["params"], "batch_stats": updates["batch_stats"]}
  b = jnp.stack([x[0], 3.0 * x[1] + 1.0])
  eval_a, eval_b = tiny.eval(v, x)[0], tiny.eval(v, b)[0]
  np.testing.assert_allclose(eval_a[0], eval_b[0], rtol=1e-5, atol=1e-6)
  assert np.max(np.abs(np.asarray(eval_a[1]) - np.asarray(eval_b[1]))) > 1e-3
  train_a, train_b = tiny.train(v, x)[0], tiny.train(v, b)[0]
  assert np.max(np.abs(np.asarray(train_a[0]) - np.asarray(train_b[0]))) > 1e-3


@pytest.mark.parametrize("kwargs, field", [(dict(num_classes=0), "num_classes"),
                                           (dict(width=0), "width"),
                                           (dict(stage_sizes=()), "stage_sizes"),
                                           (dict(bn_momentum=1.0), "bn_momentum")])
def test_rejects_bad_config(kwargs, field):
  with pytest.raises(ValueError, match=field):
    resnet.ResNet(**kwargs)
