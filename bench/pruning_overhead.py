"""Overhead of `pruning.wrap` on a jitted train step, and the speed-up of `materialize`.

Run: ``python bench/pruning_overhead.py [--rounds 15] [--steps 10]``.

1. Train-step time of the IQ transformer (``teacher_config``, batch 64, modulation loss)
   with plain ``adamw`` vs ``pruning.wrap(adamw, 0.5)`` (magnitude, unstructured, a
   polynomial schedule firing every 100 updates, as in training), and a second copy of
   plain adamw (the A/A ratio shows the timing noise). A fourth variant fires on every
   update (the cost of a prune step: ranking all selected weights). Variants run
   interleaved, ``--steps`` steps per variant per round, medians over rounds.
2. Forward latency of the dense model vs the `materialize`d one at 50% head sparsity
   and at 50% MLP-neuron sparsity (fc1), interleaved the same way.

The last line is ``ratio: X``, wrapped / plain step time (target <= 1.10). The machine
may be loaded by other jobs, so figures are indicative.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from compressjax import models
from compressjax import pruning

import _common  # bench/_common.py, beside this script

BATCH = 64


def _interleave(fns: dict, rounds: int, reps: int) -> dict:
  """Median seconds per call of each ``fn()`` (which must block), interleaved by round."""
  times = {name: [] for name in fns}
  for r in range(rounds):
    names = list(fns)
    names = names[r % len(names):] + names[:r % len(names)]  # rotate the order
    for name in names:
      t = time.perf_counter()
      for _ in range(reps):
        fns[name]()
      times[name].append((time.perf_counter() - t) / reps)
  return {name: float(np.median(t)) for name, t in times.items()}


def train_step_overhead(rounds: int, steps: int) -> float:
  """Prints the step-time table; returns wrapped / plain."""
  cfg = models.teacher_config()
  rng = np.random.default_rng(0)
  iq = jnp.asarray(rng.normal(size=(BATCH, cfg.seq_len, 2)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, cfg.num_classes, BATCH), jnp.int32)
  params0 = jax.jit(models.init_params, static_argnums=0)(cfg, jax.random.key(0))
  variants = {
      "adamw": optax.adamw(1e-3),
      "adamw (A/A copy)": optax.adamw(1e-3),
      "wrap(adamw)": pruning.wrap(optax.adamw(1e-3), 0.5,
                                  schedule=pruning.polynomial(0, 1000, 100)),
      "wrap(adamw), prune every step": pruning.wrap(
          optax.adamw(1e-3), 0.5, schedule=pruning.polynomial(0, 10**6, 1)),
  }
  runs = {}
  for name, tx in variants.items():
    step = _common.modulation_step(models.IQTransformer(cfg), tx)
    carry = [params0, tx.init(params0)]
    jax.block_until_ready(step(*carry, iq, labels))  # compile

    def run(step=step, carry=carry):
      for _ in range(steps):
        carry[:] = step(*carry, iq, labels)
      jax.block_until_ready(carry[0])

    runs[name] = run
  med = _interleave(runs, rounds, 1)
  print(f"backend {jax.default_backend()}, IQ transformer teacher_config, batch {BATCH}")
  print(f"{'variant':<32} {'median ms/step':>15} {'vs adamw':>9}")
  for name, m in med.items():
    print(f"{name:<32} {1e3 * m / steps:>15.2f} {m / med['adamw']:>9.3f}")
  print(f"A/A ratio: {med['adamw (A/A copy)'] / med['adamw']:.3f}")
  return med["wrap(adamw)"] / med["adamw"]


def materialize_latency(rounds: int) -> None:
  """Prints dense vs materialized forward latency at 50% head and neuron sparsity."""
  cfg = models.teacher_config()
  rng = np.random.default_rng(1)
  iq = jnp.asarray(rng.normal(size=(BATCH, cfg.seq_len, 2)), jnp.float32)
  params = jax.jit(models.init_params, static_argnums=0)(cfg, jax.random.key(0))
  zero = jax.tree.map(jnp.zeros_like, params)
  setups = {
      "50% heads": pruning.wrap(optax.sgd(0.0), 0.5, structure="head"),
      "50% fc1 neurons": pruning.wrap(optax.sgd(0.0), 0.5, structure="neuron",
                                      where=lambda p: p.endswith("mlp/fc1/kernel")),
  }
  fns = {"dense": (cfg, params)}
  for name, tx in setups.items():
    updates, _ = jax.jit(tx.update)(zero, tx.init(params), params)
    small = pruning.materialize(optax.apply_updates(params, updates))
    fns[f"materialized, {name}"] = (models.config_from_params(cfg, small), small)
  calls = {}
  for name, (c, p) in fns.items():
    apply = jax.jit(models.IQTransformer(c).apply)
    jax.block_until_ready(apply({"params": p}, iq))
    calls[name] = lambda apply=apply, p=p: jax.block_until_ready(apply({"params": p}, iq))
  med = _interleave(calls, rounds, 5)
  print(f"{'forward (batch 64)':<32} {'median ms':>15} {'vs dense':>9}")
  for name, m in med.items():
    print(f"{name:<32} {1e3 * m:>15.2f} {m / med['dense']:>9.3f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--steps", type=int, default=10)
  args = parser.parse_args()
  ratio = train_step_overhead(args.rounds, args.steps)
  materialize_latency(args.rounds)
  print(f"ratio: {ratio:.3f}")


if __name__ == "__main__":
  main()
