"""The served form of a compressed model: what would be deployed, and what latency is timed on.

Training leaves a stage's compression in its params as values: pruned weights are zeros and
quantized weights lie on their grid, but the arrays are the dense float32 ones of the
teacher. Timing those measures the teacher again. `serve` builds the deployed form instead:

* **structured pruning is materialized**: dead attention heads and MLP units are removed
  (`pruning.materialize`), so the model is smaller and cheaper; the architecture is read
  back from the shapes (``config_from_params``);
* **quantized kernels are held as integers** (`QTensor`: int8 codes, or int16 above 8 bits,
  with their scales) and dequantized inside the jitted function (`dequantize`), so the
  weights read from memory are the integer ones;
* **unstructured and N:M sparsity stay as zeros in dense kernels**: XLA has no sparse
  kernel that would exploit them, so they save bytes (the export) but not time.

`Served.form` says which of these apply. The served model computes the stage's function:
the dequantized integer weights equal the fake-quantized ones, and removed units provably
contributed nothing (tested).

A note on integer matmuls: ``lax.dot_general`` on int8 operands with
``preferred_element_type=int32`` needs the activations quantized too (another model: static
or dynamic activation ranges) and, on XLA:CPU, runs slower than the float matmul
(``bench/served_int8.py`` measures both); dequantizing in the jitted function is the served
form here.
"""

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from compressjax import selection
from compressjax.pruning.materialize import materialize
from compressjax.quantization import quantizers


class QTensor(NamedTuple):
  """A served integer weight: ``(codes - zero_point) * scale``.

  Attributes:
    codes: the integer codes (int8 for at most 8 bits, int16 above).
    scale: float32 steps, broadcastable to ``codes`` (per channel or per tensor).
    zero_point: float32 zero points shaped as ``scale`` (zeros for symmetric specs).
  """
  codes: jax.Array
  scale: jax.Array
  zero_point: jax.Array


class Served(NamedTuple):
  """A model in its served form.

  Attributes:
    apply: ``apply(variables, *inputs)``, jitted; dequantizes `QTensor` leaves inside.
    variables: the served variables (``{"params": ...}`` with `QTensor` leaves).
    config: the served architecture (smaller after materialization), or None when the
      model is not rebuilt from a config.
    form: what the served form does, in words, for the report.
  """
  apply: Callable[..., Any]
  variables: Any
  config: Any
  form: str


def _is_q(x) -> bool:
  return isinstance(x, QTensor)


def dequantize(tree: Any) -> Any:
  """Float32 values of every `QTensor` leaf (jittable; other leaves are returned as they are)."""
  return jax.tree.map(
      lambda t: (t.codes.astype(jnp.float32) - t.zero_point) * t.scale if _is_q(t) else t,
      tree, is_leaf=_is_q)


def to_integers(params: Any, spec: "quantizers.Spec | quantizers.PerPath",
                where: selection.Where | None = None,
                grids: dict[str, quantizers.Grid] | None = None) -> Any:
  """The selected leaves of ``params`` as `QTensor` codes on their grid under ``spec``.

  Args:
    params: params whose selected leaves are on ``spec``'s grid (a QAT or PTQ stage).
    spec: their quantizer, or a per-path spec (``path -> Spec | None``; None: float).
    where: which leaves (default: Dense/Conv kernels).
    grids: path -> the grid to use instead of the leaf's own (``grid_of``); `serve` passes
      the grids of the unmaterialized kernels, which removing units can change.

  Returns:
    ``params`` with `QTensor` leaves; ``dequantize`` of it gives the quantized values.
  """
  flags = selection.select(params, where)

  def leaf(path, x, on):
    p = selection.path_str(path)
    s = quantizers.spec_at(spec, p) if on else None
    if s is None:
      return x
    grid = (grids or {}).get(p)
    if grid is None:
      grid = quantizers.grid_of(x, s)
    codes = quantizers.to_codes(x, s, grid)
    return QTensor(codes.astype(jnp.int8 if s.bits <= 8 else jnp.int16),
                   jnp.asarray(grid.scale, jnp.float32),
                   jnp.asarray(grid.zero_point, jnp.float32))
  return jax.tree_util.tree_map_with_path(leaf, params, flags)


def _kernel_grids(params: Any, spec, where) -> dict[str, quantizers.Grid]:
  flat = selection.leaves_by_path(params)
  specs = {p: quantizers.spec_at(spec, p) for p in selection.selected_paths(params, where)}
  return {p: quantizers.grid_of(flat[p], s) for p, s in specs.items() if s is not None}


