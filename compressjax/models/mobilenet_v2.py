"""MobileNetV2 for 32x32 images (the CIFAR variant), in Flax linen.

Blocks and channel table from Sandler et al., "MobileNetV2: Inverted Residuals and Linear
Bottlenecks" (CVPR 2018), Table 2, exactly as torchvision builds them: an inverted residual is
a 1x1 expansion (omitted when the expansion factor t is 1), a 3x3 depthwise conv and a linear
1x1 projection, each followed by BN (ReLU6 after the first two), with an identity residual
when the stride is 1 and the channel count is unchanged. Width multiplier and channel rounding
(to multiples of 8) follow torchvision's ``_make_divisible``.

The CIFAR change, as in kuangliu/pytorch-cifar (``models/mobilenetv2.py``): the stem conv and
the t=6, c=24 stage use stride 1 instead of 2, so a 32x32 input reaches 4x4 before pooling
(strides 1, 1, 1, 2, 2, 1, 2, 1 for the stem and the seven stages). kuangliu's blocks differ
from the paper in two ways we do not copy (an expansion conv even for t=1 and a 1x1 conv
shortcut wherever the stride is 1 and the width changes), which is why that repo counts
2,296,922 parameters at 10 classes; this model, like torchvision's
``mobilenet_v2(num_classes=10)``, has 2,236,682 (3,504,872 at 1000 classes).

Batch statistics live in ``batch_stats``; the pooled features (``[batch, last_features]``) are
sown as ``intermediates/features``. See `compressjax.models.resnet` for the apply pattern.
"""

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

# (expansion t, channels c, repeats n, stride s) per stage: Sandler et al. 2018, Table 2,
# with the c=24 stage at stride 1 for 32x32 inputs.
CIFAR_STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def make_divisible(value: float, divisor: int = 8) -> int:
  """Rounds a channel count to a multiple of ``divisor``, losing at most 10% (torchvision)."""
  new = max(divisor, int(value + divisor / 2) // divisor * divisor)
  if new < 0.9 * value:
    new += divisor
  return new


DEPTHWISE_IMPLS = ("auto", "conv", "shifted")


class DepthwiseConv(nn.Module):
  """Depthwise conv computed as a sum of k*k shifted, per-channel-scaled copies of the input.

  Same parameter (``kernel`` ``[k, k, 1, channels]``), same initializer and same output as
  ``nn.Conv(channels, (k, k), strides, padding=k // 2, feature_group_count=channels,
  use_bias=False)``, but on XLA:CPU a MobileNetV2 train step runs about twice as fast as with
  the grouped convolution (bench/mobilenet_depthwise.py).

  Attributes:
    kernel_size: square kernel size (odd).
    strides: stride in both spatial dimensions.
    dtype: computation dtype.
  """
  kernel_size: int = 3
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: chex.Array) -> chex.Array:
    """Applies the depthwise conv to an NHWC batch."""
    k, s, c = self.kernel_size, self.strides, x.shape[-1]
    kernel = self.param("kernel", _conv_init, (k, k, 1, c), jnp.float32).astype(self.dtype)
    x = jnp.pad(x.astype(self.dtype), ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
    ho = (x.shape[1] - k) // s + 1
    wo = (x.shape[2] - k) // s + 1
    out = None
    for dy in range(k):
      for dx in range(k):
        tap = x[:, dy:dy + s * (ho - 1) + 1:s, dx:dx + s * (wo - 1) + 1:s, :] * kernel[dy, dx, 0]
        out = tap if out is None else out + tap
    return out


class ConvBN(nn.Module):
  """Conv (no bias) -> batch norm -> optional ReLU6.

  Attributes:
    features: output channels.
    kernel_size: square kernel size.
    strides: stride in both spatial dimensions.
    depthwise: one filter per channel (``features`` must equal the input channels).
    depthwise_impl: ``"conv"`` (grouped ``nn.Conv``), ``"shifted"`` (`DepthwiseConv`) or
      ``"auto"`` (shifted on CPU, conv elsewhere); the parameters are the same for all three.
    relu6: whether to apply ReLU6 after the norm.
    bn_momentum: running-average momentum of batch norm (Flax convention).
    bn_epsilon: batch-norm epsilon.
    dtype: computation dtype.
  """
  features: int
  kernel_size: int = 1
  strides: int = 1
  depthwise: bool = False
  depthwise_impl: str = "auto"
  relu6: bool = True
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: chex.Array, train: bool = False) -> chex.Array:
    """Applies conv, BN and activation to an NHWC batch."""
    k, s = self.kernel_size, self.strides
    impl = self.depthwise_impl
    if impl == "auto":
      impl = "shifted" if jax.default_backend() == "cpu" else "conv"
    if self.depthwise and impl == "shifted":
      x = DepthwiseConv(k, s, dtype=self.dtype, name="conv")(x)
    else:
      x = nn.Conv(self.features, (k, k), strides=(s, s), padding=k // 2,
                  feature_group_count=self.features if self.depthwise else 1, use_bias=False,
                  kernel_init=_conv_init, dtype=self.dtype, name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                     epsilon=self.bn_epsilon, dtype=self.dtype, name="bn")(x)
    return nn.relu6(x) if self.relu6 else x


