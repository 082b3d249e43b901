"""The byte-budget study at 1/16 of the teacher's bytes (per-channel and per-tensor settings).

  python launch.py --config=experiments/budget16.py --workdir=runs/budget16

"A/16" is the allocator's plan at 1/16 of the teacher's float32 bytes and "U/16" the best
single setting for every layer within the same bytes, both fine-tuned with QAT and KD for
2x the budget study's steps (`experiments/budget.py`). Every setting is offered
per output channel and per tensor: the smallest cpu export falls from 1/17.8 (per channel
only) to 1/22.2, which leaves the allocator room at 1/16. The tiny config's target is 1/8.
"""

from experiments import budget


def get_config(size=None):
  c = budget.get_config(size)
  for name in list(c.pipelines):
    del c.pipelines[name]
  n = 8 if c.size == "tiny" else 16
  c.pipelines["A/16"] = f"budget:{n}"
  c.pipelines["U/16"] = f"budget:{n}u"   # the control: the best single setting
  c.budget.granularities = ("channel", "tensor")
  c.budget.steps *= 2
  return c