def _carry_grids(old: dict[str, quantizers.Grid], new_params: Any,
                 old_params: Any, spec) -> dict[str, quantizers.Grid]:
  """Grids for the materialized kernels: a kernel that lost units keeps its grid per tensor,
  and per channel when its channel axis kept its length (only rows or heads went, whose
  values may have set a channel's range); a kernel that lost channels gets each remaining
  channel's own grid again (unchanged: a channel's grid is set by its own values)."""
  new_flat, old_flat = selection.leaves_by_path(new_params), selection.leaves_by_path(old_params)
  out = {}
  for p, g in old.items():
    s = quantizers.spec_at(spec, p)
    a, b = np.shape(old_flat[p]), np.shape(new_flat.get(p, ()))
    if a == b or s.granularity == "tensor" or a[s.axis] == b[s.axis]:
      out[p] = g
  return out


def _shapes_differ(a: Any, b: Any) -> bool:
  return jax.tree.structure(a) != jax.tree.structure(b) or any(
      np.shape(x) != np.shape(y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _units(config: Any) -> tuple[int, int]:
  """Total attention heads and MLP units of a transformer config (``depth``, ``num_heads``
  and ``mlp_dim``, ints or per-block tuples, as ``config_from_params`` gives)."""
  total = lambda v: sum(v) if isinstance(v, tuple) else v * config.depth
  return total(config.num_heads), total(config.mlp_dim)


@functools.lru_cache(maxsize=None)
def _jitted_apply(model_fn: Callable[[Any], Any], config: Any) -> Callable[..., Any]:
  """One jitted served apply per architecture (stages of one architecture share it)."""
  model = model_fn(config)
  return jax.jit(lambda v, *xs: model.apply(dequantize(v), *xs))


def _zero_fraction(params: Any) -> float:
  kernels = [np.asarray(x) for x in jax.tree.leaves(params) if np.ndim(x) >= 2]
  return sum(int(np.sum(k == 0)) for k in kernels) / max(sum(k.size for k in kernels), 1)


def serve(model_fn: Callable[[Any], Any], config: Any, params: Any,
          spec: "quantizers.Spec | quantizers.PerPath | None" = None,
          config_from_params: Callable[[Any, Any], Any] | None = None,
          activation: Callable[[Any], Any] | None = jax.nn.gelu,
          where: selection.Where | None = None) -> Served:
  """The served form of a model (see the module doc).

  Args:
    model_fn: ``config -> flax Module`` (e.g. ``iq_transformer.IQTransformer``).
    config: the architecture ``params`` belong to.
    params: the stage's params (``"params"`` collection contents).
    spec: the quantizer its kernels lie on, a per-path spec (mixed precision: ``path ->
      Spec | None``), or None for float kernels.
    config_from_params: ``(config, params) -> config`` reading the architecture back from a
      materialized tree; None serves the tree unmaterialized.
    activation: the hidden activation `pruning.materialize` folds dead units' constant
      outputs through.
    where: the quantized leaves (default: Dense/Conv kernels).

  Returns:
    A `Served` model.
  """
  host = jax.device_get(params)
  served, cfg, notes = host, config, []
  if config_from_params is not None:
    small = materialize(host, activation)
    if _shapes_differ(small, host):
      served, cfg = small, config_from_params(config, small)
      (h0, f0), (h1, f1) = _units(config), _units(cfg)
      notes.append(f"materialized: {h1}/{h0} heads, {f1}/{f0} MLP units")
  zeros = _zero_fraction(served)
  if zeros > 0.01:
    notes.append(f"{zeros:.0%} zeros kept in dense kernels (no sparse kernel on XLA)")
  if spec is not None:
    grids = _kernel_grids(host, spec, where)
    if served is not host:
      grids = _carry_grids(grids, served, host, spec)
    served = to_integers(served, spec, where, grids)
    bits = sorted({t.codes.dtype.itemsize * 8 for t in jax.tree.leaves(served, is_leaf=_is_q)
                   if _is_q(t)})
    grid = (f"{spec.bits}-bit grid" if isinstance(spec, quantizers.Spec) else
            "per-layer grids")
    notes.append(f"int{'/'.join(map(str, bits))} codes ({grid}) dequantized in jit")
  return Served(_jitted_apply(model_fn, cfg), {"params": served}, cfg,
                "; ".join(notes) or "dense float32")
