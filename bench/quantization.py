"""QAT step-time overhead of `quantization.wrap`, and packed sizes of the IQ transformer.

Run: ``python bench/quantization.py [--rounds 15] [--steps 5]``. Times one jitted training
step (modulation cross-entropy on a fixed simulator batch, adam) of the default
``IQTransformer`` three ways: plain adam, a second copy of plain adam (the A/A noise floor),
and adam wrapped by ``quantization.wrap`` (int8 per-channel on the Dense/DenseGeneral
kernels). Variants run interleaved round by round in rotating order; each round times
``--steps`` steps per variant; medians are reported. Then prints the serialized size of the
params (`quantization.nbytes`, real packed payload) as fp32, bf16, int8, int4, and int4 at 90%
sparsity (magnitude, per kernel), with the ratio to fp32. Only the kernels are quantized;
biases, LayerNorms and the position embedding stay float32 (they are counted). The last line
is ``ratio: X``, the wrapped/plain step-time ratio. The machine may be loaded by other jobs,
so figures are indicative.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from compressjax import channels
from compressjax import models
from compressjax import quantization
from compressjax import selection

import _common  # bench/_common.py, beside this script

SPEC8 = quantization.Spec(8, True, "channel")
SPEC4 = quantization.Spec(4, True, "channel")


def _time(step, state, x, y, steps):
  p, s = state
  t0 = time.perf_counter()
  for _ in range(steps):
    p, s = step(p, s, x, y)
  jax.block_until_ready(p)
  return (time.perf_counter() - t0) / steps, (p, s)


def _prune(params, sparsity):
  """Zeroes the smallest-magnitude ``sparsity`` fraction of every kernel (NumPy)."""
  def leaf(path, x):
    x = np.asarray(x)
    if not selection.default_where(selection.path_str(path)) or x.ndim < 2:
      return x
    k = int(sparsity * x.size)
    cut = np.partition(np.abs(x).ravel(), k)[k]
    return np.where(np.abs(x) < cut, 0.0, x).astype(x.dtype)
  return jax.tree_util.tree_map_with_path(leaf, params)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=15)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--batch", type=int, default=64)
  args = ap.parse_args()

  config = models.IQTransformerConfig()
  model = models.IQTransformer(config)
  params = models.init_params(config, jax.random.key(0))
  cfg = channels.ChannelConfig(seq_len=config.seq_len)
  batch = channels.simulate(jax.random.key(1), cfg, args.batch, task="modulation")
  x, y = batch.iq, batch.label

  txs = {"plain": optax.adam(1e-3), "plain (A/A)": optax.adam(1e-3),
         "qat int8": quantization.wrap(optax.adam(1e-3), SPEC8)}
  steps = {k: _common.modulation_step(model, tx) for k, tx in txs.items()}
  states = {k: (params, tx.init(params)) for k, tx in txs.items()}
  for k in steps:  # compile and warm up
    _, states[k] = _time(steps[k], states[k], x, y, 2)
  times = {k: [] for k in steps}
  names = list(steps)
  for r in range(args.rounds):
    for k in names[r % len(names):] + names[:r % len(names)]:
      t, states[k] = _time(steps[k], states[k], x, y, args.steps)
      times[k].append(t)
  med = {k: statistics.median(v) for k, v in times.items()}
  n = sum(v.size for v in jax.tree.leaves(params))
  print(f"IQTransformer (width {config.width}, depth {config.depth}), {n} params, batch "
        f"{args.batch}, {args.rounds} rounds x {args.steps} steps, {jax.devices()[0].platform}")
  print(f"{'variant':<14}{'median ms/step':>16}")
  for k in names:
    print(f"{k:<14}{1e3 * med[k]:>16.2f}")
  aa = med["plain (A/A)"] / med["plain"]
  ratio = med["qat int8"] / med["plain"]
  print(f"A/A ratio: {aa:.3f}   QAT/plain ratio: {ratio:.3f} (target <= 1.15)   "
        f"QAT/A-A copy: {med['qat int8'] / med['plain (A/A)']:.3f}")

  sparse = _prune(params, 0.9)
  sizes = {
      "fp32": quantization.nbytes(params),
      "bf16": quantization.nbytes(quantization.cast(params, jnp.bfloat16)),
      "int8": quantization.nbytes(quantization.export(params, SPEC8)),
      "int4": quantization.nbytes(quantization.export(params, SPEC4)),
      "int4 90% sparse": quantization.nbytes(quantization.export(sparse, SPEC4)),
  }
  print(f"\n{'format':<18}{'bytes':>12}{'ratio to fp32':>16}")
  for k, b in sizes.items():
    print(f"{k:<18}{b:>12d}{b / sizes['fp32']:>16.4f}")
  print(f"ratio: {ratio:.3f}")


if __name__ == "__main__":
  main()
