"""Every test process sees 8 CPU devices, so data parallelism is exercised on CPU.

The flag must be set before JAX creates its CPU backend (at the first device use, after
this file is imported). Single-device code is unaffected: it runs on device 0.
"""

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()
