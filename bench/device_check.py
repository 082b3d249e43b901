"""A device check, ready to run: the simulator, the teacher's step, INT8 serving, training.

  python bench/device_check.py                      # full size, on whatever device JAX finds
  python bench/device_check.py --size=tiny          # the same on CPU at tiny size (a test)
  python bench/device_check.py --json=check.json    # the figures as JSON too

On the first device of ``jax.devices()`` it prints, one section each:

1. the simulator's complex samples/s on the training channel (``sweep.py:<size>``'s
   channel, every task's frames) at a large batch, jitted, timed after warm-up;
2. the teacher's train steps/s and frames/s at the size, float32 and bfloat16 timed in
   interleaved rounds, beside the CPU default's (size ``cpu`` on ``jax.devices("cpu")[0]``)
   and their ratio;
3. the served INT8 teacher's latency / the float teacher's at the eval batch, the median
   per-round ratio with its 10th-90th percentiles (`training.latency_ratio`);
4. a training check: the teacher trained ``--steps`` steps with the study's optimizer,
   every loss finite and the last 10%'s mean below the first 10%'s. PASS or FAIL (exit 1).

The H100 targets are printed beside the figures, never asserted: >= 1e9 simulated complex
samples/s, and a ``full`` teacher step >= 20x the CPU default's frames/s.
"""

import argparse
import dataclasses
import json
import os
import sys

import jax
import numpy as np

from compressjax import channels
from compressjax import quantization
from compressjax import training
from compressjax.models import iq_transformer
from compressjax.studies import engine
from compressjax.studies import wireless
from compressjax.studies import wireless_measure

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from experiments import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import sweep  # pylint: disable=g-import-not-at-top,wrong-import-position

SIM_TARGET = 1e9     # simulated complex samples/s on an H100
SPEEDUP_TARGET = 20  # full teacher frames/s on an H100 / the CPU default's
DTYPES = engine.COMPUTE_DTYPES


def plan_of(size: str) -> wireless.Plan:
  """The resolved `Plan` of ``experiments/sweep.py:<size>``."""
  return wireless.validate(sweep.get_config(size))


def _seconds(fn, *args, rounds: int, repeats: int = 2) -> float:
  """Median over rounds of the fastest of ``repeats`` calls, after a compiling warm-up."""
  return float(np.median(training.interleaved_latency([(fn, args)], rounds=rounds, warmup=1,
                                                      repeats=repeats)))


def train_step(plan: wireless.Plan, model_cfg, tx):
  """The study's teacher step (`training.make_train_step`, data drawn inside) and its state.

  The step does not donate its state, so the throughput rounds can call it on one state
  again and again; the training check then starts from that same untouched state.
  """
  forward = training.multitask_forward(iq_transformer.IQTransformer(model_cfg).apply)
  loss_fn = lambda o, b: training.task_losses(o, b, plan.task_weights)
  data_fn = training.multitask_data_fn(plan.channel, plan.train.batch_size, plan.tasks)
  step = training.make_train_step(forward, tx, loss_fn, data_fn, donate=False)
  params = iq_transformer.init_params(model_cfg, jax.random.key(0))
  return step, training.create_train_state(params, tx, jax.random.key(1))


