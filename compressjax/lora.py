"""LoRA: low-rank adapters over selected kernels, adapter-only training, and merging.

Hu et al. (2021), "LoRA: Low-Rank Adaptation of Large Language Models": a frozen kernel W
[in, out] is adapted as ``W + (alpha / r) (B A)^T`` with A [r, in] (Gaussian) and B [out, r]
(zeros), so training starts from the unchanged model and only ``r * (in + out)`` numbers per
kernel are trained. QLoRA (Dettmers et al., 2023) is the same over a quantized frozen base: pass
``base_transform`` (for example ``lambda w: quantization.fake_quant(w, spec)``) to `apply`.

Adapters are a pytree with the structure of ``params``: ``{"a": A, "b": B}`` in place of each
selected kernel and ``None`` elsewhere (``None`` has no leaves, so optax, ``jax.grad`` and orbax
see only A and B). The scale ``alpha / r`` is not stored; pass the same ``alpha`` to `apply`
and `merge` as to `init`.

Kernels of more than two axes are viewed as a matrix [prod(leading in-axes), prod(out-axes)]
(see `fan_in_axes`): a Conv kernel [kh, kw, cin, cout] as [kh*kw*cin, cout]; an attention
DenseGeneral kernel [d, H, dh] as [d, H*dh]; the attention output kernel [H, dh, d] (a module
named ``out``) as [H*dh, d]. Pass ``fan_in`` to `init` for other layouts (e.g. Conv1D
[k, cin, cout] needs 2).

Two ways to train the adapters alone (the base stays bit-identical):

1. Recommended in a hand-written step: differentiate with respect to the adapters only; the
   base is a constant of the loss, so no gradient for it is ever formed::

     adapters = lora.init(key, params, rank=4, alpha=8)
     loss = lambda ad, x, y: ce(model.apply({"params": lora.apply(params, ad, 8)}, x), y)
     grads = jax.grad(loss)(adapters, x, y)   # then tx.update / optax.apply_updates on adapters

2. With a generic train loop that owns one parameter tree: train
   ``{"base": params, "lora": adapters}`` with ``lora.optimizer(tx)``, which sends the base
   updates through ``optax.set_to_zero`` (under ``jit`` XLA drops the unused base gradients).
"""

import math
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import optax

from compressjax import selection

Adapters = Any
FanIn = Callable[[str, tuple[int, ...]], int]


def fan_in_axes(path: str, shape: tuple[int, ...]) -> int:
  """Default number of leading input axes of a kernel, for its matrix view [in, out].

  Dense [in, out] -> 1; Conv [..., cin, cout] -> ndim - 1; a 3-D kernel is read as Flax's
  attention layout: [H, dh, d] (2) under a module named ``out``, else [d, H, dh] (1).

  Args:
    path: '/'-joined parameter path, e.g. ``"block_0/attn/out/kernel"``.
    shape: the kernel's shape.

  Returns:
    How many leading axes form the input dimension.
  """
  if len(shape) == 3:
    parts = path.split("/")
    return 2 if len(parts) >= 2 and parts[-2] == "out" else 1
  return max(len(shape) - 1, 1)


def _matrix_dims(path: str, shape: tuple[int, ...], fan_in: FanIn) -> tuple[int, int]:
  k = fan_in(path, shape)
  if not 1 <= k < len(shape):
    raise ValueError(f"fan_in for {path} must be in [1, {len(shape) - 1}], got {k}")
  return math.prod(shape[:k]), math.prod(shape[k:])


def init(key: chex.PRNGKey, params: Any, rank: int = 8, alpha: float = 16,
         where: selection.Where | None = None, fan_in: FanIn | None = None) -> Adapters:
  """Creates LoRA adapters for the kernels that ``where`` selects.

  A ~ N(0, 1/in) (so ``x A^T`` has unit-scale entries, in the spirit of Hu et al.'s
  Kaiming-style init), B = 0, so the adapted model equals the base model at initialization.

  Args:
    key: PRNG key; the same key gives the same adapters.
    params: parameter pytree (e.g. a Flax ``params`` collection).
    rank: adapter rank r >= 1, at most min(in, out) of every selected kernel.
    alpha: LoRA scale numerator (> 0); `apply` and `merge` must get the same value.
    where: predicate on the '/'-joined path; default Dense/Conv kernels.
    fan_in: ``(path, shape) -> leading input axes``; default `fan_in_axes`.

  Returns:
    A pytree like ``params`` with ``{"a": [r, in], "b": [out, r]}`` at selected kernels and
    ``None`` elsewhere.

  Raises:
    ValueError: on rank < 1, alpha <= 0, a selected leaf with fewer than 2 axes, rank above
      min(in, out), or a ``where`` that selects nothing.
  """
  if not isinstance(rank, int) or rank < 1:
    raise ValueError(f"rank must be a positive int, got {rank!r}")
  if not alpha > 0:
    raise ValueError(f"alpha must be > 0, got {alpha}")
  selection.check_selects_something(params, where, "lora.init")
  fan_in = fan_in or fan_in_axes
  flags = jax.tree.leaves(selection.select(params, where))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(key, len(leaves))
  out = []
  for (path, w), on, k in zip(leaves, flags, keys):
    if not on:
      out.append(None)
      continue
    name, shape = selection.path_str(path), tuple(jnp.shape(w))
    if len(shape) < 2:
      raise ValueError(f"lora.init: selected leaf {name} must have >= 2 axes, got {shape}")
    d_in, d_out = _matrix_dims(name, shape, fan_in)
    if rank > min(d_in, d_out):
      raise ValueError(f"rank must be <= min(in, out) = {min(d_in, d_out)} for {name} "
                       f"(matrix view [{d_in}, {d_out}]), got {rank}")
    a = jax.random.normal(k, (rank, d_in), jnp.result_type(w)) / math.sqrt(d_in)
    out.append({"a": a, "b": jnp.zeros((d_out, rank), jnp.result_type(w))})
  return jax.tree_util.tree_unflatten(treedef, out)


