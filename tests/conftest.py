"""Every test process sees 8 CPU devices, so data parallelism is exercised on CPU.

The flag must be set before JAX creates its CPU backend (at the first device use, after
this file is imported). Single-device code is unaffected: it runs on device 0.

OpenBLAS (which serves JAX's LAPACK calls on CPU: Cholesky, triangular and linear solves)
runs single-threaded: the tests' matrices are tiny, and its worker threads spin against
XLA's own (8 devices' worth), so a batch of 1000 64 x 64 Cholesky factorizations took
2-10 s instead of 0.07 s. It reads the variable when it loads, after this file runs.

XLA compiles at LLVM optimization level 0 (``--xla_backend_optimization_level=0``): the
tests' programs are tiny and compile-bound, so the codegen time dominates (a tiny
prune,quantize pipeline run: 158 s at the default level, 57 s at 0, on this 2-core
machine). The semantics are the same; the launcher subprocesses inherit the flag.
"""

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()
_OPT = "--xla_backend_optimization_level"
if _OPT not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} {_OPT}=0"
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
