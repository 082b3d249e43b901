"""Distillation alone: the small student trained from the teacher's soft targets.

  python launch.py --config=experiments/distill.py --workdir=runs/distill
  python launch.py --config=experiments/distill.py:full --workdir=runs/distill_full  # GPU/TPU size
"""

from experiments import common


def get_config(size=None):
  c = common.base_config(size)
  c.pipelines["distill"] = "distill:small"
  return c
