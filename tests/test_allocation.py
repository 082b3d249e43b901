"""`allocation`: measured costs equal the real export, the knapsack against brute force, the
budget never exceeded, measured and Hutchinson sensitivities, the plan as wrapper arguments."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compressjax import allocation as al
from compressjax import pruning
from compressjax import quantization as q

CHOICES = (al.Choice(2, "channel", 0.5, "mse"), al.Choice(4, "channel", 0.0),
           al.Choice(8, "tensor", 0.25), al.Choice(None))


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"Dense_0": {"kernel": jnp.asarray(rng.standard_normal((24, 32)) / 5, jnp.float32),
                      "bias": jnp.asarray(rng.standard_normal(32) / 10, jnp.float32)},
          "Dense_1": {"kernel": jnp.asarray(rng.standard_normal((32, 8)) / 6, jnp.float32),
                      "bias": jnp.zeros(8, jnp.float32)}}


def _loss_fn(seed=1):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((64, 24)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 8, 64))

  def loss(p):
    h = jax.nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    logits = h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss


def _np_prune(x, sparsity):
  """Zeroes the round(sparsity * n) smallest |x|, ties to the lower index (stable sort)."""
  x = np.array(x)
  flat = x.reshape(-1)
  flat[np.argsort(np.abs(flat), kind="stable")[:round(sparsity * flat.size)]] = 0
  return x


def _brute(costs, sens, budget):
  """The least summed loss over every plan whose bytes fit ``budget`` (None if none does)."""
  best = None
  for pick in itertools.product(range(costs.bytes.shape[1]), repeat=costs.bytes.shape[0]):
    rows = np.arange(len(pick))
    if costs.fixed + costs.bytes[rows, pick].sum() <= budget:
      loss = sens[rows, pick].sum()
      best = loss if best is None else min(best, loss)
  return best


def _instance(seed, layers=4, n=3):
  rng = np.random.default_rng(seed)
  costs = al.Costs(tuple(f"l{i}/kernel" for i in range(layers)), CHOICES[:n],
                   rng.integers(100, 2000, (layers, n)).astype(np.int64), 37)
  return costs, rng.standard_normal((layers, n))


def test_allocate_finds_the_brute_force_optimum_and_never_exceeds_the_budget():
  for seed in range(6):
    costs, sens = _instance(seed)
    lo = costs.fixed + int(costs.bytes.min(1).sum())
    hi = costs.fixed + int(costs.bytes.max(1).sum())
    for budget in [lo, lo + 1, *np.linspace(lo, hi + 100, 12).astype(int)[1:]]:
      plan = al.allocate(costs, sens, int(budget), resolution=1)
      assert plan.bytes <= budget
      rows = [costs.choices.index(c) for c in plan.choices]
      assert plan.bytes == costs.fixed + costs.bytes[np.arange(4), rows].sum()
      np.testing.assert_allclose(plan.loss, sens[np.arange(4), rows].sum())
      np.testing.assert_allclose(plan.loss, _brute(costs, sens, budget), atol=1e-12)
      # The default resolution is exact (1 byte) for budgets this small.
      assert al.allocate(costs, sens, int(budget)).loss == pytest.approx(plan.loss)


def test_coarse_buckets_stay_within_budget_and_lose_at_most_their_slack():
  r = 97
  for seed in range(6):
    costs, sens = _instance(seed + 10)
    lo = costs.fixed + int(costs.bytes.min(1).sum())
    hi = costs.fixed + int(costs.bytes.max(1).sum())
    for budget in np.linspace(lo, hi + 100, 15).astype(int):
      plan = al.allocate(costs, sens, int(budget), resolution=r)
      assert plan.bytes <= budget and plan.resolution == r
      assert plan.loss >= _brute(costs, sens, budget) - 1e-12
      slack = _brute(costs, sens, budget - 4 * r)
      if slack is not None:
        assert plan.loss <= slack + 1e-12


def test_a_budget_below_the_smallest_export_raises_naming_it():
  costs, sens = _instance(0)
  lo = costs.fixed + int(costs.bytes.min(1).sum())
  al.allocate(costs, sens, lo)
  with pytest.raises(ValueError, match=f"budget_bytes must be at least {lo}.*got {lo - 1}"):
    al.allocate(costs, sens, lo - 1)


def test_equal_loss_takes_the_fewest_bytes():
  costs = al.Costs(("a", "b"), CHOICES[:2], np.array([[500, 100], [300, 200]]), 0)
  plan = al.allocate(costs, np.zeros((2, 2)), 10_000)
  assert plan.bytes == 300


def test_layer_costs_are_the_real_bytes_of_each_layer_alone():
  params = _params()
  costs = al.layer_costs(params, CHOICES)
  assert costs.paths == ("Dense_0/kernel", "Dense_1/kernel")
  # Biases stay float: 4 bytes a value and a 12-byte header (8 + 4 per dimension); the
  # all-zero one as a bitmask of its 8 values (1 byte) and no values.
  assert costs.fixed == (32 * 4 + 12) + (1 + 12)
  for i, name in enumerate(("Dense_0", "Dense_1")):
    k = np.asarray(params[name]["kernel"])
    n, channels = k.size, k.shape[1]
    assert costs.bytes[i, 3] == n * 4 + 16  # float, dense
    for j, c in enumerate(CHOICES[:3]):
      nnz = int(np.count_nonzero(q.quantize(_np_prune(k, c.sparsity), c.spec)))
      nz_bits = 1 if c.bits == 2 else c.bits   # a masked 2-bit non-zero is -1 or +1
      codes = min(-(-n * c.bits // 8), -(-n // 8) + -(-nnz * nz_bits // 8))
      scales = 4 * (channels if c.granularity == "channel" else 1)
      assert costs.bytes[i, j] == codes + scales + 16, (name, c)
  # The upper bound: every weight pruning keeps is non-zero, and so is every float value
  # (the zero bias is stored dense: 8 values, 4 bytes each).
  bound = al.layer_costs(params, CHOICES, upper_bound=True)
  assert bound.fixed == (32 * 4 + 12) + (8 * 4 + 12) and np.all(bound.bytes >= costs.bytes)
  for i, name in enumerate(("Dense_0", "Dense_1")):
    k = np.asarray(params[name]["kernel"])
    n, channels = k.size, k.shape[1]
    for j, c in enumerate(CHOICES):
      nnz = n - round(c.sparsity * n)
      if c.bits is None:
        want = min(4 * n, -(-n // 8) + 4 * nnz) + 16
      else:
        nz_bits = 1 if c.bits == 2 else c.bits
        want = min(-(-n * c.bits // 8), -(-n // 8) + -(-nnz * nz_bits // 8)) + 16 + 4 * (
            channels if c.granularity == "channel" else 1)
      assert bound.bytes[i, j] == want, (name, c)


def _plan(costs, pick):
  rows = range(len(pick))
  return al.Plan(costs.paths, tuple(costs.choices[j] for j in pick),
                 tuple(int(costs.bytes[i, j]) for i, j in zip(rows, pick)),
                 (0.0,) * len(pick), costs.fixed, rest=costs.rest)


def test_predicted_bytes_equal_the_real_export_for_every_plan():
  params = _params(1)
  costs = al.layer_costs(params, CHOICES)
  for pick in itertools.product(range(len(CHOICES)), repeat=2):
    plan = _plan(costs, pick)
    packed = al.export(params, plan)
    assert q.nbytes(packed) == plan.bytes, pick
    applied = al.apply(params, plan)
    if any(c.bits is not None for c in plan.choices):  # the per-path spec, default `where`
      assert q.nbytes(q.export(applied, plan.spec)) == plan.bytes
    back = q.load(packed)
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, applied))


def test_rest_puts_the_other_float_leaves_on_a_grid_within_the_predicted_bytes():
  params = _params(5)
  costs = al.layer_costs(params, CHOICES, rest=8, upper_bound=True)
  # Each bias as 8-bit codes, one float32 scale and a 12-byte header, the zero one too.
  assert costs.fixed == (32 + 4 + 12) + (8 + 4 + 12)
  assert costs.rest == q.Spec(8)
  plan = _plan(costs, (0, 3))   # Dense_1's kernel stays float
  assert plan.spec("Dense_0/bias") == q.Spec(8) and plan.spec("Dense_1/kernel") is None
  applied = al.apply(params, plan)
  b = np.asarray(params["Dense_0"]["bias"])
  step = np.abs(b).max() / 127
  np.testing.assert_allclose(applied["Dense_0"]["bias"], np.round(b / step) * step, rtol=1e-6)
  np.testing.assert_array_equal(applied["Dense_1"]["kernel"], params["Dense_1"]["kernel"])
  assert q.nbytes(al.export(params, plan)) <= plan.bytes
  # Fine-tuning keeps the biases on their grids; the export stays within the bound.
  tx = q.wrap(optax.adam(1e-2), plan.spec, where=plan.selects)
  p, s = applied, tx.init(applied)
  for _ in range(2):
    u, s = tx.update(jax.grad(_loss_fn())(p), s, p)
    p = optax.apply_updates(p, u)
  for name in ("Dense_0", "Dense_1"):
    bias = np.asarray(p[name]["bias"])
    np.testing.assert_array_max_ulp(bias, np.asarray(q.quantize(bias, q.Spec(8))), maxulp=4)
  assert q.nbytes(q.export(p, plan.spec, where=plan.selects)) <= plan.bytes


def test_sensitivity_is_the_measured_loss_increase_of_one_layer():
  params, loss = _params(2), _loss_fn()
  sens = al.sensitivity(loss, params, CHOICES)
  assert sens.shape == (2, 4)
  for i, name in enumerate(("Dense_0", "Dense_1")):
    for j, c in enumerate(CHOICES):
      k = _np_prune(params[name]["kernel"], c.sparsity)
      np.testing.assert_array_equal(al.compress(params[name]["kernel"], c),
                                    k if c.bits is None else q.quantize(k, c.spec))
      changed = {**params, name: {**params[name], "kernel": al.compress(k, c)}}
      np.testing.assert_allclose(sens[i, j], loss(changed) - loss(params), atol=1e-6)
  assert np.all(sens[:, 3] == 0)  # float, dense: nothing changes


def test_allocated_plans_fit_real_budgets_and_are_optimal():
  params, loss = _params(3), _loss_fn()
  costs = al.layer_costs(params, CHOICES)
  sens = al.sensitivity(loss, params, CHOICES)
  lo = costs.fixed + int(costs.bytes.min(1).sum())
  hi = costs.fixed + int(costs.bytes.max(1).sum())
  for budget in (lo, (2 * lo + hi) // 3, (lo + 2 * hi) // 3, hi):
    plan = al.allocate(costs, sens, budget)
    assert q.nbytes(al.export(params, plan)) == plan.bytes <= budget
    np.testing.assert_allclose(plan.loss, _brute(costs, sens, budget), atol=1e-9)
  with pytest.raises(ValueError, match=f"at least {lo}"):
    al.allocate(costs, sens, lo - 1)


def test_plan_drives_qat_and_pruning_wrappers():
  params = _params(4)
  costs = al.layer_costs(params, CHOICES[:3], upper_bound=True)
  plan = _plan(costs, (0, 2))  # 2-bit channel 50% sparse, 8-bit tensor 25% sparse
  # One-shot magnitude pruning by the wrapper removes the weights `prune` removes.
  tx = pruning.wrap(optax.sgd(0.0), plan.sparsity)
  u, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  pruned = optax.apply_updates(params, u)
  for path, c in zip(plan.paths, plan.choices):
    name = path.split("/")[0]
    np.testing.assert_array_equal(pruned[name]["kernel"], _np_prune(params[name]["kernel"],
                                                                    c.sparsity))
  # Fine-tuning from the applied plan keeps each layer's sparsity and grid.
  start = al.apply(params, plan)
  tx = q.wrap(pruning.wrap(optax.adam(1e-2), plan.sparsity), plan.spec)
  loss = _loss_fn()

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  p, s = start, tx.init(start)
  for _ in range(3):
    p, s = step(p, s)
  for path, c in zip(plan.paths, plan.choices):
    k = np.asarray(p[path.split("/")[0]]["kernel"])
    assert (k == 0).sum() >= round(c.sparsity * k.size)
    np.testing.assert_array_max_ulp(k, np.asarray(q.fake_quant(k, c.spec)), maxulp=4)
  # On each layer's grid (export does not refuse to re-quantize), within the upper bound.
  assert q.nbytes(al.export(start, plan)) <= plan.bytes
  assert q.nbytes(q.export(p, plan.spec, where=plan.selects)) <= plan.bytes


def test_hutchinson_trace_is_exact_for_a_diagonal_hessian():
  params = _params(5)
  a = {n: jnp.asarray(np.random.default_rng(7).uniform(0.5, 2.0, params[n]["kernel"].shape),
                      jnp.float32) for n in ("Dense_0", "Dense_1")}
  loss = lambda p: sum(0.5 * jnp.sum(a[n] * p[n]["kernel"] ** 2) + jnp.sum(p[n]["bias"] ** 3)
                       for n in a)
  traces = al.hessian_traces(loss, params, samples=3)
  for n, diag in a.items():  # v^T diag(a) v = sum(a) for every Rademacher v
    np.testing.assert_allclose(traces[f"{n}/kernel"], float(jnp.sum(diag)), rtol=1e-5)
  costs = al.layer_costs(params, CHOICES)
  got = al.hutchinson_sensitivity(traces, params, costs)
  for i, n in enumerate(a):
    k = np.asarray(params[n]["kernel"], np.float64)
    for j, c in enumerate(CHOICES):
      err = np.sum((np.asarray(al.compress(k.astype(np.float32), c), np.float64) - k) ** 2)
      np.testing.assert_allclose(got[i, j], 0.5 * traces[f"{n}/kernel"] / k.size * err,
                                 rtol=1e-5)


def test_table_lists_each_layer():
  costs, sens = _instance(3, layers=2, n=4)
  rows = al.table(al.uniform(costs, CHOICES[3], sens))
  assert [r["path"] for r in rows] == ["l0/kernel", "l1/kernel"]
  assert rows[0] == {"path": "l0/kernel", "bits": None, "granularity": "-", "grid": "-",
                     "sparsity": 0.0,
                     "bytes": int(costs.bytes[0, 3]), "loss": float(sens[0, 3])}
  rows = al.table(al.uniform(costs, CHOICES[0]))
  assert (rows[1]["bits"], rows[1]["granularity"], rows[1]["sparsity"]) == (2, "channel", 0.5)


def test_the_mse_grid_is_the_lloyd_max_ternary_quantizer_at_two_bits():
  # A symmetric 2-bit grid has the levels {-s, 0, s} and the thresholds +-s/2. For a unit
  # Gaussian the least-squares 3-level quantizer (Max 1960) has exactly that form, with s =
  # 1.2240 and error 0.1902; the min/max grid (s = max|x|, about 4) zeroes nearly everything.
  x = np.random.default_rng(0).standard_normal((20_000, 4)).astype(np.float32)
  for grid, lo, hi in (("mse", 0.185, 0.196), ("minmax", 0.6, 1.0)):
    y = np.asarray(al.compress(x, al.Choice(2, "channel", 0.0, grid)))
    assert lo < np.mean((y - x) ** 2) < hi, grid
    if grid == "mse":
      np.testing.assert_allclose(np.abs(y).max(0), 1.224, atol=0.05)
  assert al.Choice(3, grid="mse").spec == q.Spec(3, True, "channel", -1, "mse")
  assert al.candidates((2,), (0.0,), grid="mse")[0].grid == "mse"


def test_bad_arguments_raise_naming_the_field():
  with pytest.raises(ValueError, match="grid must be one of"):
    al.candidates(grid="lloyd")
  with pytest.raises(ValueError, match="bits must be None"):
    al.candidates(bits=(1,))
  with pytest.raises(ValueError, match="sparsity must be a float in \\[0, 1\\)"):
    al.candidates(sparsities=(1.0,))
  with pytest.raises(ValueError, match="granularity must be one of"):
    al.candidates(granularity="row")
  assert len(al.candidates()) == 5 * 4 + 1
  costs, sens = _instance(0)
  with pytest.raises(ValueError, match="sensitivity must have the shape"):
    al.allocate(costs, sens[:, :2], 10_000)
  with pytest.raises(ValueError, match="sensitivity must be finite"):
    al.allocate(costs, np.full(sens.shape, np.nan), 10_000)
  with pytest.raises(ValueError, match="resolution must be"):
    al.allocate(costs, sens, 10_000, resolution=0)
  with pytest.raises(ValueError, match="plan paths must be leaves"):
    al.apply(_params(), al.uniform(costs, CHOICES[0]))
