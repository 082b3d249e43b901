"""Turns structurally pruned parameters into a smaller dense tree with the same outputs.

Head and neuron pruning (`wrap` with ``structure="head"``/``"neuron"``) leave whole
units at zero; `materialize` removes them so the smaller model really is cheaper.
Two layouts are understood:

* an MLP: a dict of Dense layers ``{name: {"kernel": [in, out], "bias": [out]}}``
  applied in order with an activation between them (``compressjax.models.MLP``);
  the dead output units of a hidden layer go with the matching input rows of the
  next layer;
* the IQ transformer (``block_{i}/attn/{query,key,value,out}``,
  ``block_{i}/mlp/{fc1,fc2}``, see the model contract): dead heads go from q/k/v/out
  and dead ``fc1`` units with the matching ``fc2`` rows.

Only units whose removal provably leaves the outputs unchanged are removed:

* a head whose output-projection slice is zero, or whose value kernel and bias
  slices are zero (it then adds nothing, whatever its attention weights);
* a hidden unit whose row in the next kernel is zero, or whose incoming kernel
  column is zero, so that it outputs the constant ``act(b)``. That constant's
  contribution ``act(b) * W_next[j]`` is folded into the next bias when
  ``activation`` is given; without it the unit is removed only when ``b == 0``,
  assuming ``act(0) == 0`` (true of relu, gelu, silu, tanh).

A transformer block may lose all its heads or MLP units (the model accepts zero-width
blocks: they add only their output bias). An MLP layer left with no live unit keeps one,
with a zero outgoing row, since ``nn.Dense(0)`` cannot be initialised.
"""

import re
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np

Activation = Callable[[Any], Any] | None


def _dead_inputs(kernel: np.ndarray, bias: np.ndarray | None,
                 activation: Activation) -> tuple[np.ndarray, np.ndarray]:
  """Units whose incoming weights are all zero: (removable, constant outputs)."""
  reduce = tuple(range(kernel.ndim - (1 if bias is None else bias.ndim)))
  cut = np.all(kernel == 0, axis=reduce)
  b = np.zeros(cut.shape, kernel.dtype) if bias is None else bias
  if activation is None:
    return cut & (b == 0), np.zeros_like(b)
  return cut, np.where(cut, np.asarray(activation(jnp.asarray(b))), 0)


def _shrink_pair(first: dict, second: dict, activation: Activation,
                 keep_one: bool) -> tuple[dict, dict]:
  """Removes dead output units of ``first`` and the matching input rows of ``second``."""
  k1, b1 = np.asarray(first["kernel"]), first.get("bias")
  k2, b2 = np.asarray(second["kernel"]), second.get("bias")
  b1 = None if b1 is None else np.asarray(b1)
  cut, const = _dead_inputs(k1, b1, activation)
  dead = cut | np.all(k2 == 0, axis=tuple(range(1, k2.ndim)))
  k2 = k2.copy()
  if b2 is not None:
    # Each removed unit j added const[j] * k2[j] to every output; move it to the bias.
    b2 = (np.asarray(b2, np.float64) + np.tensordot(const * cut, k2, axes=(0, 0)))
    b2 = b2.astype(np.asarray(second["bias"]).dtype)
  k2[dead] = 0
  keep = ~dead
  if keep_one and not keep.any():
    keep[0] = True
  first = {**first, "kernel": jnp.asarray(k1[..., keep])}
  if b1 is not None:
    first["bias"] = jnp.asarray(b1[keep])
  second = {**second, "kernel": jnp.asarray(k2[keep])}
  if b2 is not None:
    second["bias"] = jnp.asarray(b2)
  return first, second


def _shrink_heads(attn: Mapping[str, Any]) -> dict:
  """Removes dead heads from q/k/v ``[d, H, dh]`` and out ``[H, dh, d]``."""
  out_k = np.asarray(attn["out"]["kernel"])
  v_k = np.asarray(attn["value"]["kernel"])
  dead = np.all(out_k == 0, axis=(1, 2))
  v_dead = np.all(v_k == 0, axis=(0, 2))
  if "bias" in attn["value"]:
    v_dead &= np.all(np.asarray(attn["value"]["bias"]) == 0, axis=1)
  keep = ~(dead | v_dead)
  new = dict(attn)
  for name in ("query", "key", "value"):
    layer = dict(attn[name])
    layer["kernel"] = jnp.asarray(np.asarray(layer["kernel"])[:, keep])
    if "bias" in layer:
      layer["bias"] = jnp.asarray(np.asarray(layer["bias"])[keep])
    new[name] = layer
  new["out"] = {**attn["out"], "kernel": jnp.asarray(out_k[keep])}
  return new


def _natural_order(names: list[str]) -> list[str]:
  matches = [re.fullmatch(r"(.*?)_?(\d+)", n) for n in names]
  if all(matches) and len({m.group(1) for m in matches}) == 1:
    return sorted(names, key=lambda n: int(re.fullmatch(r".*?(\d+)", n).group(1)))
  return list(names)


def _is_transformer(params: Mapping[str, Any]) -> bool:
  return any(re.fullmatch(r"block_\d+", k) and isinstance(v, Mapping) and
             ("attn" in v or "mlp" in v) for k, v in params.items())


def materialize(params: Mapping[str, Any], activation: Activation = None) -> dict:
  """Removes structurally pruned units, giving a smaller tree with the same outputs.

  Runs on the host on concrete arrays (the output shapes depend on the values).

  Args:
    params: Flax params of an MLP or of the IQ transformer (optionally under a
      top-level ``"params"`` key), pruned by head/neuron structure.
    activation: the hidden activation (e.g. ``jax.nn.gelu``), used to fold the
      constant output of a unit with zero incoming weights but a non-zero bias into
      the next bias. ``None`` removes such units only when their bias is zero.

  Returns:
    A params dict of the same layout with fewer heads / hidden units. For the IQ
    transformer, ``models.iq_transformer.config_from_params`` gives its config.

  Raises:
    ValueError: if the tree is neither layout.
  """
  if set(params) == {"params"}:
    return {"params": materialize(params["params"], activation)}
  if _is_transformer(params):
    out = dict(params)
    for name, block in params.items():
      if not re.fullmatch(r"block_\d+", name):
        continue
      block = dict(block)
      if "attn" in block:
        block["attn"] = _shrink_heads(block["attn"])
      if "mlp" in block:
        mlp = dict(block["mlp"])
        mlp["fc1"], mlp["fc2"] = _shrink_pair(mlp["fc1"], mlp["fc2"], activation,
                                              keep_one=False)
        block["mlp"] = mlp
      out[name] = block
    return out
  names = [n for n, v in params.items() if isinstance(v, Mapping) and "kernel" in v
           and np.ndim(v["kernel"]) == 2]
  if len(names) < 2:
    raise ValueError("params must be an MLP (a dict of at least two Dense layers) or an IQ "
                     f"transformer (block_i/attn, block_i/mlp), got keys {sorted(params)}")
  names = _natural_order(names)
  out = {n: dict(v) if isinstance(v, Mapping) else v for n, v in params.items()}
  for first, second in zip(names[:-1], names[1:]):
    out[first], out[second] = _shrink_pair(out[first], out[second], activation,
                                                  keep_one=True)
  return out
