"""Quantization alone: INT8 quantization-aware fine-tuning of the teacher.

  python launch.py --config=experiments/quantize.py --workdir=runs/quantize
  python launch.py --config=experiments/quantize.py:full --workdir=runs/quantize_full  # GPU/TPU size
"""

from experiments import common


def get_config(size=None):
  c = common.base_config(size)
  c.pipelines["quantize"] = "quantize"
  return c