class InvertedResidual(nn.Module):
  """Inverted residual with linear bottleneck (Sandler et al., 2018, Fig. 3 and Table 1).

  Attributes:
    features: output channels.
    expansion: expansion factor t (hidden channels = round(input channels * t)).
    strides: stride of the depthwise conv.
    depthwise_impl: how the depthwise conv is computed (see `ConvBN`).
    bn_momentum: running-average momentum of batch norm (Flax convention).
    bn_epsilon: batch-norm epsilon.
    dtype: computation dtype.
  """
  features: int
  expansion: int
  strides: int = 1
  depthwise_impl: str = "auto"
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: chex.Array, train: bool = False) -> chex.Array:
    """Applies the block to an NHWC batch; ``train`` selects batch statistics."""
    kw = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, dtype=self.dtype)
    hidden = int(round(x.shape[-1] * self.expansion))
    y = x
    if self.expansion != 1:
      y = ConvBN(hidden, 1, name="expand", **kw)(y, train)
    y = ConvBN(hidden, 3, self.strides, depthwise=True, depthwise_impl=self.depthwise_impl,
               name="depthwise", **kw)(y, train)
    y = ConvBN(self.features, 1, relu6=False, name="project", **kw)(y, train)
    if self.strides == 1 and x.shape[-1] == self.features:
      y = y + x
    return y


class MobileNetV2(nn.Module):
  """MobileNetV2, CIFAR variant (stride-1 stem and c=24 stage) for 32x32 inputs.

  Attributes:
    num_classes: number of output logits.
    width_multiplier: scales every channel count (rounded to multiples of 8); the last conv
      keeps at least 1280 channels, as in the paper.
    stages: (t, c, n, s) rows; `CIFAR_STAGES` by default.
    depthwise_impl: ``"auto"`` (default: shifted sums on CPU, grouped conv on GPU/TPU),
      ``"conv"`` or ``"shifted"``; same parameters and outputs, only speed differs.
    bn_momentum: running-average momentum of batch norm (Flax convention; 0.9 equals
      PyTorch's momentum=0.1).
    bn_epsilon: batch-norm epsilon.
    dtype: computation dtype (parameters stay float32).
  """
  num_classes: int = 10
  width_multiplier: float = 1.0
  stages: tuple[tuple[int, int, int, int], ...] = CIFAR_STAGES
  depthwise_impl: str = "auto"
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Any = jnp.float32

  def __post_init__(self):
    if int(self.num_classes) < 1:
      raise ValueError(f"num_classes must be an int >= 1, got {self.num_classes!r}")
    if not self.width_multiplier > 0:
      raise ValueError(f"width_multiplier must be > 0, got {self.width_multiplier!r}")
    if not self.stages or any(len(r) != 4 or min(r) < 1 for r in self.stages):
      raise ValueError(f"stages must be non-empty (t, c, n, s) rows of ints >= 1, "
                       f"got {self.stages!r}")
    if self.depthwise_impl not in DEPTHWISE_IMPLS:
      raise ValueError(f"depthwise_impl must be one of {DEPTHWISE_IMPLS}, "
                       f"got {self.depthwise_impl!r}")
    if not 0.0 <= self.bn_momentum < 1.0:
      raise ValueError(f"bn_momentum must be in [0, 1), got {self.bn_momentum!r}")
    super().__post_init__()

  @property
  def last_features(self) -> int:
    """Channels of the final 1x1 conv (the pooled feature size)."""
    return make_divisible(1280 * max(1.0, self.width_multiplier))

  @nn.compact
  def __call__(self, x: chex.Array, train: bool = False) -> chex.Array:
    """Maps images to logits.

    Args:
      x: float images ``[batch, height, width, channels]``, already normalized.
      train: True uses batch statistics and updates ``batch_stats`` (pass
        ``mutable=["batch_stats"]``); False uses the running averages.

    Returns:
      Logits ``[batch, num_classes]`` (float32).
    """
    if x.ndim != 4:
      raise ValueError(f"x must be NHWC with 4 dimensions, got shape {x.shape}")
    kw = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, dtype=self.dtype)
    w = self.width_multiplier
    x = ConvBN(make_divisible(32 * w), 3, 1, name="stem", **kw)(x, train)
    k = 0
    for t, c, n, s in self.stages:
      for j in range(n):
        x = InvertedResidual(make_divisible(c * w), t, s if j == 0 else 1,
                             depthwise_impl=self.depthwise_impl, name=f"block{k}", **kw)(x, train)
        k += 1
    x = ConvBN(self.last_features, 1, name="head", **kw)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    self.sow("intermediates", "features", x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
    return x.astype(jnp.float32)

