"""The wireless study's ``budget`` stage: per-layer bits and sparsity under a byte budget.

``budget:12`` compresses the running model to at most 1/12 of the teacher's float32 export
bytes: `compressjax.allocation` measures every layer's exported bytes under every candidate
setting (the config's ``budget.bits`` x ``budget.sparsities``, per output channel, or
float; upper bounds that hold after fine-tuning) and the loss increase of each layer under
each (the others float, on fixed simulated batches), and picks one setting per layer by the
exact knapsack. ``budget:12u`` is its control: the one setting for every layer that fits
the same budget at the least summed loss increase (the best uniform setting). Either
plan is then applied (magnitude pruning, quantization) and fine-tuned with QAT and KD from
the float teacher, the masks and per-layer grids kept by `optimizer`.

The layers given a choice are every leaf with two or more dimensions: the Dense kernels,
the learned positions and the per-head q/k/v biases. The 1-D biases and LayerNorm
parameters (the budget's fixed part) are put on one ``budget.rest_bits``-bit grid per
tensor (default 8), or stay float32 with ``budget.rest_bits = 0``: float, they take 7.5 kB
of the cpu teacher's 43 kB at 1/10.
"""

import functools
import math
import time
from typing import Any, NamedTuple

from absl import logging
import jax
import numpy as np
import optax

from compressjax import allocation
from compressjax import pruning
from compressjax import quantization
from compressjax import selection
from compressjax import training
from compressjax.models import iq_transformer

class BudgetPlan(NamedTuple):
  """A budget stage's target (the stage option ``"<denominator>[u]"``, resolved).

  Attributes:
    denominator: the budget is the teacher's float32 export bytes / this.
    uniform: one choice for every layer (the control) instead of the allocated plan.
    choices: the candidate settings of a layer.
    batches: simulated training batches the sensitivity loss averages over.
    rest: the spec of the leaves without a choice (`allocation.Costs.rest`), None: float.
  """
  denominator: float
  uniform: bool
  choices: tuple[allocation.Choice, ...] = allocation.candidates()
  batches: int = 4
  rest: quantization.Spec | None = None


def check(block: Any) -> tuple[tuple[allocation.Choice, ...], int, quantization.Spec | None]:
  """The config's ``budget`` block: its candidate choices, sensitivity batches and the spec
  of the leaves without a choice."""
  granularities = tuple(block.get("granularities", ("channel",)))
  try:
    if not granularities:
      raise ValueError("granularities must name at least one of "
                       f"{quantization.GRANULARITIES}, got none")
    choices = sum((allocation.candidates(tuple(block.bits), tuple(block.sparsities), g,
                                         keep_float=i == 0, grid=block.get("grid", "minmax"))
                   for i, g in enumerate(granularities)), ())
    choices = allocation.check_choices(choices)
  except (TypeError, ValueError) as e:
    raise ValueError(f"budget.bits / budget.sparsities / budget.granularities / budget.grid: "
                     f"{e}") from None
  n = block.sensitivity_batches
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f"budget.sensitivity_batches must be an int >= 1, got {n!r}")
  rest = block.get("rest_bits", 0)
  if isinstance(rest, bool) or not isinstance(rest, int) or not (rest == 0 or 2 <= rest <= 16):
    raise ValueError(f"budget.rest_bits must be 0 (float32) or an int in [2, 16], got {rest!r}")
  return choices, n, quantization.Spec(rest) if rest else None


def parse(option: str | None, field: str, choices=None, batches: int = 4,
          rest: quantization.Spec | None = None) -> BudgetPlan:
  """``"12"`` -> 1/12, allocated; ``"12u"`` -> 1/12, uniform; errors name ``field``."""
  text = option or ""
  uniform = text.endswith("u")
  try:
    value = float(text[:-1] if uniform else text)
  except ValueError:
    value = float("nan")
  if not (math.isfinite(value) and value > 1):
    raise ValueError(f"{field}: budget stage must be 'budget:<N>' or 'budget:<N>u' with N > 1 "
                     f"(the budget is 1/N of the teacher's float32 bytes; 'u': the best "
                     f"uniform setting), got {'budget:' + text!r}")
  return BudgetPlan(value, uniform, choices or allocation.candidates(), batches, rest)


def where(params: Any) -> selection.Where:
  """The leaves a plan covers: those with two or more dimensions."""
  paths = frozenset(selection.path_str(p) for p, x in jax.tree_util.tree_leaves_with_path(params)
                    if np.ndim(x) >= 2)
  return lambda path: path in paths


def costs(model: Any, b: BudgetPlan) -> allocation.Costs:
  """Every covered layer's bytes under each of ``b``'s choices, for an IQ-transformer config.

  Upper bounds (every weight a choice keeps counted as non-zero), which depend on the
  shapes alone: measured once per architecture by exporting stand-in weights, and shared
  by the check before any work and by every seed's plan.
  """
  return _costs(model, tuple(b.choices), b.rest)


@functools.lru_cache(maxsize=8)
def _costs(model: Any, choices: tuple[allocation.Choice, ...],
           rest: quantization.Spec | None) -> allocation.Costs:
  shapes = jax.eval_shape(lambda: iq_transformer.init_params(model, jax.random.key(0)))
  ones = jax.tree.map(lambda x: np.ones(x.shape, x.dtype), shapes)
  return allocation.layer_costs(ones, choices, where(ones), upper_bound=True, rest=rest)


