"""Test-process settings, applied before JAX and NumPy load (this file is imported first).

Every test process sees 8 CPU devices, so data parallelism is exercised on CPU. The flag
must be set before JAX creates its CPU backend (at the first device use, after this file is
imported). Single-device code is unaffected: it runs on device 0.

XLA compiles at -O0 with the classic (non-MLIR) fusion emitters, each program as one LLVM
module: the tests' programs are tiny, so compiling dominates their time (a pruning-wrapper
scan compiles in 0.4 s instead of 3.1 s, and runs in 1 ms). On this project's 2-core CPU
the CPU time of tests/training plus tests/quantization fell from 205 s to 70 s, and a tiny
prune,quantize pipeline run from 158 s to 57 s at -O0 alone. The semantics are the same; the
launcher subprocesses (test_launch, test_multihost) keep these flags. A run-time-bound test
compiles its training loop at -O1 itself (quantization/test_accuracy.py). Set a flag in
XLA_FLAGS to run the tests with other codegen, e.g. ``--xla_backend_optimization_level=2``.

OpenBLAS (which serves JAX's LAPACK calls on CPU: Cholesky, triangular and linear solves)
runs single-threaded: the tests' matrices are tiny, and its worker threads spin against
XLA's own (8 devices' worth), so a batch of 1000 64 x 64 Cholesky factorizations took
2-10 s instead of 0.07 s. It reads the variable when it loads, after this file runs.
"""

import os

_XLA_FLAGS = {"--xla_force_host_platform_device_count": "8",
              "--xla_backend_optimization_level": "0",
              "--xla_cpu_use_fusion_emitters": "false",
              "--xla_cpu_parallel_codegen_split_count": "1"}
for _flag, _value in _XLA_FLAGS.items():
  if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}={_value}".strip()
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
