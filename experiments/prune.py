"""Pruning alone: gradual magnitude pruning of the teacher, fine-tuned.

  python launch.py --config=experiments/prune.py --workdir=runs/prune
  python launch.py --config=experiments/prune.py:full --workdir=runs/prune_full  # GPU/TPU size
"""

from experiments import common


def get_config(size=None):
  c = common.base_config(size)
  c.pipelines["prune"] = "prune"
  return c