def smallest(c: allocation.Costs) -> int:
  """The fewest bytes any plan over these costs exports."""
  return int(c.fixed + c.bytes.min(axis=1).sum())


def sensitivity(params: Any, b: BudgetPlan, forward, data_fn, key, weights) -> np.ndarray:
  """Each covered layer's task-loss increase under each choice, on fixed simulated batches."""
  batches = [data_fn(k) for k in jax.random.split(key, b.batches)]

  def loss(p):
    return sum(training.task_losses(forward({"params": p}, batch, train=False, rngs=None),
                                    batch, weights)[0] for batch in batches) / len(batches)
  layers = sum(1 for x in jax.tree.leaves(params) if np.ndim(x) >= 2)
  logging.info("budget: the loss increase of %d layers x %d settings (%d forward passes of "
               "%d batches)...", layers, len(b.choices), layers * len(b.choices), b.batches)
  t0 = time.perf_counter()
  out = allocation.sensitivity(loss, params, b.choices, where(params))
  logging.info("budget: sensitivities measured in %.0f s", time.perf_counter() - t0)
  return out


def choose(c: allocation.Costs, sens: np.ndarray, budget_bytes: int,
           uniform: bool) -> allocation.Plan:
  """The allocated plan within ``budget_bytes``, or the best uniform one (``uniform``)."""
  if not uniform:
    return allocation.allocate(c, sens, budget_bytes)
  fits = [allocation.uniform(c, ch, sens) for ch in c.choices]
  fits = [p for p in fits if p.bytes <= budget_bytes]
  if not fits:
    least = min(allocation.uniform(c, ch).bytes for ch in c.choices)
    raise ValueError(f"budget_bytes must be at least {least} for a uniform plan, got "
                     f"{budget_bytes}")
  return min(fits, key=lambda p: (p.loss, p.bytes))


def optimizer(inner: optax.GradientTransformation, plan: allocation.Plan
              ) -> optax.GradientTransformation:
  """Fine-tuning that keeps the plan: its masks (pruned latents stay 0) and each layer's grid.

  The masks are re-derived at step 0 by magnitude at each layer's sparsity, which finds the
  plan's own zeros: `allocation.apply` pruned by the same magnitude ranking.
  """
  pruned = [p for p, ch in zip(plan.paths, plan.choices) if ch.sparsity > 0]
  tx = inner
  if pruned:
    tx = pruning.wrap(tx, plan.sparsity, where=frozenset(pruned).__contains__,
                      schedule=pruning.one_shot(0))
  if plan.quantizes:
    tx = quantization.wrap(tx, plan.spec, where=plan.selects)
  return tx


def summary(plan: allocation.Plan, budget_bytes: int) -> dict[str, Any]:
  """The record fields of a plan: the budget, the predicted bytes, the per-layer table."""
  return {"budget_bytes": int(budget_bytes), "plan_bytes": int(plan.bytes),
          "plan_loss": plan.loss, "allocation": allocation.table(plan),
          "rest_bits": 0 if plan.rest is None else plan.rest.bits}


def from_record(rec: dict[str, Any]) -> tuple[allocation.Plan, int]:
  """The plan and budget a finished budget stage recorded (`summary`), so a rerun restores
  them instead of measuring the sensitivities again."""
  rows = rec["allocation"]
  choices = tuple(allocation.Choice(r["bits"], "channel", float(r["sparsity"]))
                  if r["bits"] is None else
                  allocation.Choice(r["bits"], r["granularity"], float(r["sparsity"]),
                                    r.get("grid", "minmax")) for r in rows)
  layer_bytes = tuple(int(r["bytes"]) for r in rows)
  rest = rec.get("rest_bits", 0)
  return allocation.Plan(tuple(r["path"] for r in rows), choices, layer_bytes,
                         tuple(float(r["loss"]) for r in rows),
                         int(rec["plan_bytes"]) - sum(layer_bytes),
                         rest=quantization.Spec(rest) if rest else None), int(rec["budget_bytes"])


def footer(records: list[dict[str, Any]]) -> str:
  """results.md's budget section: each budget row's per-layer plan (its first seed's)."""
  lines = []
  seen = set()
  for r in records:
    if "allocation" not in r or r["name"] in seen or r.get("same_as"):
      continue
    seen.add(r["name"])
    lines += ["", f"Plan of {r['name']} (seed {r.get('seed', 0)}): budget "
              f"{r['budget_bytes']:,} bytes, plan at most {r['plan_bytes']:,}, exported "
              f"{r['bytes']:,} ({r['bytes_entropy']:,} entropy-coded); predicted loss "
              f"increase {r['plan_loss']:.4f}; the other (1-D) leaves "
              + (f"{r['rest_bits']}-bit per tensor." if r.get("rest_bits") else "float32."),
              "",
              "| layer | bits | sparsity | bytes (at most) | loss increase alone |",
              "|---|---|---|---|---|"]
    for row in r["allocation"]:
      bits = "float32" if row["bits"] is None else (
          f"{row['bits']} ({row['granularity']}, {row.get('grid', 'minmax')})")
      lines.append(f"| {row['path']} | {bits} | {row['sparsity']:.2f} | {row['bytes']:,} | "
                   f"{row['loss']:+.4f} |")
  return "\n".join(lines) + ("\n" if lines else "")
