"""Q-P-KD: quantize, then prune on the grid, then distil from the fp32 teacher.

  python launch.py --config=experiments/quantize_prune_kd.py --workdir=runs/quantize_prune_kd
  python launch.py --config=experiments/quantize_prune_kd.py:full --workdir=runs/quantize_prune_kd_full  # GPU/TPU size
"""

from experiments import common


def get_config(size=None):
  c = common.base_config(size)
  c.pipelines["Q-P-KD"] = "quantize,prune,distill"
  return c
