"""A plain MLP over flattened inputs: the small model of tests and quick studies."""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
  """Flattens all but the batch axis, then Dense -> ReLU layers and a linear output.

  Layers are named ``Dense_0 .. Dense_n`` (Flax's default), so a chain of kernels
  ``Dense_i/kernel [in, out]`` is what pruning's ``materialize`` shrinks.

  Attributes:
    hidden: widths of the hidden layers.
    num_outputs: width of the output layer (classes, for a classifier).
  """
  hidden: Sequence[int]
  num_outputs: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_outputs)(x)
