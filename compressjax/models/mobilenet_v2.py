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

The depthwise conv is XLA's grouped convolution or `DepthwiseConv`, the same layer computed
as a sum of shifted windows, which XLA:CPU runs several times faster (``depthwise_impl``;
``"auto"`` picks it on CPU). Both have the same parameters, so checkpoints load in either.

Batch statistics live in ``batch_stats``; the pooled features (``[batch, last_features]``) are
sown as ``intermediates/features``. See `compressjax.models.resnet` for the apply pattern.
"""

from collections.abc import Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import linear
from jax import lax

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


def resolve_depthwise_impl(impl: str, backend: str | None = None) -> str:
  """The depthwise form that ``impl`` names on ``backend``: ``"conv"`` or ``"shifted"``.

  ``"auto"`` is ``"shifted"`` on CPU and ``"conv"`` elsewhere. On XLA:CPU the grouped
  convolution takes 50-350 us per depthwise layer of the served MobileNetV2 x0.25 at batch 1,
  the shifted sum 20-40 us (and 10-70x less at batch 256): with it the whole student serves
  about 5x faster at batch 1 and 11x at batch 256 (bench/vision_served.py); every other form
  tried was slower (bench/mobilenet_depthwise.py).

  Args:
    impl: one of `DEPTHWISE_IMPLS`.
    backend: a JAX backend name; None is ``jax.default_backend()``.

  Returns:
    ``"conv"`` or ``"shifted"``.
  """
  if impl not in DEPTHWISE_IMPLS:
    raise ValueError(f"depthwise_impl must be one of {DEPTHWISE_IMPLS}, got {impl!r}")
  if impl != "auto":
    return impl
  return "shifted" if (backend or jax.default_backend()) == "cpu" else "conv"


def shifted_depthwise(x: chex.Array, kernel: chex.Array, strides: tuple[int, int] = (1, 1),
                      padding: str | Sequence[tuple[int, int]] = "VALID") -> chex.Array:
  """Depthwise 2-D convolution as a sum of ``kh * kw`` shifted, per-channel-scaled windows.

  Computes ``lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC",
  "HWIO", "NHWC"), feature_group_count=C)``: output ``[n, i, j, c]`` is the sum over taps
  ``(dy, dx)`` of ``xp[n, i * sh + dy, j * sw + dx, c] * kernel[dy, dx, 0, c]``, with ``xp``
  the zero-padded input. XLA:CPU fuses the taps into one elementwise loop, where its grouped
  convolution takes a slow generic path.

  Args:
    x: input ``[batch, height, width, C]``.
    kernel: one filter per channel, ``[kh, kw, 1, C]``.
    strides: ``(sh, sw)``.
    padding: ``"SAME"``, ``"VALID"`` (as in ``lax``) or explicit zero padding
      ``((top, bottom), (left, right))``, each >= 0.

  Returns:
    ``[batch, out_height, out_width, C]`` in the promoted dtype of ``x`` and ``kernel``.
  """
  (kh, kw), (sh, sw) = kernel.shape[:2], strides
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x.shape[1:3], (kh, kw), strides, padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if len(padding) != 2 or min(min(p) for p in padding) < 0:
    raise ValueError(f"padding must be 'SAME', 'VALID' or two (lo, hi) pairs of ints >= 0, "
                     f"got {padding!r}")
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
  out = None
  for dy in range(kh):
    for dx in range(kw):
      window = x[:, dy:dy + sh * (ho - 1) + 1:sh, dx:dx + sw * (wo - 1) + 1:sw, :]
      tap = window * kernel[dy, dx, 0]
      out = tap if out is None else out + tap
  return out


def _pair(value: Any, field: str) -> tuple[int, int]:
  value = 1 if value is None else value
  pair = (value, value) if isinstance(value, int) else tuple(value)
  if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
    raise ValueError(f"{field} must be an int >= 1 or a pair of them, got {value!r}")
  return pair


class DepthwiseConv(nn.Conv):
  """A depthwise ``nn.Conv`` computed by `shifted_depthwise` (fast on XLA:CPU).

  Build it exactly as the grouped ``nn.Conv`` it stands for, with ``feature_group_count``
  equal to ``features`` and to the input channels: same attributes, same parameters
  (``kernel`` ``[kh, kw, 1, features]``, ``bias`` ``[features]`` when ``use_bias``), drawn by
  the same initializer from the same key, and the same output. Being an ``nn.Conv``, it is
  seen by whatever selects layers by type (activation quantization and calibration in
  `compressjax.quantization` intercept ``nn.Conv`` inputs), under the same path. On XLA:CPU
  a served MobileNetV2 x0.25 runs about 5x faster at batch 1 (11x at batch 256), and a train
  step about 2x faster, than with the grouped convolution (bench/vision_served.py,
  bench/mobilenet_depthwise.py).

  Supported: NHWC inputs, 2-D kernels, strides, any zero padding of ``nn.Conv`` (``"SAME"``,
  ``"VALID"``, ints or pairs); not input or kernel dilation, masks or the circular,
  reflect and causal paddings.
  """

  def __post_init__(self):
    if isinstance(self.kernel_size, int) or len(self.kernel_size) != 2:
      raise ValueError(f"kernel_size must be (kh, kw), got {self.kernel_size!r}")
    _pair(self.strides, "strides")
    for field in ("input_dilation", "kernel_dilation"):
      if _pair(getattr(self, field), field) != (1, 1):
        raise ValueError(f"{field} must be 1, got {getattr(self, field)!r}")
    if self.feature_group_count != self.features:
      raise ValueError(f"feature_group_count must equal features ({self.features}) in a "
                       f"depthwise conv, got {self.feature_group_count!r}")
    if self.mask is not None:
      raise ValueError("mask must be None in DepthwiseConv")
    if isinstance(self.padding, str) and self.padding.upper() in ("CIRCULAR", "REFLECT",
                                                                  "CAUSAL"):
      raise ValueError(f"padding must be 'SAME', 'VALID', an int or pairs of ints, "
                       f"got {self.padding!r}")
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs: chex.Array) -> chex.Array:
    """Applies the depthwise conv to an NHWC batch ``[n, h, w, features]``."""
    if inputs.ndim != 4 or inputs.shape[-1] != self.features:
      raise ValueError(f"inputs must be NHWC with {self.features} channels (features), got "
                       f"shape {inputs.shape}")
    kernel_size, strides = tuple(self.kernel_size), _pair(self.strides, "strides")
    padding = linear.canonicalize_padding(self.padding, 2)
    kernel = self.param("kernel", self.kernel_init, (*kernel_size, 1, self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    y = shifted_depthwise(inputs, kernel, strides, padding)
    return y if bias is None else y + bias


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
    shifted = self.depthwise and resolve_depthwise_impl(self.depthwise_impl) == "shifted"
    conv = DepthwiseConv if shifted else nn.Conv
    x = conv(self.features, (k, k), strides=(s, s), padding=k // 2,
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