def fitted_optimizer(plan: wireless.Plan, steps: int):
  """The study's teacher optimizer with its schedule fitted to ``steps`` steps."""
  opt = plan.teacher_optimizer
  return engine.optimizer(opt._replace(steps=steps,
                                       warmup_steps=min(opt.warmup_steps, steps // 10)))


def frames_per_step(plan: wireless.Plan) -> int:
  """Frames one train step draws and trains on (every task's batch)."""
  return plan.train.batch_size * len(plan.tasks)


def check_simulator(plan: wireless.Plan, frames: int, rounds: int) -> dict:
  """Complex samples/s of every task's frames of the training channel, ``frames`` per task."""
  draw = jax.jit(training.multitask_data_fn(plan.channel, frames, plan.tasks))
  seconds = _seconds(draw, jax.random.key(0), rounds=rounds)
  samples = frames * len(plan.tasks) * plan.channel.seq_len
  return {"frames_per_task": frames, "tasks": len(plan.tasks),
          "seq_len": plan.channel.seq_len, "seconds": seconds,
          "samples_per_s": samples / seconds, "target": SIM_TARGET}


def check_train_throughput(plan: wireless.Plan, teacher_steps: dict, rounds: int,
                           cpu_rounds: int, same_machine: bool) -> dict:
  """Steps/s and frames/s of the teacher's step per dtype, and of the CPU default's.

  Args:
    plan: the size's plan.
    teacher_steps: ``{dtype: (step, state)}`` from `train_step`, timed interleaved.
    rounds: timed rounds.
    cpu_rounds: timed rounds of the CPU default (size ``cpu`` on ``jax.devices("cpu")[0]``).
    same_machine: the device timed is that CPU itself.

  Returns:
    ``{dtype: {"steps_per_s", "frames_per_s", "vs_cpu_default"}, "cpu_default": {...}}``.
  """
  times = training.interleaved_latency([(s, (st,)) for s, st in teacher_steps.values()],
                                       rounds=rounds, warmup=1, repeats=2)
  out = {}
  for d, t in zip(teacher_steps, np.median(times, axis=0)):
    out[d] = {"steps_per_s": 1 / float(t), "frames_per_s": frames_per_step(plan) / float(t)}
  cpu_plan = plan_of("cpu")
  with jax.default_device(jax.devices("cpu")[0]):
    step, state = train_step(cpu_plan, cpu_plan.teacher,
                             engine.optimizer(cpu_plan.teacher_optimizer))
    t = _seconds(step, state, rounds=cpu_rounds)  # timed as the device's steps
  out["cpu_default"] = {"frames_per_s": frames_per_step(cpu_plan) / t,
                        "steps_per_s": 1 / t, "same_machine": same_machine}
  for d in teacher_steps:
    out[d]["vs_cpu_default"] = out[d]["frames_per_s"] / out["cpu_default"]["frames_per_s"]
  out["target"] = SPEEDUP_TARGET
  return out


def check_served_int8(plan: wireless.Plan, params, rounds: int) -> dict:
  """The served INT8 teacher's latency / the float teacher's at the eval batch, interleaved."""
  cfg = dataclasses.replace(plan.teacher, dtype="float32")
  float_sv = wireless_measure.served(cfg, params)
  int8_sv = wireless_measure.served(cfg, quantization.quantize_tree(params, plan.spec),
                                    plan.spec)
  x = channels.simulate(jax.random.key(2), plan.channel, plan.eval.batch_size, "symbols").iq
  times = training.interleaved_latency([(float_sv.apply, (float_sv.variables, x)),
                                        (int8_sv.apply, (int8_sv.variables, x))],
                                       rounds=rounds)
  return {"batch": plan.eval.batch_size, "form": int8_sv.form,
          "float_ms": 1e3 * float(np.median(times[:, 0])),
          "int8_ms": 1e3 * float(np.median(times[:, 1])),
          **training.latency_ratio(times[:, 1], times[:, 0])}


def check_training(step, state, steps: int) -> dict:
  """Trains ``steps`` steps; every loss finite, the last 10%'s mean below the first 10%'s."""
  losses = []
  for _ in range(steps):
    state, metrics = step(state)
    losses.append(metrics["loss"])  # kept on device, fetched once at the end
  losses = np.asarray(jax.device_get(losses), np.float64)
  k = max(1, steps // 10)
  first, last = float(losses[:k].mean()), float(losses[-k:].mean())
  finite = bool(np.all(np.isfinite(losses)))
  return {"steps": steps, "first": first, "last": last, "finite": finite,
          "passed": finite and last < first}


def report(device, size: str, r: dict) -> None:
  """Prints the four sections."""
  print(f"device: {device} ({device.device_kind}), the first of {len(jax.devices())}; "
        f"jax {jax.__version__}; size {size}")
  s = r["simulator"]
  print(f"\n[1] simulator, training channel ({s['frames_per_task']} frames x {s['tasks']} "
        f"tasks x {s['seq_len']} samples per call, {1e3 * s['seconds']:.2f} ms):\n"
        f"    {s['samples_per_s']:.3g} complex samples/s"
        f"   (H100 target: >= {SIM_TARGET:.0e})")
  t = r["train"]
  print(f"\n[2] teacher train step, size {size}:")
  for d in DTYPES:
    print(f"    {d:<9} {t[d]['steps_per_s']:8.3g} steps/s {t[d]['frames_per_s']:10.4g} "
          f"frames/s  = {t[d]['vs_cpu_default']:.3g}x the CPU default")
  c = t["cpu_default"]
  same = "  (the same machine as the device above)" if c["same_machine"] else ""
  print(f"    CPU default (size cpu, float32, on cpu:0): {c['frames_per_s']:.4g} frames/s"
        f"{same}\n    (H100 target at size full: >= {SPEEDUP_TARGET}x the CPU default)")
  v = r["served_int8"]
  print(f"\n[3] served INT8 teacher / float teacher, eval batch {v['batch']} frames "
        f"({v['form']}):\n    latency ratio {v['ratio']:.3f}x [p10 {v['lo']:.3f}, "
        f"p90 {v['hi']:.3f}]{' noisy' if v['noisy'] else ''}   ({v['int8_ms']:.3f} ms vs "
        f"{v['float_ms']:.3f} ms)")
  c = r["training"]
  print(f"\n[4] training check, {c['steps']} steps: loss {c['first']:.4f} (first 10%) -> "
        f"{c['last']:.4f} (last 10%), all finite: {c['finite']}: "
        f"{'PASS' if c['passed'] else 'FAIL'}")


def parse(argv) -> argparse.Namespace:
  """The flags; a bad value exits (status 2) naming the flag and what is allowed."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--size", default="full", choices=common.SIZES,
                  help="experiments/sweep.py's config size")
  ap.add_argument("--steps", type=int, default=None,
                  help="training check steps (default: 200; 20 at tiny)")
  ap.add_argument("--sim_frames", type=int, default=None,
                  help="simulator frames per task per call (default: 4096 on an "
                       "accelerator; 512 on CPU, 128 at tiny)")
  ap.add_argument("--json", default=None, help="also write the figures to this file")
  args = ap.parse_args(argv)
  if args.steps is not None and args.steps < 10:
    ap.error(f"--steps must be >= 10 (the check compares the first and last tenths), "
             f"got {args.steps}")
  if args.sim_frames is not None and args.sim_frames < 1:
    ap.error(f"--sim_frames must be >= 1, got {args.sim_frames}")
  return args


def main(argv=None) -> int:
  """Runs the check; returns 0 when the training check passes, else 1."""
  args = parse(argv)
  tiny = args.size == "tiny"
  device = jax.devices()[0]
  on_cpu = device.platform == "cpu"
  steps = args.steps or (20 if tiny else 200)
  frames = args.sim_frames or (128 if tiny else 512 if on_cpu else 4096)
  rounds = 3 if tiny else 5
  plan = plan_of(args.size)
  with jax.default_device(device):
    results = {"device": str(device), "platform": device.platform,
               "device_kind": device.device_kind, "size": args.size,
               "simulator": check_simulator(plan, frames, rounds)}
    # One optimizer for both dtypes' steps and the training check: the float32 step timed
    # is the one trained, compiled once.
    tx = fitted_optimizer(plan, steps)
    teacher = {d: train_step(plan, dataclasses.replace(plan.teacher, dtype=d), tx)
               for d in DTYPES}
    results["train"] = check_train_throughput(plan, teacher, rounds, 2 if tiny else 5,
                                              on_cpu)
    params = teacher["float32"][1].params
    results["served_int8"] = check_served_int8(
        plan, params, rounds if tiny else plan.eval.latency_repeats)
    results["training"] = check_training(*teacher[plan.teacher.dtype], steps)
  report(device, args.size, results)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  return 0 if results["training"]["passed"] else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
