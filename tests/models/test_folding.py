"""Tests of batch-norm folding for export (compressjax/models/folding.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from compressjax import quantization
from compressjax.models import folding
from compressjax.models import mobilenet_v2 as mnv2
from compressjax.models import resnet

# Tiny models; ResNet with a non-default epsilon to check that the argument is used.
MODELS = {
    "resnet": resnet.ResNet(stage_sizes=(1, 1), num_classes=5, width=8, bn_epsilon=1e-3),
    **{f"mobilenet_{impl}": mnv2.MobileNetV2(num_classes=5, width_multiplier=0.25,
                                             stages=((1, 16, 1, 1), (6, 24, 1, 2)),
                                             depthwise_impl=impl)
       for impl in ("conv", "shifted")},
}
# Output channels of every BN, by hand from the architectures: ResNet stem 8, stage 0 (8, 8),
# stage 1 (16, 16) plus its 16-channel projection shortcut; MobileNetV2 at width 0.25: stem 8,
# block0 (t=1) depthwise 8 and projection 8, block1 (t=6) expansion 48, depthwise 48 and
# projection 8, head 1280.
BN_CHANNELS = {"resnet": [8, 8, 8, 16, 16, 16],
               "mobilenet_conv": [8, 8, 8, 48, 48, 8, 1280]}
BN_CHANNELS["mobilenet_shifted"] = BN_CHANNELS["mobilenet_conv"]


def _random_variables(model, x, seed):
  """He-normal kernels and random BN parameters and running stats (signs included), in NumPy."""
  shapes = jax.eval_shape(lambda k: model.init(k, x, train=False), jax.random.key(0))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      v = rng.normal(size=s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1]))
    elif "scale" in name:
      v = rng.uniform(0.5, 2.0, s.shape) * rng.choice([-1.0, 1.0], s.shape, p=[0.2, 0.8])
    elif "var" in name:
      v = np.exp(rng.normal(size=s.shape))
    else:  # BN bias and mean, classifier bias
      v = 0.5 * rng.normal(size=s.shape)
    return jnp.asarray(v, s.dtype)

  return shapes, jax.tree_util.tree_map_with_path(draw, shapes)


class _Case:
  """One model with random variables, their fold and a jitted eval."""

  def __init__(self, name):
    self.name = name
    self.model = model = MODELS[name]
    self.epsilon = model.bn_epsilon
    self.x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16, 16, 3)), jnp.float32)
    self.like, self.variables = _random_variables(model, self.x, seed=0)
    self.folded = folding.fold_batchnorm(self.variables, self.epsilon)
    self.eval = jax.jit(lambda v: model.apply(v, self.x, train=False))


_CASES = {}


@pytest.fixture(params=list(MODELS))
def case(request):
  if request.param not in _CASES:
    _CASES[request.param] = _Case(request.param)
  return _CASES[request.param]


def _nbytes(tree):
  return sum(np.asarray(a).nbytes for a in jax.tree.leaves(tree))


def test_folded_variables_give_the_original_logits(case):
  want, got = np.asarray(case.eval(case.variables)), np.asarray(case.eval(case.folded))
  # Measured: max |diff| / max |logit| 1.4e-7 to 2.1e-7 for the three models (float32 rounding of
  # the scaled kernels); the fold is exact in real arithmetic.
  assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
  assert np.max(np.abs(want)) > 1e-2  # random stats keep the logits away from zero


def test_fold_matches_the_numpy_formula(case):
  v, f = traverse_util.flatten_dict(case.variables), traverse_util.flatten_dict(case.folded)
  get = lambda tree, c, path, leaf: np.asarray(tree[(c, *path, leaf)], np.float64)
  for bn, conv in folding.batchnorm_pairs(case.variables).items():
    gamma, beta = get(v, "params", bn, "scale"), get(v, "params", bn, "bias")
    mean, var = get(v, "batch_stats", bn, "mean"), get(v, "batch_stats", bn, "var")
    s = gamma / np.sqrt(var + case.epsilon)
    np.testing.assert_allclose(get(f, "params", conv, "kernel"),
                               get(v, "params", conv, "kernel") * s, rtol=1e-6)
    np.testing.assert_allclose(get(f, "params", bn, "bias"), beta - mean * s, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_array_equal(get(f, "params", bn, "scale"), 1.0)
    np.testing.assert_array_equal(get(f, "batch_stats", bn, "mean"), 0.0)


@pytest.mark.parametrize("epsilon", [1e-5, 1e-3, 1.001e-5, 0.1, 3e-7])
def test_folded_batchnorm_is_exactly_identity_plus_bias(epsilon):
  # fl(fl(1 - eps) + eps) == 1 in float32 and rsqrt(1) == 1, so nothing is left of the BN
  # but the bias: bit-exact, not merely close.
  c = 6
  bn = nn.BatchNorm(use_running_average=True, epsilon=epsilon)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(3, c)) * 100, jnp.float32)
  bias = jnp.asarray(np.random.default_rng(3).normal(size=c), jnp.float32)
  v = folding.fold_batchnorm({"params": {"conv": {"kernel": jnp.ones((1, c))},
                                         "bn": {"scale": jnp.ones(c), "bias": bias}},
                              "batch_stats": {"bn": {"mean": jnp.zeros(c),
                                                     "var": jnp.full(c, 7.0)}}}, epsilon)
  out = bn.apply({"params": v["params"]["bn"], "batch_stats": v["batch_stats"]["bn"]}, x)
  np.testing.assert_array_equal(out, x + v["params"]["bn"]["bias"])


def test_pairs_follow_the_bn_to_conv_naming_rule():
  _, v = _random_variables(MODELS["resnet"], jnp.zeros((1, 8, 8, 3)), seed=0)
  assert folding.batchnorm_pairs(v) == {
      ("stem_bn",): ("stem_conv",),
      ("stage0_block0", "bn1"): ("stage0_block0", "conv1"),
      ("stage0_block0", "bn2"): ("stage0_block0", "conv2"),
      ("stage1_block0", "bn1"): ("stage1_block0", "conv1"),
      ("stage1_block0", "bn2"): ("stage1_block0", "conv2"),
      ("stage1_block0", "shortcut_bn"): ("stage1_block0", "shortcut_conv")}
  _, v = _random_variables(MODELS["mobilenet_shifted"], jnp.zeros((1, 8, 8, 3)), seed=0)
  pairs = folding.batchnorm_pairs(v)
  assert sorted(pairs) == sorted([("stem", "bn"), ("block0", "depthwise", "bn"),
                                  ("block0", "project", "bn"), ("block1", "expand", "bn"),
                                  ("block1", "depthwise", "bn"), ("block1", "project", "bn"),
                                  ("head", "bn")])
  assert all(conv == (*bn[:-1], "conv") for bn, conv in pairs.items())


def test_stripped_tree_drops_three_arrays_per_batchnorm(case):
  stripped = folding.strip_batchnorm(case.folded, case.epsilon)
  saved = _nbytes(case.variables) - _nbytes(stripped)
  # scale, mean and var: 3 float32 arrays of C per BN (ResNet 864 bytes, MobileNetV2 16,896).
  assert saved == 3 * 4 * sum(BN_CHANNELS[case.name])
  assert "batch_stats" not in stripped
  flat = traverse_util.flatten_dict(stripped)
  for bn in folding.batchnorm_pairs(case.variables):
    assert [p[-1] for p in flat if p[1:-1] == bn] == ["bias"]


def test_strip_then_restore_is_bit_exact(case):
  stripped = folding.strip_batchnorm(case.folded, case.epsilon)
  restored = folding.restore_batchnorm(stripped, case.like, case.epsilon)
  assert jax.tree.structure(restored) == jax.tree.structure(case.folded)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               restored, case.folded)
  jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype) or pytest.fail("shape"),
               restored, case.like)
  np.testing.assert_array_equal(case.eval(restored), case.eval(case.folded))


def test_fold_traces_under_jit():
  c = _CASES.get("resnet") or _Case("resnet")
  jitted = jax.jit(folding.fold_batchnorm, static_argnums=1)(c.variables, c.epsilon)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               jitted, c.folded)


def test_per_channel_quantization_commutes_with_the_fold():
  # Scaling output channel c by s_c scales its symmetric step by |s_c|, so the codes are the
  # same (sign-flipped where s_c < 0): quantize(fold(W)) == fold(quantize(W)) up to the
  # step's 20-bit rounding. Per-tensor quantization has no such property.
  rng = np.random.default_rng(4)
  w = jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.float32)
  s = jnp.asarray(rng.uniform(0.1, 10.0, 8) * rng.choice([-1.0, 1.0], 8), jnp.float32)
  per_channel = quantization.Spec(bits=8, granularity="channel")
  codes = lambda a: quantization.to_codes(a, per_channel, quantization.grid_of(a, per_channel))
  np.testing.assert_array_equal(codes(w * s), codes(w) * jnp.sign(s))
  # The values then differ only by the steps' rounding to 20 bits: at most 127 * 2^-20 steps.
  step = np.max(np.abs(np.asarray(w * s)), axis=(0, 1, 2)) / per_channel.qmax
  diff = np.abs(np.asarray(quantization.fake_quant(w * s, per_channel)
                           - quantization.fake_quant(w, per_channel) * s))
  assert np.all(diff <= 2 * 127 * 2.0**-20 * step)
  per_tensor = quantization.Spec(bits=8)
  diff = np.abs(np.asarray(quantization.fake_quant(w * s, per_tensor)
                           - quantization.fake_quant(w, per_tensor) * s))
  assert np.max(diff / step) > 0.1


def _small(names=("conv", "bn")):
  c = 4
  return {"params": {names[0]: {"kernel": jnp.ones((3, 3, 2, c))},
                     names[1]: {"scale": jnp.ones(c), "bias": jnp.zeros(c)}},
          "batch_stats": {names[1]: {"mean": jnp.zeros(c), "var": jnp.ones(c)}}}


def test_unpairable_batchnorm_is_rejected_with_its_path():
  _, v = _random_variables(MODELS["resnet"], jnp.zeros((1, 8, 8, 3)), seed=0)
  block = dict(v["params"]["stage1_block0"])
  block["proj"] = block.pop("shortcut_conv")
  v = {**v, "params": {**v["params"], "stage1_block0": block}}
  with pytest.raises(ValueError, match="stage1_block0/shortcut_bn has no conv"):
    folding.fold_batchnorm(v)
  with pytest.raises(ValueError, match="norm has no conv"):
    folding.fold_batchnorm(_small(("conv", "norm")))


def test_ambiguous_and_mismatched_pairs_are_rejected():
  v = _small(("conv_bn", "bn_bn"))
  v["params"]["bn_conv"] = v["params"]["conv_bn"]
  with pytest.raises(ValueError, match="bn_bn has an ambiguous conv"):
    folding.batchnorm_pairs(v)
  v = _small(("conv_conv", "bn_conv"))
  v["params"]["conv_bn"] = v["params"]["bn_conv"]
  v["batch_stats"]["conv_bn"] = v["batch_stats"]["bn_conv"]
  with pytest.raises(ValueError, match="bn_conv and conv_bn both pair with conv conv_conv"):
    folding.batchnorm_pairs(v)
  v = _small()
  v["params"]["conv"] = {"kernel": jnp.ones((3, 3, 2, 5))}
  with pytest.raises(ValueError, match="bn has 4 channels but conv conv has 5"):
    folding.batchnorm_pairs(v)


def test_strip_and_restore_reject_what_they_cannot_invert():
  v = _small()
  with pytest.raises(ValueError, match="batch norm bn is not folded"):
    folding.strip_batchnorm({**v, "params": {**v["params"], "bn": {"scale": 2 * jnp.ones(4),
                                                                   "bias": jnp.zeros(4)}}})
  folded = folding.fold_batchnorm(v)
  with pytest.raises(ValueError, match="not folded with epsilon=0.001"):
    folding.strip_batchnorm(folded, 1e-3)
  stripped = folding.strip_batchnorm(folded)
  like = jax.eval_shape(lambda: v)
  del stripped["params"]["conv"]
  with pytest.raises(ValueError, match="lacks params/conv/kernel"):
    folding.restore_batchnorm(stripped, like)
  with pytest.raises(ValueError, match="epsilon must be in"):
    folding.fold_batchnorm(v, 0.0)