def delta(adapter: dict[str, chex.Array], alpha: float, shape: tuple[int, ...]) -> chex.Array:
  """The update ``(alpha / r) (B A)^T`` of one adapter, reshaped to the kernel ``shape``."""
  a, b = adapter["a"], adapter["b"]
  return ((alpha / a.shape[0]) * (a.T @ b.T)).reshape(shape)


def apply(params: Any, adapters: Adapters, alpha: float, rank: int | None = None,
          base_transform: Callable[[chex.Array], chex.Array] | None = None) -> Any:
  """Returns params with every adapted kernel replaced by ``T(W) + (alpha / r) (B A)^T``.

  Use inside the loss: ``model.apply({"params": lora.apply(params, adapters, alpha)}, x)``.

  Args:
    params: the frozen base parameters.
    adapters: from `init` (possibly trained).
    alpha: the LoRA scale numerator used at `init`.
    rank: optional check that every adapter has this rank; ``None`` reads it from A.
    base_transform: ``T``, applied to each adapted base kernel, e.g. fake quantization for
      QLoRA (keeps this module independent of ``compressjax.quantization``). ``None`` is the
      identity. Other leaves are returned unchanged.

  Returns:
    A plain parameter tree with the structure and dtypes of ``params``.

  Raises:
    ValueError: if ``adapters`` does not match ``params`` or ``rank`` differs from the
      adapters' rank (checked on static shapes, at trace time).
  """
  def one(path, w, ad):
    if ad is None:
      return w
    name = selection.path_str(path)
    a, b = ad["a"], ad["b"]
    if rank is not None and a.shape[0] != rank:
      raise ValueError(f"rank must match the adapters' rank {a.shape[0]} at {name}, "
                       f"got {rank}")
    if a.shape[1] * b.shape[0] != math.prod(w.shape) or b.shape[1] != a.shape[0]:
      raise ValueError(f"adapters at {name} (a {a.shape}, b {b.shape}) do not fit the "
                       f"kernel of shape {w.shape}")
    base = w if base_transform is None else base_transform(w)
    return (base + delta(ad, alpha, w.shape)).astype(w.dtype)

  return jax.tree_util.tree_map_with_path(one, params, adapters)


def merge(params: Any, adapters: Adapters, alpha: float, rank: int | None = None,
          base_transform: Callable[[chex.Array], chex.Array] | None = None) -> Any:
  """Folds trained adapters into the kernels, for deployment without LoRA.

  Numerically the same as `apply`; the result is an ordinary parameter tree for the unchanged
  model definition. With a ``base_transform`` (QLoRA), the merged kernel is ``T(W) + delta``,
  which in general no longer lies on the quantization grid.

  Args:
    params: base parameters.
    adapters: trained adapters from `init`.
    alpha: the LoRA scale numerator used at `init`.
    rank: optional rank check, as in `apply`.
    base_transform: as in `apply`.

  Returns:
    The merged parameter tree.
  """
  return apply(params, adapters, alpha, rank, base_transform)


def num_parameters(adapters: Adapters) -> int:
  """Number of trainable adapter numbers: ``r * (in + out)`` per adapted kernel."""
  return sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(adapters))


def trainable_mask(tree: dict[str, Any]) -> dict[str, Any]:
  """Bool pytree for ``{"base": params, "lora": adapters}``: True on adapters only."""
  return {"base": jax.tree.map(lambda _: False, tree["base"]),
          "lora": jax.tree.map(lambda _: True, tree["lora"])}


def optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Wraps ``tx`` to train only the adapters of a ``{"base": params, "lora": adapters}`` tree.

  Built with ``optax.multi_transform``: adapters get ``tx``; the base gets
  ``optax.set_to_zero()``, so ``optax.apply_updates`` leaves it bit-identical and ``tx`` keeps
  no state (e.g. Adam moments) for it.

  Args:
    tx: the optimizer for the adapters.

  Returns:
    A gradient transformation over the combined tree.
  """
  def labels(tree):
    mask = trainable_mask(tree)
    return jax.tree.map(lambda on: "lora" if on else "base", mask)

  return optax.multi_transform({"lora": tx, "base": optax.set_to_zero()}, labels)
