"""The fp32 teacher alone: the reference every compressed model is compared to.

  python launch.py --config=experiments/baseline.py --workdir=runs/baseline
  python launch.py --config=experiments/baseline.py:full --workdir=runs/baseline_full  # GPU/TPU size
"""

from experiments import common


def get_config(size=None):
  c = common.base_config(size)
  # No compression pipeline: the report holds the teacher alone.
  return c
