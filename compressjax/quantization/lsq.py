"""Learned step size quantization (LSQ): a quantizer whose step is a trained parameter.

LSQ's step is not a registered grid method (`grids.GRIDS`). A registered grid is a
function of the tensor, recomputed from its values wherever it is needed (each QAT update,
PTQ, calibration, and export, which sees only the weights); LSQ's step is state, learned by
gradient descent with its own gradient (Esser et al. 2020, eq. 3), and recomputing it from the
values (even with `lsq_init`, the one data-derived step LSQ has) would discard what was
learned. A learned step reaches the rest of the library as an explicit scale:
``fake_quant(x, spec, scale=step)`` or ``grid_from_scale(step, None, spec)``.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from compressjax.quantization import quantizers


def _grad_scale(x, g):
  return jax.lax.stop_gradient(x - x * g) + x * g


def _round_pass(x):
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def lsq(x: chex.Array, step: chex.Array, spec: quantizers.Spec) -> chex.Array:
  """Learned step size quantization (Esser et al. 2020, "Learned Step Size Quantization").

  ``x_hat = round(clip(x / s, -Qn, Qp)) * s`` with the straight-through gradient for ``x``
  (identity inside the clipping range, zero outside) and the LSQ step gradient
  ``-x/s + round(x/s)`` inside, ``-Qn`` or ``Qp`` outside, scaled by ``g = 1 / sqrt(N * Qp)``
  with ``N`` the number of values sharing one step (paper eq. 3 and section 2.2). Symmetric
  specs use the signed range ``[-Qn, Qp] = [qmin, qmax]``, asymmetric ones the unsigned
  ``[0, 2^b - 1]`` (the paper's choice for post-ReLU activations).

  Args:
    x: a float array.
    step: positive step size(s) broadcastable to ``x`` (one per channel of ``spec.axis`` for
      per-channel specs).
    spec: the quantizer.

  Returns:
    The quantized array, differentiable in ``x`` and ``step``.
  """
  x = jnp.asarray(x)
  step = jnp.asarray(step, x.dtype)
  n = x.size // max(step.size, 1)
  s = _grad_scale(step, 1.0 / jnp.sqrt(n * spec.qmax))
  return _round_pass(jnp.clip(x / s, spec.qmin, spec.qmax)) * s


def lsq_init(x: chex.Array, spec: quantizers.Spec) -> chex.Array:
  """LSQ's initial step ``2 mean|x| / sqrt(Qp)`` per tensor or channel (Esser et al. 2020)."""
  x = jnp.asarray(x, jnp.float32)
  mean = jnp.mean(jnp.abs(x), quantizers.reduce_axes(x.ndim, spec), keepdims=True)
  return jnp.maximum(2.0 * mean / jnp.sqrt(spec.qmax), 1e-8)


class LSQ(nn.Module):
  """Flax layer quantizing its input with a learned step (`lsq`), initialized by `lsq_init`.

  Attributes:
    spec: the quantizer; per-channel specs learn one step per index of ``spec.axis``.
  """
  spec: quantizers.Spec

  @nn.compact
  def __call__(self, x: chex.Array) -> chex.Array:
    self.spec.check(jnp.ndim(x), "LSQ input")
    step = self.param("step", lambda _: lsq_init(x, self.spec))
    return lsq(x, step, self.spec)
