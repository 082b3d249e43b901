"""The wireless study's budget stage: allocated and uniform plans within the byte budget."""

import numpy as np
import pytest

from compressjax import allocation
from compressjax import quantization
from compressjax.studies import wireless
from compressjax.studies import wireless_budget as wb
from experiments import budget
from tests import helpers


def _config(**pipelines):
  c = budget.get_config("tiny")
  for name in list(c.pipelines):
    del c.pipelines[name]
  for name, text in pipelines.items():
    c.pipelines[name] = text
  helpers.set_fields(c, {"budget.steps": 4, "eval.snr_points": (10.0, 30.0)})
  return c


@pytest.fixture(scope="module")
def records(tmp_path_factory):
  c = _config(**{"A/6": "budget:6"})
  workdir = str(tmp_path_factory.mktemp("budget"))
  return {r["name"]: r for r in wireless.run(c, workdir)}, c, workdir


def test_the_fine_tuned_plan_exports_within_the_budget(records):
  records = records[0]
  a, teacher = records["A/6/1_budget:6"], records["teacher"]
  assert a["budget_bytes"] == int(teacher["bytes"] / 6)
  # The plan's bound holds for the fine-tuned export, measured on it.
  assert a["bytes"] <= a["plan_bytes"] <= a["budget_bytes"]
  assert a["compression"] >= 6.0
  # Entropy coding stores every leaf's name and symbol table: on this tiny model they take
  # about what the codes save (on the cpu teacher it is 10-15% smaller).
  assert 0 < a["bytes_entropy"] < 1.05 * a["bytes"]
  assert "per-layer grids" in a["served"]
  rows = a["allocation"]
  assert {r["path"] for r in rows} >= {"embed/kernel", "pos_embed"}
  assert {r["grid"] for r in rows if r["bits"]} == {"mse"}   # the config's budget.grid
  assert sum(r["bytes"] for r in rows) <= a["plan_bytes"]
  assert a["rest_bits"] == 8   # the 1-D leaves on 8-bit grids: 3 to 4 of their 4 bytes saved
  assert a["plan_bytes"] - sum(r["bytes"] for r in rows) < teacher["bytes"] // 20
  assert np.isfinite(a["ser_top"]) and a["nonfinite_steps"] == 0


def test_a_rerun_restores_the_plan_without_measuring_again(records, monkeypatch):
  first, c, workdir = records
  monkeypatch.setattr(wb, "sensitivity", lambda *a, **k: pytest.fail("measured again"))
  again = {r["name"]: r for r in wireless.run(c, workdir)}
  for key in ("bytes", "bytes_entropy", "plan_bytes", "allocation", "rest_bits", "ser_top",
              "served"):
    assert again["A/6/1_budget:6"][key] == first["A/6/1_budget:6"][key], key


def test_the_uniform_control_is_the_best_single_setting_within_the_budget():
  rng = np.random.default_rng(0)
  choices = allocation.candidates((2, 4), (0.0, 0.5))
  costs = allocation.Costs(("a", "b", "c"), choices, rng.integers(10, 100, (3, 5)), 7)
  sens = rng.uniform(0, 1, (3, 5))
  for cap in range(40, 320, 20):
    fits = [(sens[:, j].sum(), j) for j in range(5) if 7 + costs.bytes[:, j].sum() <= cap]
    if not fits:
      with pytest.raises(ValueError, match="budget_bytes must be at least"):
        wb.choose(costs, sens, cap, uniform=True)
      continue
    u = wb.choose(costs, sens, cap, uniform=True)
    assert set(u.choices) == {choices[min(fits)[1]]} and u.bytes <= cap
    a = wb.choose(costs, sens, cap, uniform=False)   # the knapsack can only do better
    assert a.bytes <= cap and a.loss <= u.loss + 1e-12


def test_budgets_are_checked_before_any_work():
  with pytest.raises(ValueError, match=r"pipelines.A/50 must be a budget of at least the "
                                       r"smallest export, [\d,]+ bytes \(1/[\d.]+ of"):
    wireless.validate(_config(**{"A/50": "budget:50"}))
  with pytest.raises(ValueError, match="budget stage must be 'budget:<N>'"):
    wireless.validate(_config(bad="budget:x"))
  with pytest.raises(ValueError, match="a budget stage alone"):
    wireless.validate(_config(bad="prune,budget:8"))
  c = _config(**{"A/6": "budget:6"})
  c.budget.rest_bits = 1
  with pytest.raises(ValueError, match=r"budget.rest_bits must be 0 \(float32\) or an int"):
    wireless.validate(c)
  c.budget.rest_bits, c.budget.grid = 8, "lloyd"
  with pytest.raises(ValueError, match="budget.grid: grid must be one of"):
    wireless.validate(c)
  c.budget.grid, c.budget.granularities = "mse", ("channel", "row")
  with pytest.raises(ValueError, match="budget.granularities .*granularity must be one of"):
    wireless.validate(c)


def test_both_granularities_offer_every_setting_per_channel_and_per_tensor():
  c = _config()
  c.budget.granularities = ("channel", "tensor")
  choices, _, rest = wb.check(c.budget)
  quantized = [ch for ch in choices if ch.bits is not None]
  assert len(choices) == 2 * len(c.budget.bits) * len(c.budget.sparsities) + 1
  assert {ch.granularity for ch in quantized} == {"channel", "tensor"}
  assert {ch.grid for ch in quantized} == {"mse"} and rest == quantization.Spec(8)


def test_the_1_16_study_validates_with_both_granularities():
  from experiments import budget16
  c = budget16.get_config("tiny")
  plan = wireless.validate(c)   # its budget is above the smallest export (checked here)
  (stage,) = plan.pipelines["A/16"]
  assert stage.budget.denominator == 8 and not stage.budget.uniform   # tiny: 1/8
  assert {ch.granularity for ch in stage.budget.choices if ch.bits} == {"channel", "tensor"}
  assert c.budget.steps == 2 * budget.get_config("tiny").budget.steps
