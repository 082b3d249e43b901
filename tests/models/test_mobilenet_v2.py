"""Tests of the CIFAR MobileNetV2 (compressjax/models/mobilenet_v2.py)."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from compressjax import quantization
from compressjax.models import mobilenet_v2 as mnv2

# Published counts of the paper's MobileNetV2 (Sandler et al. 2018) at width 1.0:
# torchvision's mobilenet_v2 documents 3,504,872 parameters at 1000 classes; with 10 classes
# only the classifier shrinks: 3,504,872 - 1281 * 990 = 2,236,682, the count usually quoted for
# CIFAR-10 (the CIFAR stride changes add no parameters). kuangliu/pytorch-cifar's variant adds
# a t=1 expansion conv and four 1x1 conv shortcuts (2,296,922); we follow the paper.
PUBLISHED = {1000: 3_504_872, 10: 2_236_682, 100: 2_351_972}

# Sandler et al. 2018, Table 2: (expansion t, channels c, repeats n, stride s).
PAPER_TABLE = [(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3),
               (6, 320, 1)]


def _count_by_hand(num_classes, stem, channels, last):
  """Parameters and running stats, layer by layer (convs without bias, BN scale + bias)."""
  params = 3 * 3 * 3 * stem + 2 * stem
  stats = 2 * stem
  cin = stem
  for (t, _, n), c in zip(PAPER_TABLE, channels):
    for _ in range(n):
      hidden = cin * t
      if t != 1:  # 1x1 expansion
        params += cin * hidden + 2 * hidden
        stats += 2 * hidden
      params += 9 * hidden + 2 * hidden  # 3x3 depthwise: one filter per channel
      params += hidden * c + 2 * c  # linear 1x1 projection
      stats += 2 * hidden + 2 * c
      cin = c
  params += cin * last + 2 * last + last * num_classes + num_classes
  return params, stats + 2 * last


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _shapes(model, size=32):
  return jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, size, size, 3))),
                        jax.random.key(0))


@pytest.mark.parametrize("num_classes", [10, 100, 1000])
def test_parameter_count_matches_published_mobilenet_v2(num_classes):
  shapes = _shapes(mnv2.MobileNetV2(num_classes=num_classes))
  by_hand, stats = _count_by_hand(num_classes, 32, [c for _, c, _ in PAPER_TABLE], 1280)
  assert by_hand == PUBLISHED[num_classes]
  assert _count(shapes["params"]) == PUBLISHED[num_classes]
  assert _count(shapes["batch_stats"]) == stats
  assert set(shapes) == {"params", "batch_stats"}


def test_width_multiplier_rounds_channels_to_multiples_of_8():
  # Width 0.5: 32->16, 16->8, 24->12->16, 32->16, 64->32, 96->48, 160->80, 320->160; the
  # last conv keeps 1280 (torchvision's _make_divisible, at most 10% below the target).
  shapes = _shapes(mnv2.MobileNetV2(num_classes=10, width_multiplier=0.5))
  by_hand, _ = _count_by_hand(10, 16, [8, 16, 16, 32, 48, 80, 160], 1280)
  assert _count(shapes["params"]) == by_hand
  p = shapes["params"]
  chex.assert_shape(p["block0"]["depthwise"]["conv"]["kernel"], (3, 3, 1, 16))
  assert "expand" not in p["block0"]
  chex.assert_shape(p["block1"]["expand"]["conv"]["kernel"], (1, 1, 8, 48))
  chex.assert_shape(p["classifier"]["kernel"], (1280, 10))
  assert [mnv2.make_divisible(v) for v in (12, 8, 4, 6, 20, 1280)] == [16, 8, 8, 8, 24, 1280]


def _numpy_variables(model, x, seed):
  """He-normal kernels, unit BN scales, zero biases, drawn in NumPy (see test_resnet.py)."""
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
  """A width-0.25 MobileNetV2 with one jitted eval and one jitted train step."""

  def __init__(self):
    self.model = model = mnv2.MobileNetV2(num_classes=5, width_multiplier=0.25,
                                          depthwise_impl="shifted")
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
  # CIFAR strides 1 (stem), 1, 1, 2, 2, 1, 2, 1: the last block of each stage is
  # block 0, 2, 5, 9, 12, 15, 16; 32x32 reaches 4x4.
  chex.assert_shape(inter["stem"]["__call__"][0], (2, 32, 32, 8))
  for block, size in zip([0, 2, 5, 9, 12, 15, 16], [32, 32, 16, 8, 8, 4, 4]):
    assert inter[f"block{block}"]["__call__"][0].shape[1:3] == (size, size), block
  chex.assert_shape(inter["head"]["__call__"][0], (2, 4, 4, 1280))
  chex.assert_shape(inter["features"][0], (2, 1280))
  np.testing.assert_allclose(inter["features"][0],
                             np.asarray(inter["head"]["__call__"][0]).mean(axis=(1, 2)),
                             rtol=1e-5, atol=1e-6)


def test_residual_only_where_stride_is_1_and_width_kept(tiny):
  # At width 0.25 blocks 2, 3, 4 all map 8 -> 8 channels. Block 4 (stride 1) adds its input
  # (block 3's output) to its projection branch; block 3 opens the c=32 stage at stride 2, so
  # it has no residual and its output is its projection BN output.
  _, state = tiny.eval(tiny.variables, tiny.x)
  inter = state["intermediates"]
  np.testing.assert_allclose(
      inter["block4"]["__call__"][0],
      inter["block4"]["project"]["__call__"][0] + inter["block3"]["__call__"][0],
      rtol=1e-5, atol=1e-5)
  chex.assert_shape(inter["block3"]["__call__"][0], (2, 16, 16, 8))
  np.testing.assert_array_equal(inter["block3"]["__call__"][0],
                                inter["block3"]["project"]["__call__"][0])


def test_train_updates_batch_stats_and_eval_is_per_example(tiny):
  x = tiny.x
  _, updates = tiny.train(tiny.variables, x)
  # Flax convention: new = momentum * old + (1 - momentum) * batch statistic (momentum 0.9,
  # init mean 0, var 1), the batch statistic taken from a NumPy re-run of the stem conv.
  stem_out = np.zeros((2, 32, 32, 8))
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  k = np.asarray(tiny.variables["params"]["stem"]["conv"]["kernel"], np.float64)
  for dy in range(3):
    for dx in range(3):
      stem_out += xp[:, dy:dy + 32, dx:dx + 32, :] @ k[dy, dx]
  got = updates["batch_stats"]["stem"]["bn"]
  np.testing.assert_allclose(got["mean"], 0.1 * stem_out.mean(axis=(0, 1, 2)), rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(got["var"], 0.9 + 0.1 * stem_out.var(axis=(0, 1, 2)), rtol=1e-4)
  v = {"params": tiny.variables["params"], "batch_stats": updates["batch_stats"]}
  b = jnp.stack([x[0], 3.0 * x[1] + 1.0])
  eval_a, eval_b = tiny.eval(v, x)[0], tiny.eval(v, b)[0]
  np.testing.assert_allclose(eval_a[0], eval_b[0], rtol=1e-5, atol=1e-6)
  train_a, train_b = tiny.train(v, x)[0], tiny.train(v, b)[0]
  assert np.max(np.abs(np.asarray(train_a[0]) - np.asarray(train_b[0]))) > 1e-3


def test_depthwise_impls_agree(tiny):
  # The shifted-sum depthwise conv (the "auto" choice on CPU) and the grouped nn.Conv share
  # parameters and must compute the same function, strides and padding included.
  conv = tiny.model.clone(depthwise_impl="conv")
  want, want_stats = jax.jit(lambda v, x: conv.apply(v, x, train=True,
                                                     mutable=["batch_stats"]))(tiny.variables,
                                                                               tiny.x)
  got, got_stats = tiny.train(tiny.variables, tiny.x)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               got_stats, want_stats)
  conv_shapes = jax.eval_shape(lambda k: conv.init(k, tiny.x), jax.random.key(0))
  assert jax.tree.map(lambda a: a.shape, conv_shapes) == jax.tree.map(lambda a: a.shape,
                                                                     tiny.variables)


def _grouped_conv(x, kernel, strides, padding):
  """The reference: XLA's grouped convolution with one group per channel."""
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  feature_group_count=x.shape[-1])


