"""Two processes on this machine stand in for two hosts: `launch.py` under jax.distributed.

Each process has 2 CPU devices (4 global, linked by Gloo); the result must match one
process with 4 devices, and only process 0 may write the report.
"""

import os
import socket
import subprocess
import sys

import jax
import pytest

from compressjax.studies import wireless as pipelines
from compressjax.models import iq_transformer
from compressjax.training import checkpoint
from experiments import baseline
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config=experiments/baseline.py:tiny", "--config.train.steps=20",
        "--config.train.checkpoint_every=10"]
_CLUSTER_VARS = ("SLURM_", "OMPI_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                 "TPU_", "XLA_FLAGS")


def _env(devices, **extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_VARS)}
  # The session's fast compile flags (tests/conftest.py), with this run's device count.
  fast = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(fast + [f"--xla_force_host_platform_device_count={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  return {**env, **extra}


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _cmd(workdir):
  return [sys.executable, os.path.join(ROOT, "launch.py"), *ARGS, f"--workdir={workdir}"]


def _teacher(workdir):
  config = baseline.get_config("tiny")
  setup = pipelines.validate(config)
  target = jax.eval_shape(lambda: iq_transformer.init_params(setup.teacher, jax.random.key(0)))
  return jax.device_get(checkpoint.restore(os.path.join(workdir, "seed_0", "teacher", "variables"),
                                           target))


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_as_many_devices(tmp_path):
  single = tmp_path / "single"
  out = subprocess.run(_cmd(single), cwd=ROOT, env=_env(4), capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]

  multi = tmp_path / "multi"
  port = _free_port()
  procs = [subprocess.Popen(_cmd(multi), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(
                                2, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
           for i in range(2)]
  try:
    outs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
  assert "process 0 of 2, 2 local and 4 global devices" in outs[0][1]
  # One report, from process 0; process 1 prints nothing.
  assert "| teacher |" in outs[0][0] and "| teacher |" not in outs[1][0]
  for f in ("metrics.json", "results.md"):
    assert (multi / f).is_file()

  a, b = _teacher(str(multi)), _teacher(str(single))
  helpers.assert_params_close(a, b, rtol=1e-3, atol=1e-5)
