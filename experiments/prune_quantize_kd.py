"""P-Q-KD: prune, then quantize the survivors, then distil from the fp32 teacher.

  python launch.py --config=experiments/prune_quantize_kd.py --workdir=runs/prune_quantize_kd
  python launch.py --config=experiments/prune_quantize_kd.py:full --workdir=runs/prune_quantize_kd_full  # GPU/TPU size
"""

from experiments import common


def get_config(size=None):
  c = common.base_config(size)
  c.pipelines["P-Q-KD"] = "prune,quantize,distill"
  return c