# "SAME" pads (0, 1) at stride 2 on an even size where the model's explicit k // 2 pads
# (1, 1): both are checked, with odd and even sizes, a non-square kernel and uneven padding.
@pytest.mark.parametrize("strides", [(1, 1), (2, 2), (2, 1)])
@pytest.mark.parametrize("padding", ["SAME", ((1, 1), (1, 1)), "VALID", ((0, 2), (1, 0))])
@pytest.mark.parametrize("size, kernel_size", [(8, (3, 3)), (7, (3, 3)), (6, (5, 3))])
def test_shifted_depthwise_equals_grouped_lax_conv(strides, padding, size, kernel_size):
  rng = np.random.default_rng(size)
  x = jnp.asarray(rng.normal(size=(2, size, size + 1, 5)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(*kernel_size, 1, 5)), jnp.float32)
  want = _grouped_conv(x, kernel, strides, padding)
  got = jax.jit(mnv2.shifted_depthwise, static_argnums=(2, 3))(x, kernel, strides, padding)
  chex.assert_shape(got, want.shape)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_depthwise_conv_is_the_grouped_nn_conv_it_replaces():
  # Same attributes -> same parameter tree and values (same initializer, same key), same
  # output, bias included; and an nn.Conv for whatever selects layers by type.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 6)), jnp.float32)
  kw = dict(features=6, kernel_size=(3, 3), strides=2, padding=1, feature_group_count=6,
            bias_init=nn.initializers.normal(1.0))
  shifted, conv = mnv2.DepthwiseConv(**kw), nn.Conv(**kw)
  assert isinstance(shifted, nn.Conv)
  v_shifted, v_conv = shifted.init(jax.random.key(3), x), conv.init(jax.random.key(3), x)
  jax.tree.map(np.testing.assert_array_equal, v_shifted, v_conv)
  chex.assert_shape(v_shifted["params"]["kernel"], (3, 3, 1, 6))
  np.testing.assert_allclose(shifted.apply(v_shifted, x), conv.apply(v_conv, x), rtol=1e-5,
                             atol=1e-5)
  half = mnv2.DepthwiseConv(**kw, dtype=jnp.bfloat16)
  assert half.apply(v_shifted, x).dtype == jnp.bfloat16
  assert v_shifted["params"]["kernel"].dtype == jnp.float32


