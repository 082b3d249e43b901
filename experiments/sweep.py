"""Every study on one shared teacher: the default main job of ``launch.py``.

  python launch.py                                   # this config, CPU size
  python launch.py --config=experiments/sweep.py:full --workdir=runs/sweep_full
  python launch.py --config.seeds='(0,1,2)'          # the research question over 3 seeds

The teacher is trained once per seed; each pipeline then starts from it. "distill" trains
the small student; the two combined pipelines distil into the compressed model itself.
"""

from experiments import common


def get_config(size=None):
  c = common.base_config(size)
  c.pipelines["prune"] = "prune"
  c.pipelines["quantize"] = "quantize"
  c.pipelines["distill"] = "distill:small"
  c.pipelines["P-Q-KD"] = "prune,quantize,distill"
  c.pipelines["Q-P-KD"] = "quantize,prune,distill"
  # Structured: whole heads and MLP units removed, so the served model is smaller and faster.
  c.pipelines["S-Q-KD"] = "prune:structured,quantize,distill"
  # The control: as many extra steps as the combined pipelines, no compression.
  c.pipelines["control"] = "finetune"
  c.compare = ("P-Q-KD", "Q-P-KD")
  return c
