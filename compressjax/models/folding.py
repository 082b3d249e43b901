"""Batch-norm folding for export: BN scale folded into the preceding conv kernel.

At inference a batch norm is a per-channel affine map of its input,
``bn(z) = s * (z - mean) + beta`` with ``s = gamma / sqrt(var + eps)``, so for a convolution
``z = conv(x, W) (+ b)`` followed by BN,

  bn(conv(x, W) + b) = conv(x, s * W) + s * b + (beta - s * mean),

with ``s`` applied along the kernel's output (last) axis (Jacob et al. 2018, "Quantization and
Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", section 3.2).
`fold_batchnorm` rewrites the *variables*, not the module: the BN stays in the graph as an
identity plus bias (``gamma = 1``, ``beta' = beta - s * mean``, ``mean = 0``,
``var = fl32(1 - eps)``), so the same unmodified module applied with ``train=False`` gives the
same logits. Every conv kernel layout of the vision models has its output channels last: dense
``[k, k, in, out]``, grouped depthwise ``nn.Conv`` ``[k, k, 1, C]`` and
`compressjax.models.mobilenet_v2.DepthwiseConv` ``[k, k, 1, C]`` (which multiplies channel ``c``
of the input by ``kernel[dy, dx, 0, c]``), so one rule covers them all.

Exactness of the identity: in float32, ``fl(fl(1 - eps) + eps) == 1`` for every ``eps`` in
``(0, 1)`` (the rounding error of ``1 - eps`` is at most 2^-25, which rounds back to 1, ties to
even), and XLA's ``rsqrt(1) == 1``, so the folded BN computes ``z + beta'`` exactly. The only
differences from the original are the rounding of ``s * W`` and the reassociated products:
at most about 2e-7 of the largest logit on the tiny models in the tests.

Per-output-channel symmetric quantization commutes with the fold: the channel's step scales by
``|s_c|`` and its integer codes flip sign with ``s_c``, so quantizing the folded kernel equals
folding the quantized kernel, up to the step's rounding (per-tensor quantization has no such
property). Folding before INT8 export therefore costs no accuracy with per-channel specs.

`strip_batchnorm` drops the constants a folded BN no longer needs (``scale``, ``mean``,
``var``: three arrays of C float32 per BN), keeping kernels, the folded BN bias and every
other leaf; `restore_batchnorm` rebuilds runnable variables from that tree and the model's
abstract variables (``jax.eval_shape`` of ``init``), bit for bit.

Pairing (`batchnorm_pairs`): a BN is a module with ``mean`` and ``var`` in ``batch_stats`` and
``scale`` and ``bias`` in ``params``; its conv is the sibling (same parent scope) whose name is
the BN's name with ``"bn"`` replaced by ``"conv"``: ``bn -> conv`` (MobileNetV2's ``ConvBN``),
``stem_bn -> stem_conv``, ``bn1 -> conv1``, ``shortcut_bn -> shortcut_conv`` (ResNet). The rule
reads names, not the dataflow: it assumes the post-norm order (conv, then BN) of both models.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# Both vision models' default (``bn_epsilon``); pass ``epsilon=model.bn_epsilon`` otherwise.
DEFAULT_EPSILON = 1e-5

Path = tuple[str, ...]
# Leaves of a folded BN that `strip_batchnorm` drops and `restore_batchnorm` rebuilds.
_CONSTANTS = (("params", "scale"), ("batch_stats", "mean"), ("batch_stats", "var"))


def _check_epsilon(epsilon: float) -> float:
  if not 0.0 < float(epsilon) < 1.0:
    raise ValueError(f"epsilon must be in (0, 1), got {epsilon!r}")
  return float(epsilon)


def _unit_var(epsilon: float, shape, dtype) -> jax.Array:
  """``fl(1 - eps)``: with it, ``var + eps`` rounds to exactly 1 in float32."""
  return jnp.full(shape, jnp.asarray(1.0, dtype) - jnp.asarray(epsilon, dtype), dtype)


def _batchnorms(flat: Mapping[Path, Any]) -> list[Path]:
  """Module paths (without the collection) holding running ``mean`` and ``var``."""
  return sorted(p[1:-1] for p in flat if p[0] == "batch_stats" and p[-1] == "mean"
                and ("batch_stats", *p[1:-1], "var") in flat)


def batchnorm_pairs(variables: Mapping[str, Any]) -> dict[Path, Path]:
  """Maps each batch norm's module path to the path of the conv it folds into.

  Args:
    variables: Flax variables ``{"params": ..., "batch_stats": ...}``.

  Returns:
    ``{bn_path: conv_path}``, module paths without the collection name, e.g.
    ``("stage0_block0", "bn1") -> ("stage0_block0", "conv1")``.

  Raises:
    ValueError: a BN lacks ``scale`` or ``bias``, has no sibling conv (its name with ``"bn"``
      replaced by ``"conv"``), has several, or its conv's output channels differ from its own,
      or two BNs claim one conv; the message names the path.
  """
  flat = traverse_util.flatten_dict(variables)
  pairs, claimed = {}, {}
  for bn in _batchnorms(flat):
    where = "/".join(bn)
    for leaf in ("scale", "bias"):
      if ("params", *bn, leaf) not in flat:
        raise ValueError(f"batch norm {where} has no params {leaf!r}; folding needs both "
                         f"'scale' and 'bias'")
    parent, name = bn[:-1], bn[-1]
    starts = [i for i in range(len(name) - 1) if name.startswith("bn", i)]
    names = {name[:i] + "conv" + name[i + 2:] for i in starts}
    found = sorted(n for n in names if ("params", *parent, n, "kernel") in flat)
    if len(found) != 1:
      what = "no conv" if not found else f"an ambiguous conv (candidates {found})"
      raise ValueError(f"batch norm {where} has {what} to fold into: expected a sibling "
                       f"'kernel' named as the BN with 'bn' replaced by 'conv'")
    conv = (*parent, found[0])
    channels = flat[("batch_stats", *bn, "mean")].shape[-1]
    out = flat[("params", *conv, "kernel")].shape[-1]
    if out != channels:
      raise ValueError(f"batch norm {where} has {channels} channels but conv "
                       f"{'/'.join(conv)} has {out} outputs")
    if conv in claimed:
      raise ValueError(f"batch norms {'/'.join(claimed[conv])} and {where} both pair with "
                       f"conv {'/'.join(conv)}")
    claimed[conv] = bn
    pairs[bn] = conv
  return pairs


def fold_batchnorm(variables: Mapping[str, Any],
                   epsilon: float = DEFAULT_EPSILON) -> dict[str, Any]:
  """Folds every batch norm's scale into the conv before it (inference semantics).

  Each paired kernel (and conv bias, if any) is multiplied per output channel by
  ``s = gamma * rsqrt(var + eps)``; the BN becomes ``scale = 1``,
  ``bias = beta - s * mean``, ``mean = 0``, ``var = fl(1 - eps)``, an exact identity plus
  bias in float32. Pure and traceable (``jax.jit`` works); other leaves are returned as is.

  Args:
    variables: Flax variables with ``params`` and ``batch_stats``; see `batchnorm_pairs`.
    epsilon: the models' batch-norm epsilon (``model.bn_epsilon``), in ``(0, 1)``.

  Returns:
    New variables of the same structure, shapes and dtypes; applied with ``train=False`` to
    the same module they give the original logits up to float32 rounding.

  Raises:
    ValueError: ``epsilon`` out of range or a BN that cannot be paired (`batchnorm_pairs`).
  """
  epsilon = _check_epsilon(epsilon)
  pairs = batchnorm_pairs(variables)
  flat = dict(traverse_util.flatten_dict(variables))
  for bn, conv in pairs.items():
    gamma, beta = flat[("params", *bn, "scale")], flat[("params", *bn, "bias")]
    mean, var = flat[("batch_stats", *bn, "mean")], flat[("batch_stats", *bn, "var")]
    # The product in the order flax's BatchNorm takes it, so ``s`` is the original multiplier.
    s = jax.lax.rsqrt(var + epsilon) * gamma
    for leaf in ("kernel", "bias"):
      key = ("params", *conv, leaf)
      if key in flat:
        flat[key] = (flat[key] * s).astype(flat[key].dtype)
    flat[("params", *bn, "bias")] = (beta - mean * s).astype(beta.dtype)
    flat[("params", *bn, "scale")] = jnp.ones_like(gamma)
    flat[("batch_stats", *bn, "mean")] = jnp.zeros_like(mean)
    flat[("batch_stats", *bn, "var")] = _unit_var(epsilon, var.shape, var.dtype)
  return traverse_util.unflatten_dict(flat)


def strip_batchnorm(folded: Mapping[str, Any],
                    epsilon: float = DEFAULT_EPSILON) -> dict[str, Any]:
  """The tree to store after folding: every leaf but the folded BNs' constants.

  Drops each BN's ``scale`` (1), ``mean`` (0) and ``var`` (``fl(1 - eps)``) and keeps conv
  kernels, the folded BN ``bias``, dense layers and anything else; collections left empty
  disappear. The values are checked, so this runs on concrete arrays (not under ``jit``).

  Args:
    folded: variables returned by `fold_batchnorm`.
    epsilon: the epsilon they were folded with.

  Returns:
    A nested dict of the kept leaves, for `restore_batchnorm`.

  Raises:
    ValueError: a BN whose constants are not those of a fold with this ``epsilon`` (the
      variables were not folded, or were folded with another epsilon); the message names it.
  """
  epsilon = _check_epsilon(epsilon)
  flat = dict(traverse_util.flatten_dict(folded))
  for bn in batchnorm_pairs(folded):
    var = flat[("batch_stats", *bn, "var")]
    want = {"scale": 1.0, "mean": 0.0, "var": _unit_var(epsilon, (), var.dtype)}
    for collection, leaf in _CONSTANTS:
      got = np.asarray(flat.pop((collection, *bn, leaf)))
      if not np.all(got == np.asarray(want[leaf], got.dtype)):
        raise ValueError(f"batch norm {'/'.join(bn)} is not folded with epsilon={epsilon}: "
                         f"{collection} {leaf!r} is not {float(want[leaf])} everywhere "
                         f"(run fold_batchnorm first)")
  return traverse_util.unflatten_dict(flat)


def restore_batchnorm(tree: Mapping[str, Any], like: Mapping[str, Any],
                      epsilon: float = DEFAULT_EPSILON) -> dict[str, Any]:
  """Rebuilds runnable folded variables from `strip_batchnorm`'s tree (exact inverse).

  Args:
    tree: the stored leaves.
    like: the model's full variables or their shapes (``jax.eval_shape(model.init, ...)``);
      only structure, shapes and dtypes are read.
    epsilon: the epsilon the variables were folded with.

  Returns:
    Variables with ``like``'s structure: the leaves of ``tree``, and ``scale = 1``,
    ``mean = 0``, ``var = fl(1 - eps)`` for every batch norm of ``like``.

  Raises:
    ValueError: ``tree`` lacks a leaf that is not a BN constant, has a leaf ``like`` does not,
      or a leaf of another shape or dtype; the message names the path.
  """
  epsilon = _check_epsilon(epsilon)
  shapes = traverse_util.flatten_dict(like)
  given = traverse_util.flatten_dict(tree)
  extra = sorted("/".join(p) for p in set(given) - set(shapes))
  if extra:
    raise ValueError(f"tree has leaves the model does not: {extra}")
  constants = {(c, *bn, leaf) for bn in _batchnorms(shapes) for c, leaf in _CONSTANTS}
  out = {}
  for path, spec in shapes.items():
    where = "/".join(path)
    if path in given:
      value = given[path]
      if value.shape != spec.shape or value.dtype != spec.dtype:
        raise ValueError(f"{where} must have shape {spec.shape} and dtype {spec.dtype}, got "
                         f"{value.shape} {value.dtype}")
      out[path] = value
    elif path not in constants:
      raise ValueError(f"tree lacks {where}, which is not a batch-norm constant")
    elif path[-1] == "var":
      out[path] = _unit_var(epsilon, spec.shape, spec.dtype)
    else:
      out[path] = jnp.full(spec.shape, 1.0 if path[-1] == "scale" else 0.0, spec.dtype)
  return traverse_util.unflatten_dict(out)
