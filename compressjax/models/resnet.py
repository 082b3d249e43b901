"""ResNet-18 for 32x32 images (the CIFAR variant), in Flax linen.

The CIFAR variant of He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016),
as in kuangliu/pytorch-cifar (``models/resnet.py``): a 3x3 stride-1 stem and no max-pool, so
a 32x32 input keeps its resolution through the first stage and reaches 4x4 after the three
stride-2 stages; then global average pooling and one Dense classifier. Convolutions have no
bias (batch norm follows each); a projection shortcut (1x1 conv + BN) appears where the shape
changes. With 10 classes and width 64 the model has 11,173,962 parameters (BN scale and bias
counted, running statistics not).

Batch norm keeps its running statistics in the ``batch_stats`` collection::

  model = resnet18(num_classes=10)
  variables = model.init(key, jnp.zeros((1, 32, 32, 3)), train=False)
  logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  logits = model.apply({"params": p, "batch_stats": updates["batch_stats"]}, x, train=False)

The pooled penultimate features are sown as ``intermediates/features`` (shape
``[batch, 8 * width]``) for hint distillation; add ``"intermediates"`` to ``mutable`` to get them.
"""

from collections.abc import Sequence
from typing import Any

import chex
import flax.linen as nn
import jax.numpy as jnp

# torchvision's ResNet init (kaiming_normal_, mode="fan_out") for the convolutions.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN layers with a residual connection (He et al., 2016, Fig. 2).

  Attributes:
    features: output channels of both convolutions.
    strides: stride of the first convolution (and of the projection shortcut).
    bn_momentum: running-average momentum of batch norm (Flax convention: the weight of the
      old value; 0.9 equals PyTorch's momentum=0.1).
    bn_epsilon: batch-norm epsilon.
    dtype: computation dtype (parameters stay float32).
  """
  features: int
  strides: int = 1
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: chex.Array, train: bool = False) -> chex.Array:
    """Applies the block to an NHWC batch; ``train`` selects batch statistics."""
    norm = lambda name: nn.BatchNorm(
        use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
        dtype=self.dtype, name=name)
    conv = lambda f, k, s, name: nn.Conv(
        f, (k, k), strides=(s, s), padding=(k // 2), use_bias=False,
        kernel_init=_conv_init, dtype=self.dtype, name=name)
    y = conv(self.features, 3, self.strides, "conv1")(x)
    y = nn.relu(norm("bn1")(y))
    y = conv(self.features, 3, 1, "conv2")(y)
    y = norm("bn2")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = conv(self.features, 1, self.strides, "shortcut_conv")(x)
      x = norm("shortcut_bn")(x)
    return nn.relu(y + x)


class ResNet(nn.Module):
  """ResNet with basic blocks for 32x32 inputs (3x3 stride-1 stem, no max-pool).

  Stage ``i`` has ``stage_sizes[i]`` blocks of ``width * 2**i`` channels; every stage but the
  first starts with stride 2.

  Attributes:
    stage_sizes: blocks per stage; (2, 2, 2, 2) is ResNet-18.
    num_classes: number of output logits.
    width: channels of the stem and the first stage (64 in the published model).
    bn_momentum: running-average momentum of batch norm (Flax convention).
    bn_epsilon: batch-norm epsilon.
    dtype: computation dtype (parameters stay float32).
  """
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  num_classes: int = 10
  width: int = 64
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Any = jnp.float32

  def __post_init__(self):
    if not self.stage_sizes or any(int(n) < 1 for n in self.stage_sizes):
      raise ValueError(
          f"stage_sizes must be a non-empty sequence of ints >= 1, got {self.stage_sizes!r}")
    if int(self.num_classes) < 1:
      raise ValueError(f"num_classes must be an int >= 1, got {self.num_classes!r}")
    if int(self.width) < 1:
      raise ValueError(f"width must be an int >= 1, got {self.width!r}")
    if not 0.0 <= self.bn_momentum < 1.0:
      raise ValueError(f"bn_momentum must be in [0, 1), got {self.bn_momentum!r}")
    super().__post_init__()

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
    x = nn.Conv(self.width, (3, 3), padding=1, use_bias=False, kernel_init=_conv_init,
                dtype=self.dtype, name="stem_conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                     epsilon=self.bn_epsilon, dtype=self.dtype, name="stem_bn")(x)
    x = nn.relu(x)
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        x = BasicBlock(self.width * 2**i, strides=2 if (i > 0 and j == 0) else 1,
                       bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
                       dtype=self.dtype, name=f"stage{i}_block{j}")(x, train=train)
    x = jnp.mean(x, axis=(1, 2))
    self.sow("intermediates", "features", x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
    return x.astype(jnp.float32)


def resnet18(num_classes: int = 10, width: int = 64, **kwargs: Any) -> ResNet:
  """ResNet-18, CIFAR variant (kuangliu/pytorch-cifar); 11,173,962 parameters at 10 classes.

  Args:
    num_classes: number of output logits.
    width: stem/first-stage channels; 64 is the published model, smaller values give the
      tiny versions used in tests and CPU runs (parameters scale as ``width**2``).
    **kwargs: other `ResNet` attributes (``bn_momentum``, ``bn_epsilon``, ``dtype``).

  Returns:
    An unbound `ResNet` module.
  """
  return ResNet(stage_sizes=(2, 2, 2, 2), num_classes=num_classes, width=width, **kwargs)
