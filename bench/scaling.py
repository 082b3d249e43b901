"""Data-parallel steps per second over 1-8 devices, and a vmapped seed sweep vs one by one.

Run: ``python bench/scaling.py [--rounds 7] [--steps 5] [--seeds 3]``.

1. The wireless train step (`make_train_step` with the simulator inside, the CPU-size
   teacher of ``experiments/common.py``, 64 frames per task, AdamW) on a ``"data"`` mesh
   of 1, 2, 4 and 8 devices: the same global batch, so the same work, split over more
   devices. Without an accelerator the script asks XLA for 8 host devices; on this
   2-core CPU they share the same two cores, so the figure measures the overhead of the
   partitioned program (collectives, per-device dispatch), not a speed-up. On a machine
   with 8 GPUs or TPU cores the same script measures real scaling.
2. A sweep of ``--seeds`` seeds: one ``jax.vmap``-ed step over stacked states vs the
   plain step called once per seed, the same steps each; plus a second copy of the
   one-by-one variant (A/A, the timing noise). Compile times are reported apart.

Variants run interleaved round by round; medians. The last line is ``ratio: X``, the
one-by-one time over the vmapped time for the same seeds and steps (> 1: the sweep wins).
"""

import os
import sys

if "jax" not in sys.modules and "--xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  # Only used when JAX finds no accelerator (the CPU backend then has 8 devices).
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import time

import jax
import numpy as np
import optax

from compressjax.models import iq_transformer
from compressjax.studies.wireless import validate
from compressjax.training import multitask
from compressjax.training import parallel
from compressjax.training import steps

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from experiments import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def _median_times(fns: dict, rounds: int) -> dict:
  """Median seconds of each ``fn()`` (which blocks), the order rotated every round."""
  times = {name: [] for name in fns}
  names = list(fns)
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      t0 = time.perf_counter()
      fns[name]()
      times[name].append(time.perf_counter() - t0)
  return {name: float(np.median(t)) for name, t in times.items()}


def _parts(setup, batch):
  model = iq_transformer.IQTransformer(setup.teacher)
  fwd = multitask.multitask_forward(model.apply)
  data_fn = multitask.multitask_data_fn(setup.channel, batch)
  return fwd, data_fn


def _state(setup, tx, seed):
  params = iq_transformer.init_params(setup.teacher, jax.random.key(seed))
  return steps.create_train_state(params, tx, jax.random.key(seed + 1000))


def _runner(step, state, n, in_flight=2):
  """``run()`` doing ``n`` steps from the current state (the state carries on), with at
  most ``in_flight`` of them queued (`parallel.safe_in_flight`)."""
  box = [state]

  def run():
    s, queued = box[0], []
    for _ in range(n):
      s, m = step(s)
      queued.append(m)
      if len(queued) >= in_flight:
        jax.block_until_ready(queued[-in_flight])
    jax.block_until_ready(m)
    box[0] = s

  return run


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--seeds", type=int, default=3)
  args = p.parse_args()
  config = common.base_config("cpu")
  setup = validate(config)
  batch = config.train.batch_size
  tx = optax.adamw(1e-3, weight_decay=1e-4)
  fwd, data_fn = _parts(setup, batch)
  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform} "
        f"({jax.devices()[0].device_kind}); batch {batch} frames per task x 3 tasks")

  # 1. Data parallelism.
  counts = [n for n in (1, 2, 4, 8) if n <= jax.device_count()]
  runs, compile_s = {}, {}
  for n in counts:
    mesh = parallel.make_mesh(n)
    step = steps.make_train_step(fwd, tx, multitask.task_losses,
                                 parallel.shard_data_fn(data_fn, mesh, batch), mesh=mesh)
    state = parallel.replicate(_state(setup, tx, 0), mesh)
    t0 = time.perf_counter()
    state, m = step(state)
    jax.block_until_ready(m)
    compile_s[n] = time.perf_counter() - t0
    runs[f"{n} devices"] = _runner(step, state, args.steps, parallel.safe_in_flight(mesh))
  t = _median_times(runs, args.rounds)
  base = t["1 devices"]
  print(f"\n{'devices':>8} {'steps/s':>9} {'vs 1':>6} {'compile+1st s':>14}")
  for n in counts:
    sec = t[f"{n} devices"] / args.steps
    print(f"{n:>8} {1 / sec:>9.2f} {base / t[f'{n} devices']:>6.2f} {compile_s[n]:>14.2f}")

  # 2. A vmapped sweep vs one by one.
  n = args.seeds
  single = steps.make_train_step(fwd, tx, multitask.task_losses, data_fn)
  swept = steps.make_train_step(fwd, tx, multitask.task_losses, data_fn, vmap=True)
  t0 = time.perf_counter()
  sweep_state, m = swept(steps.stack([_state(setup, tx, s) for s in range(n)]))
  jax.block_until_ready(m)
  compile_sweep = time.perf_counter() - t0
  seq_states = []
  t0 = time.perf_counter()
  for s in range(n):
    st, m = single(_state(setup, tx, s))
    seq_states.append(st)
  jax.block_until_ready(m)
  compile_seq = time.perf_counter() - t0
  one_by_one = [_runner(single, st, args.steps) for st in seq_states]
  copy = [_runner(single, st, args.steps) for st in
          [single(_state(setup, tx, s))[0] for s in range(n)]]
  t = _median_times({
      "vmapped": _runner(swept, sweep_state, args.steps),
      "one by one": lambda: [r() for r in one_by_one],
      "one by one (A/A copy)": lambda: [r() for r in copy],
  }, args.rounds)
  print(f"\nsweep of {n} seeds, {args.steps} steps each per round "
        f"(first call incl. compile: vmapped {compile_sweep:.2f} s, one by one "
        f"{compile_seq:.2f} s for {n} calls of one compiled step)")
  for name, sec in t.items():
    print(f"{name:>24} {sec * 1e3:9.1f} ms  {n * args.steps / sec:7.2f} seed-steps/s")
  print(f"A/A (one by one / its copy): {t['one by one'] / t['one by one (A/A copy)']:.3f}")
  print(f"ratio: {t['one by one'] / t['vmapped']:.2f}")


if __name__ == "__main__":
  main()
