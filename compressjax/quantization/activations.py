"""Activation quantization around a Flax linen ``apply``: fake-quantize the inputs of layers.

The inputs of Dense/DenseGeneral/Conv/ConvTranspose layers are fake-quantized by intercepting
their ``__call__`` (``flax.linen.intercept_methods``), so any linen model is covered without
changing its code. Layers are named by their module path, '/'-joined (``"block_0/mlp/fc1"``,
the kernel's parameter path without ``/kernel``).
"""

from typing import Any, Callable, Mapping

import chex
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from compressjax.quantization import grids
from compressjax.quantization import quantizers

LAYER_TYPES = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.ConvTranspose)
MODES = ("dynamic", "static")
LayerWhere = Callable[[str], bool]


def layer_path(module: nn.Module) -> str:
  """The '/'-joined path of a bound module (``""`` for the root)."""
  return "/".join(str(p) for p in module.path)


def per_token_grid(x: chex.Array, spec: quantizers.Spec) -> quantizers.Grid:
  """A grid per token: ``spec.grid``'s range (min/max by default) over the last (feature) axis
  of ``x``."""
  x = jnp.asarray(x, jnp.float32)
  return quantizers.grid_from_range(*quantizers.grid_range(x, spec, (x.ndim - 1,)), spec)


def _intercepted(context, args, where) -> str | None:
  """The layer path if this call is a selected layer's ``__call__`` with an input, else None."""
  if context.method_name != "__call__" or not isinstance(context.module, LAYER_TYPES):
    return None
  if not args:
    return None
  path = layer_path(context.module)
  return path if where is None or where(path) else None


def _check_ranges(ranges: Any) -> dict[str, tuple[float, float]]:
  if not isinstance(ranges, Mapping):
    raise ValueError(f"ranges must be a dict path -> (lo, hi) in static mode, got {ranges!r}")
  out = {}
  for path, r in ranges.items():
    lo, hi = (float(np.asarray(v)) for v in r)
    if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
      raise ValueError(f"ranges[{path!r}] must be finite with lo <= hi, got ({lo}, {hi})")
    out[path] = (lo, hi)
  return out


def quantize_activations(apply_fn: Callable[..., Any], spec: quantizers.Spec | int,
                         mode: str = "dynamic", where: LayerWhere | None = None,
                         ranges: Mapping[str, tuple[float, float]] | None = None):
  """Wraps a linen ``apply`` so the inputs of selected layers are fake-quantized.

  ``dynamic``: each token (the vector along the last axis: a sequence position of a Dense
  input, a pixel of a Conv input) gets its own grid at run time (``spec.grid``'s method:
  min/max by default), as in dynamic quantization of LLM activations (Dettmers et al. 2022,
  "LLM.int8()"; Xiao et al. 2023, "SmoothQuant", per-token). ``static``: one calibrated range
  per layer (`calibrate`, from ``spec.grid`` too), fixed at run time (Jacob et al. 2018);
  values beyond it are clipped. ``spec.granularity`` and ``spec.axis`` are not used; gradients
  pass straight through (`fake_quant`), so the wrapped apply also serves quantization-aware
  training.

  Pass an apply that is not already jitted (a jitted one may reuse a trace made without the
  interception); jit the returned function instead.

  Args:
    apply_fn: a Flax linen ``apply`` (for example ``model.apply``).
    spec: a `Spec`, or a bit width.
    mode: ``"dynamic"`` or ``"static"``.
    where: predicate on the layer path (default: every Dense/DenseGeneral/Conv/ConvTranspose).
    ranges: static mode: a dict layer path -> ``(lo, hi)``; every selected layer must have one.

  Returns:
    A function with ``apply_fn``'s signature.
  """
  spec = quantizers.as_spec(spec)
  grids.get_grid(spec.grid)
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if mode == "static":
    table = _check_ranges(ranges)
    by_layer = {p: quantizers.grid_from_range(lo, hi, spec) for p, (lo, hi) in table.items()}
  elif ranges is not None:
    raise ValueError(f"ranges must be None in dynamic mode, got {type(ranges).__name__}")

  def interceptor(next_fun, args, kwargs, context):
    path = _intercepted(context, args, where)
    if path is None:
      return next_fun(*args, **kwargs)
    x = args[0]
    if mode == "dynamic":
      grid = per_token_grid(x, spec)
    else:
      if path not in by_layer:
        raise ValueError(f"ranges has no entry for layer {path!r}; calibrate it, or leave it "
                         f"out with `where` (ranges has {sorted(by_layer)})")
      grid = by_layer[path]
    return next_fun(quantizers.fake_quant(x, spec, grid=grid), *args[1:], **kwargs)

  def apply_q(*args, **kwargs):
    with nn.intercept_methods(interceptor):
      return apply_fn(*args, **kwargs)

  return apply_q


def record_inputs(apply_fn: Callable[..., Any], where: LayerWhere | None = None):
  """Wraps ``apply_fn`` to also return the inputs of the selected layers.

  Returns:
    A function returning ``(outputs, inputs)`` with ``inputs`` a dict layer path -> list of
    arrays (one per call of that layer); it can be jitted.
  """

  def apply_rec(*args, **kwargs):
    seen: dict[str, list[chex.Array]] = {}

    def interceptor(next_fun, a, kw, context):
      path = _intercepted(context, a, where)
      if path is not None:
        seen.setdefault(path, []).append(a[0])
      return next_fun(*a, **kw)

    with nn.intercept_methods(interceptor):
      out = apply_fn(*args, **kwargs)
    return out, seen

  return apply_rec