@pytest.mark.parametrize("kwargs, field", [(dict(feature_group_count=1), "feature_group_count"),
                                           (dict(kernel_size=3), "kernel_size"),
                                           (dict(kernel_dilation=2), "kernel_dilation"),
                                           (dict(input_dilation=2), "input_dilation"),
                                           (dict(padding="CIRCULAR"), "padding")])
def test_depthwise_conv_rejects_what_it_does_not_compute(kwargs, field):
  with pytest.raises(ValueError, match=field):
    mnv2.DepthwiseConv(**{**dict(features=4, kernel_size=(3, 3), feature_group_count=4),
                          **kwargs})
  with pytest.raises(ValueError, match="features"):
    layer = mnv2.DepthwiseConv(4, (3, 3), feature_group_count=4)
    layer.init(jax.random.key(0), jnp.zeros((1, 5, 5, 3)))


def test_auto_depthwise_is_shifted_on_cpu_only():
  resolve = mnv2.resolve_depthwise_impl
  assert [resolve("auto", b) for b in ("cpu", "gpu", "tpu")] == ["shifted", "conv", "conv"]
  assert [resolve(i, "cpu") for i in ("conv", "shifted")] == ["conv", "shifted"]
  assert resolve("shifted", "gpu") == "shifted"
  with pytest.raises(ValueError, match="depthwise_impl"):
    resolve("fast", "cpu")


def test_activation_quantization_sees_the_shifted_depthwise():
  # Activation quantization intercepts nn.Conv inputs: with the shifted form the depthwise
  # layers must be intercepted under the same paths, and quantized alike.
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 8, 3)), jnp.float32)
  models = {impl: mnv2.MobileNetV2(num_classes=5, width_multiplier=0.25,
                                   stages=((1, 16, 1, 1), (6, 24, 1, 2)), depthwise_impl=impl)
            for impl in ("conv", "shifted")}
  v = _numpy_variables(models["conv"], x, seed=3)
  seen = {impl: jax.jit(quantization.record_inputs(m.apply))(v, x)[1]
          for impl, m in models.items()}
  assert "block1/depthwise/conv" in seen["shifted"]
  assert sorted(seen["shifted"]) == sorted(seen["conv"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               seen["shifted"], seen["conv"])
  # 4-bit inputs of the depthwise layers only: the shifted model's logits move as much as the
  # grouped conv's do (a rounding that flips one code between the two may differ slightly).
  only_depthwise = lambda path: "/depthwise/" in f"/{path}/"
  plain = np.asarray(models["conv"].apply(v, x))
  q = {impl: np.asarray(jax.jit(quantization.quantize_activations(
      m.apply, 4, "dynamic", where=only_depthwise))(v, x)) for impl, m in models.items()}
  moved = np.abs(q["conv"] - plain).max()
  assert moved > 1e-3 * np.abs(plain).max()
  assert np.abs(q["shifted"] - q["conv"]).max() < 0.1 * moved


@pytest.mark.parametrize("kwargs, field", [(dict(num_classes=0), "num_classes"),
                                           (dict(width_multiplier=0.0), "width_multiplier"),
                                           (dict(stages=((6, 24, 0, 1),)), "stages"),
                                           (dict(bn_momentum=-0.1), "bn_momentum"),
                                           (dict(depthwise_impl="fast"), "depthwise_impl")])
def test_rejects_bad_config(kwargs, field):
  with pytest.raises(ValueError, match=field):
    mnv2.MobileNetV2(**kwargs)
