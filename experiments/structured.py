"""S-Q-KD: whole attention heads and MLP units pruned, then INT8, then KD; served smaller.

  python launch.py --config=experiments/structured.py --workdir=runs/structured
  python launch.py --config=experiments/structured.py --config.prune.sparsity=0.75

The prune stage removes ``prune.sparsity`` of every block's heads and of its MLP units
(`stages.COMPOSITE`'s "head+neuron"), so the served model is materialized smaller
(`compressjax.serving`): its FLOPs and latency columns are those of the smaller model.
"""

from experiments import common


def get_config(size=None):
  c = common.base_config(size)
  c.pipelines["S-Q-KD"] = "prune:structured,quantize,distill"
  return c
