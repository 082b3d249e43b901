"""The launcher at scale and under failure: vmapped seed sweeps, SIGKILL and resume, config checks.

The test process has 8 CPU devices (tests/conftest.py), and so do the launcher subprocesses
(they inherit XLA_FLAGS): every run here is data-parallel over 8 devices.
"""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from compressjax.studies import wireless as pipelines
from compressjax.models import iq_transformer
from compressjax.training import checkpoint
from experiments import sweep
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The evaluation these tests need: three Es/N0 points (the tiny default has 13).
_EVAL = {"eval.snr_points": (0.0, 15.0, 30.0)}


def _config(pipelines_=None):
  c = sweep.get_config("tiny")
  for name in list(c.pipelines):
    del c.pipelines[name]
  for name, text in (pipelines_ or {}).items():
    c.pipelines[name] = text
  c.compare = ()
  return c


def _params(workdir, seed, stage, config):
  setup = pipelines.validate(config)
  target = jax.eval_shape(lambda: iq_transformer.init_params(setup.teacher, jax.random.key(0)))
  path = os.path.join(workdir, f"seed_{seed}", stage, "variables")
  return jax.device_get(checkpoint.restore(path, target))


@pytest.mark.slow
def test_a_vmapped_seed_sweep_equals_the_seeds_run_one_by_one(tmp_path):
  seeds = (0, 1)  # tests/training/test_parallel.py compares 3 seeds step by step
  runs = {}
  for vmap in (False, True):
    c = _config({"P": "prune"})
    helpers.set_fields(c, {**_EVAL, "train.steps": 12, "train.warmup_steps": 2,
                           "prune.steps": 4})
    c.seeds, c.train.vmap_seeds = seeds, vmap
    workdir = str(tmp_path / f"vmap_{vmap}")
    runs[vmap] = (workdir, {(r["seed"], r["name"]): r for r in pipelines.run(c, workdir)})
  (w_seq, seq), (w_vmap, vm) = runs[False], runs[True]
  assert set(seq) == set(vm) and len(seq) == 2 * len(seeds)
  for s in seeds:
    for stage in ("teacher", os.path.join("P", "1_prune")):
      helpers.assert_params_close(_params(w_vmap, s, stage, c), _params(w_seq, s, stage, c),
                                  rtol=1e-3, atol=1e-5)
    for name in ("teacher", "P/1_prune"):
      assert vm[(s, name)]["nonfinite_steps"] == 0
      assert abs(vm[(s, name)]["accuracy"] - seq[(s, name)]["accuracy"]) <= 0.02
      assert vm[(s, name)]["bytes"] == seq[(s, name)]["bytes"]
  # The seeds really differ, and the report aggregates them.
  assert len({seq[(s, "teacher")]["accuracy"] for s in seeds}) > 1
  assert "±" in open(os.path.join(w_vmap, "results.md")).read()
  metrics = json.load(open(os.path.join(w_vmap, "metrics.json")))
  assert all("nonfinite_steps" in r for r in metrics)


def _launch_args(workdir):
  return [sys.executable, os.path.join(ROOT, "launch.py"),
          "--config=experiments/baseline.py:tiny", f"--workdir={workdir}",
          "--config.train.steps=100", "--config.train.checkpoint_every=10",
          "--config.train.log_every=10", "--config.train.warmup_steps=10",
          "--config.eval.snr_points=(0.0,30.0)"]


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_params(tmp_path):
  done = tmp_path / "done"
  out = subprocess.run(_launch_args(done), cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]

  killed = tmp_path / "killed"
  ckpt_dir = killed / "seed_0" / "teacher" / "ckpt"
  returncode = helpers.kill_after_first_checkpoint(_launch_args(killed), ROOT, ckpt_dir,
                                                   max_delay=0.5)
  assert returncode == -signal.SIGKILL
  assert not (killed / "seed_0" / "teacher" / "variables").exists(), "the kill came too late"

  resumed = subprocess.run(_launch_args(killed), cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  log = resumed.stderr
  assert "resuming from the checkpoint at step" in log
  step = int(log.split("resuming from the checkpoint at step ")[1].split()[0])
  assert 10 <= step < 100 and step % 10 == 0
  config = _config()
  a, b = _params(str(killed), 0, "teacher", config), _params(str(done), 0, "teacher", config)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)  # bit-identical on CPU


def test_a_diverging_run_stops_with_a_clear_message_and_writes_no_weights(tmp_path):
  c = _config()
  c.train.learning_rate = 1e30   # the first update sends the weights to inf
  c.train.max_nonfinite = 3
  with pytest.raises(FloatingPointError, match="diverged"):
    pipelines.run(c, str(tmp_path))
  assert not (tmp_path / "seed_0" / "teacher" / "variables").exists()
  assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("override, message", [
    # channel
    ({"channel.modulation": "qam8"}, "channel.modulation must be one of"),
    ({"channel.delay_spread_ns": -1.0}, "delay_spread_ns"),
    ({"channel.snr_db": (float("nan"), 5.0)}, "snr_db"),
    ({"channel.doppler_hz": -5.0}, "doppler_hz"),
    # training and scale
    ({"train.num_devices": 9}, r"train.num_devices must be an int in \[0, 8\]"),
    ({"train.batch_size": 12}, "train.batch_size must be a multiple of the 8 devices"),
    ({"train.batch_size": 6, "train.num_devices": 4}, "multiple of the 4 devices"),
    ({"eval.frames_per_point": 0}, "eval.frames_per_point must be an int >= 1"),
    ({"train.warmup_steps": 30}, "train.warmup_steps"),
    ({"train.max_nonfinite": 0}, "train.max_nonfinite"),
    # reliability / I/O
    ({"train.checkpoint_every": -1}, "train.checkpoint_every must be an int >= 0"),
    ({"train.keep_checkpoints": 1}, "train.keep_checkpoints must be an int >= 2"),
    ({"seeds": (1, 1)}, "seeds must be distinct"),
    # compression
    ({"prune.sparsity": -0.1}, "prune.sparsity"),
    ({"quantize.bits": 17}, "bits must be an int in"),
    ({"quantize.steps": -1}, "quantize.steps"),
    ({"distill.steps": 0}, "distill.steps"),
])
def test_more_bad_configs_are_rejected_before_any_work(override, message):
  c = _config({"PQK": "prune,quantize,distill"})
  helpers.set_fields(c, override)
  with pytest.raises(ValueError, match=message):
    pipelines.validate(c)


def _launch(args, env=None, timeout=120):
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, **(env or {})})


def test_launch_rejects_bad_scale_settings_before_writing_anything(tmp_path):
  w = tmp_path / "w"
  out = _launch(["--distributed=sometimes", f"--workdir={w}"])
  assert out.returncode != 0 and "distributed" in out.stderr and not w.exists()
  out = _launch([f"--workdir={w}"], env={"JAX_COORDINATOR_ADDRESS": "localhost:1"})
  assert out.returncode != 0 and "JAX_NUM_PROCESSES and JAX_PROCESS_ID must be" in out.stderr
  assert not w.exists()
  out = _launch([f"--workdir={w}", "--config.train.num_devices=64"])
  assert out.returncode != 0 and "train.num_devices must be" in out.stderr
  assert not w.exists()
